"""NNCF as a quantization engine (quantize.nncf, quantize.nncf_weights) and OpenVINO as a target."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError
from torch import nn

pytest.importorskip("nncf")

from compress.passes._quant_common import onnx_top1, ort_session
from compress.passes.export_onnx import ExportOnnx
from compress.passes.quantize_nncf import QuantizeNncf
from compress.passes.quantize_nncf_weights import QuantizeNncfWeights

from compress.api import module_artifact
from compress.core.artifact import Artifact
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager, VerifyInstrument
from compress.errors import InputError, PassError, RecipeError
from compress.inputs import zoo
from compress.inputs.data import DataBundle, load_data
from compress.inputs.training import fit
from compress.stages.recipe import DataSpec

SHAPE = (1, 1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(DataSpec(source="builtin:digits"), SHAPE)


@pytest.fixture(scope="module")
def cnn_onnx(digits: DataBundle, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = zoo.build("digits-cnn")
    fit(m, digits, 5, lr=3e-3)
    cache = Cache(tmp_path_factory.mktemp("nncf"))
    root = module_artifact(m.eval(), SHAPE, cache)
    return PassManager([ExportOnnx()]).run(root, PassContext(cache=cache, progress=False, original=root))[0]


@pytest.fixture(scope="module")
def transformer_onnx(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    torch.manual_seed(0)
    cache = Cache(tmp_path_factory.mktemp("nncf_tf"))
    root = module_artifact(zoo.build("transformer", SHAPE).eval(), SHAPE, cache)
    return PassManager([ExportOnnx()]).run(root, PassContext(cache=cache, progress=False, original=root))[0]


def _apply(art: Artifact, cfg: Any, data: DataBundle | None, cache: Cache) -> Artifact:
    return PassManager([cfg], [VerifyInstrument()]).run(art, PassContext(cache=cache, data=data, progress=False))[0]


def test_nncf_int8_is_standard_qdq_and_keeps_accuracy_per_isa(forced_isa: str, cnn_onnx: Artifact,
                                                               digits: DataBundle, cache: Cache) -> None:
    from conftest import SCHEME_FOR_ISA, host_int8_kernels_exact, weight_ints

    q = _apply(cnn_onnx, QuantizeNncf(samples=64), digits, cache)
    m = onnx.load(str(q.path / "model.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)  # no OpenVINO FakeQuantize
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in m.graph.node}
    meta = q.metadata["quantize.nncf"]
    scheme = SCHEME_FOR_ISA[forced_isa]
    assert meta["scheme"] == scheme and meta["engine"] == "nncf" and meta["quantized_nodes"] == 4
    # overflow_fix: 7-bit weights where the CPU lacks VNNI (NNCF's range is [-64, 64]).
    amax = max(int(np.abs(w).max()) for w in weight_ints(q))
    assert amax <= 64 if scheme == "u8s8_reduce_range" else amax > 64
    if host_int8_kernels_exact(scheme):
        fp, i8 = onnx_top1(cnn_onnx.path / "model.onnx", digits)[0], onnx_top1(q.path / "model.onnx", digits)[0]
        assert fp - i8 <= 0.01
        assert not meta["parity"]["flagged"]


def test_nncf_skip_by_type_and_name_are_reported(cnn_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    q = _apply(cnn_onnx, QuantizeNncf(samples=32, skip=("type:Gemm",), preset="mixed"), digits, cache)
    meta = q.metadata["quantize.nncf"]
    assert meta["quantized_nodes"] == 3 and len(meta["kept_float"]) == 1
    # The reported name is one the user can paste back into skip.
    again = _apply(cnn_onnx, QuantizeNncf(samples=32, skip=tuple(meta["kept_float"])), digits, cache)
    assert again.metadata["quantize.nncf"]["kept_float"] == meta["kept_float"]


@pytest.mark.parametrize("cfg, match", [
    (QuantizeNncf(skip=("re:nothing_.*",)), "skip entry 're:nothing_.*' selects no node"),
    (QuantizeNncf(skip=("re:([",)), "not a regular expression"),
    (QuantizeNncf(skip=("type:Softmax",)), "the model has no Softmax; .*its types: "),
    (QuantizeNncf(skip=("conv99",)), "skip entry 'conv99' selects no node"),
    (QuantizeNncf(skip=("gemm_*",)), "skip entry 'gemm_\\*' selects no node"),
])
def test_nncf_scope_that_matches_nothing_is_refused_before_quantizing(cfg: QuantizeNncf, match: str,
                                                                       cnn_onnx: Artifact, digits: DataBundle,
                                                                       cache: Cache,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import nncf

    def boom(*_: Any, **__: Any) -> None:
        raise AssertionError("NNCF must not run")

    monkeypatch.setattr(nncf, "quantize", boom)
    with pytest.raises(RecipeError, match=match):
        _apply(cnn_onnx, cfg, digits, cache)


def test_nncf_accuracy_control_with_labels_and_with_fidelity(cnn_onnx: Artifact, digits: DataBundle,
                                                             cache: Cache) -> None:
    q = _apply(cnn_onnx, QuantizeNncf(samples=32, max_accuracy_drop=0.001, accuracy_samples=64), digits, cache)
    ac = q.metadata["quantize.nncf"]["accuracy_control"]
    assert ac["metric"] == "top-1" and ac["float"] - ac["int8"] <= 0.001 + 1e-9
    assert set(ac["reverted_to_float"]) <= set(q.metadata["quantize.nncf"]["kept_float"])
    unlabelled = dataclasses.replace(digits, labelled=False,
                                     val=dataclasses.replace(digits.val, y=None))
    q2 = _apply(cnn_onnx, QuantizeNncf(samples=32, max_accuracy_drop=0.01, accuracy_samples=64), unlabelled, cache)
    ac2 = q2.metadata["quantize.nncf"]["accuracy_control"]
    assert ac2["metric"] == "output cosine to the float model" and ac2["float"] == pytest.approx(1.0)
    assert ac2["int8"] >= 0.99


def test_nncf_needs_data(cnn_onnx: Artifact, cache: Cache) -> None:
    with pytest.raises(PassError, match="set `data`"):
        _apply(cnn_onnx, QuantizeNncf(), None, cache)


def test_nncf_weight_compression_int8_and_int4(transformer_onnx: Artifact, cnn_onnx: Artifact, digits: DataBundle,
                                               cache: Cache) -> None:
    w8 = _apply(transformer_onnx, QuantizeNncfWeights(), None, cache)
    meta = w8.metadata["quantize.nncf_weights"]
    assert meta["compressed_tensors"] >= 8 and meta["parity"]["cosine"] > 0.999
    w4 = _apply(transformer_onnx, QuantizeNncfWeights(mode="int4_sym", group_size=32, ratio=0.5, min_cosine=0.9), None,
                cache)
    m4 = w4.metadata["quantize.nncf_weights"]
    assert m4["matmulnbits"] >= 1 and m4["parity"]["cosine"] > 0.9
    assert w4.size_bytes() < w8.size_bytes() < transformer_onnx.size_bytes()
    with pytest.raises(ValidationError, match="INT4 modes only"):
        QuantizeNncfWeights(mode="int8_sym", awq=True)
    with pytest.raises(ValidationError, match="power of two"):
        QuantizeNncfWeights(mode="int4_sym", group_size=48)
    with pytest.raises(PassError, match="need calibration data"):
        _apply(transformer_onnx, QuantizeNncfWeights(mode="int4_sym", awq=True), None, cache)
    with pytest.raises(PassError, match="no MatMul/Gemm"):
        _apply(_conv_only(cache), QuantizeNncfWeights(), None, cache)
    with pytest.raises(PassError, match="beyond the tolerance"):
        _apply(transformer_onnx, QuantizeNncfWeights(mode="int4_sym", group_size=16, min_cosine=0.9999), None, cache)


def _conv_only(cache: Cache) -> Artifact:
    torch.manual_seed(0)
    root = module_artifact(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval(), SHAPE, cache)
    return PassManager([ExportOnnx()]).run(root, PassContext(cache=cache, progress=False, original=root))[0]


# ---- OpenVINO target ------------------------------------------------------------------------------------

ov = pytest.importorskip("openvino")

from compress.targets.openvino_runtime import OpenVinoConfig, OpenVinoTarget  # noqa: E402


def _ort(art: Artifact, x: np.ndarray) -> np.ndarray:
    return np.asarray(ort_session(art.path / "model.onnx").run(None, {"input": x})[0])


def test_openvino_fp32_matches_onnxruntime_at_any_batch(cnn_onnx: Artifact, cache: Cache) -> None:
    target = OpenVinoTarget(OpenVinoConfig())
    assert target.unavailable_reason() is None
    comp = target.compile(cnn_onnx, PassContext(cache=cache))
    assert comp.metadata["openvino"]["inference_precision"] == "f32"
    runner = target.runner(comp, threads=1)
    for b in (1, 7):
        x = np.random.default_rng(b).standard_normal((b, *SHAPE[1:])).astype(np.float32)
        np.testing.assert_allclose(runner.infer({"input": x})[0], _ort(cnn_onnx, x), rtol=1e-4, atol=1e-5)


def test_openvino_runs_qdq_int8_close_to_its_simulation(cnn_onnx: Artifact, digits: DataBundle,
                                                        cache: Cache) -> None:
    from compress.passes._quant_common import simulated_agreement

    q = _apply(cnn_onnx, QuantizeNncf(samples=32), digits, cache)
    target = OpenVinoTarget(OpenVinoConfig())
    runner = target.runner(target.compile(q, PassContext(cache=cache)), threads=1)
    rep = simulated_agreement(q, runner.infer, digits, max_samples=128, batch=16)
    assert rep["agreement"] >= 0.97 and rep["cosine"] > 0.99


def test_openvino_refuses_what_it_cannot_run(cnn_onnx: Artifact, cache: Cache, tmp_path: Path) -> None:
    caps = [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if "FP16" not in caps:
        with pytest.raises(RecipeError, match="inference_precision = 'f16' is not supported"):
            OpenVinoTarget(OpenVinoConfig(inference_precision="f16")).check_config()
    if "GPU" not in " ".join(ov.Core().available_devices):
        assert "no GPU device" in (OpenVinoTarget(OpenVinoConfig(device="GPU")).unavailable_reason() or "")
    target = OpenVinoTarget(OpenVinoConfig())
    comp = target.compile(cnn_onnx, PassContext(cache=cache))
    manifest = comp.path / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "openvino": "1999.0"}))
    with pytest.raises(InputError, match="rebuild it"):
        target.runner(comp)
    with pytest.raises(ValidationError):
        OpenVinoConfig(performance_hint="fastest")  # type: ignore[arg-type]


def test_run_with_nncf_int8_on_openvino_checks_deployed_parity(tmp_path: Path, capsys) -> None:
    from compress.cli import main

    r = tmp_path / "r.toml"
    r.write_text('name = "ov"\nmodel = { source = "zoo:digits-cnn", train_epochs = 1 }\n'
                 'data = { source = "builtin:digits" }\n'
                 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                 '[[passes]]\nkind = "quantize.nncf"\nsamples = 32\n'
                 '[[targets]]\nkind = "onnxruntime"\n[[targets]]\nkind = "openvino"\n')
    out = tmp_path / "out"
    code = main(["run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    cells = {(c["variant"], c["target"]): c for c in rep["results"]}
    assert cells[("ov", "openvino")]["status"] == "ok"
    parity = cells[("ov", "openvino")]["quant_parity"]
    assert parity is not None and parity["samples"] > 0 and parity["cosine"] > 0.99
    assert any("inference precision f32" in n for n in cells[("ov", "openvino")]["notes"] + rep["notes"])
