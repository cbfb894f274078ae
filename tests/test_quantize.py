"""Quantization passes: INT8 PTQ (QDQ), accuracy control, parity, dynamic, FP16, weight-only, QAT."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from compress.passes._quant_common import ort_session, session_infer, simulated_agreement
from compress.passes.export_onnx import ExportOnnx
from compress.passes.quantize_dynamic import QuantizeDynamic
from compress.passes.quantize_fp16 import QuantizeFp16
from compress.passes.quantize_int8 import QuantizeInt8
from compress.passes.quantize_qat import QuantizeQat, QuantWrap
from compress.passes.quantize_weight_only import QuantizeWeightOnly
from conftest import SCHEME_FOR_ISA, host_int8_kernels_exact, weight_ints
from pydantic import ValidationError
from torch import nn

from compress.api import module_artifact
from compress.core.artifact import Artifact
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager, VerifyInstrument
from compress.errors import AccuracyError, CompressError, InputError, PassError, RecipeError
from compress.inputs import zoo
from compress.inputs.data import DataBundle, Split, load_data
from compress.inputs.torch_io import load_torch
from compress.inputs.training import fit, top1
from compress.stages.recipe import DataSpec

SHAPE = (1, 1, 8, 8)
# A fake-quantized model exported to ONNX differs from torch by up to one quantization step
# where rounding ties fall differently; cosine still checks the whole output.
QAT_EXPORT = ExportOnnx(atol=0.1)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_data(DataSpec(source="builtin:digits"), SHAPE)


@pytest.fixture(scope="session")
def cnn(digits: DataBundle) -> nn.Module:
    torch.set_num_threads(1)  # two threads on two shared cores were ~8x slower here
    torch.manual_seed(0)
    m = zoo.build("digits-cnn")
    fit(m, digits, 5, lr=3e-3)
    return m.eval()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.mktemp("qcache"))


def _run(module: nn.Module, steps: list[Any], data: DataBundle | None, cache: Cache) -> tuple[Artifact, list[Any]]:
    root = module_artifact(module, SHAPE, cache)
    ctx = PassContext(cache=cache, data=data, progress=False, original=root)
    return PassManager(steps, [VerifyInstrument()]).run(root, ctx)


@pytest.fixture(scope="session")
def cnn_onnx(cnn: nn.Module, session_cache: Cache) -> Artifact:
    return _run(cnn, [ExportOnnx()], None, session_cache)[0]


def _quantize(art: Artifact, cfg: Any, data: DataBundle | None, cache: Cache) -> Artifact:
    ctx = PassContext(cache=cache, data=data, progress=False)
    return PassManager([cfg], [VerifyInstrument()]).run(art, ctx)[0]


def _ops(art: Artifact) -> list[str]:
    return [n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node]


def _ort_top1(art: Artifact, data: DataBundle) -> float:
    sess = ort_session(art.path / "model.onnx")
    x = data.adapt(data.val.x).numpy()
    return float((sess.run(None, {"input": x})[0].argmax(1) == data.val.y).mean())


def test_int8_ptq_is_qdq_runs_on_ort_and_keeps_accuracy_per_isa(forced_isa: str, cnn_onnx: Artifact,
                                                                digits: DataBundle, cache: Cache) -> None:
    q = _quantize(cnn_onnx, QuantizeInt8(), digits, cache)
    ops = _ops(q)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not any(o.startswith("QLinear") for o in ops), "the artifact must stay in QDQ form"
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(q.path / "model.onnx")).graph.node)
    meta = q.metadata["quantize.int8"]
    scheme = SCHEME_FOR_ISA[forced_isa]
    assert meta["scheme"] == scheme
    assert ("no VNNI" in meta["scheme_reason"]) == (forced_isa == "novnni")
    assert any(n.startswith("INT8 scheme:") for n in meta["notes"])
    hi = 63 if scheme == "u8s8_reduce_range" else 127
    assert max(int(np.abs(w).max()) for w in weight_ints(q)) <= hi + 1  # ORT's 7-bit range is [-64, 63]
    p = meta["parity"]
    assert p["samples"] > 0
    if host_int8_kernels_exact(scheme):
        fp, i8 = _ort_top1(cnn_onnx, digits), _ort_top1(q, digits)
        assert fp - i8 <= 0.01, (fp, i8)
        assert not p["flagged"] and p["agreement"] >= 0.98
        assert p["top1_deployed"] == pytest.approx(p["top1_simulated"], abs=0.02)


def test_scheme_follows_the_forced_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.core.int8_scheme import choose_scheme

    monkeypatch.setenv("COMPRESS_ARCH", "x86_64")
    monkeypatch.setenv("COMPRESS_ISA", "avx2,fma")
    assert choose_scheme("auto")[0] == "u8s8_reduce_range"
    for flags in ("avx2,fma,avx512f,avx512_vnni", "avx2,fma,avx_vnni", "avx2,avx512f,amx_tile,amx_int8"):
        monkeypatch.setenv("COMPRESS_ISA", flags)
        scheme, why = choose_scheme("auto")
        assert scheme == "u8s8" and "forced by COMPRESS_ISA" in why
    monkeypatch.setenv("COMPRESS_ISA", "avx2")
    assert choose_scheme("u8u8")[0] == "u8u8"  # an explicit setting wins over the ISA
    monkeypatch.setenv("COMPRESS_ARCH", "aarch64")
    monkeypatch.setenv("COMPRESS_ISA", "neon,asimd")
    assert choose_scheme("auto")[0] == "u8s8"
    monkeypatch.setenv("COMPRESS_ISA", "avx512vnni")  # a typo must not silently select the no-VNNI branch
    with pytest.raises(InputError, match="unknown ISA flag"):
        choose_scheme("auto")
    monkeypatch.setenv("COMPRESS_ISA", "avx2")
    monkeypatch.setenv("COMPRESS_ARCH", "riscv")
    with pytest.raises(InputError, match="COMPRESS_ARCH"):
        choose_scheme("auto")


def test_dynamic_int8_scheme_per_isa(forced_isa: str, transformer_onnx: Artifact, digits: DataBundle,
                                     cache: Cache) -> None:
    q = _quantize(transformer_onnx, QuantizeDynamic(), None, cache)
    assert q.metadata["quantize.dynamic"]["scheme"] == SCHEME_FOR_ISA[forced_isa]
    if host_int8_kernels_exact(SCHEME_FOR_ISA[forced_isa]):
        assert _cos_vs(transformer_onnx, q, digits.adapt(digits.val.x[:32]).numpy()) > 0.99


def test_int8_options_and_skip(cnn_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    full = _quantize(cnn_onnx, QuantizeInt8(samples=32), digits, cache)
    cfg = QuantizeInt8(per_channel=False, calibration="percentile", activations="symmetric", samples=32,
                       skip=("first", "last"), scheme="u8u8")
    q = _quantize(cnn_onnx, cfg, digits, cache)
    meta = q.metadata["quantize.int8"]
    assert len(meta["kept_float"]) == 2 and meta["quantized_nodes"] == meta["quantizable_nodes"] - 2
    assert meta["quantize_linear_nodes"] < full.metadata["quantize.int8"]["quantize_linear_nodes"]
    assert meta["scheme"] == "u8u8"
    # The first conv is kept in float: the graph input feeds a float Conv, not a QuantizeLinear.
    g = onnx.load(str(q.path / "model.onnx")).graph
    first = next(n for n in g.node if "input" in n.input)
    assert first.op_type == "Conv"
    assert _ort_top1(cnn_onnx, digits) - _ort_top1(q, digits) <= 0.02
    e = _quantize(cnn_onnx, QuantizeInt8(calibration="entropy", samples=16), digits, cache)
    assert "QuantizeLinear" in _ops(e)


def test_skip_unknown_node_is_refused(cnn_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    with pytest.raises(RecipeError, match="skip entry 'no_such_conv' selects no node of the model; closest names"):
        _quantize(cnn_onnx, QuantizeInt8(skip=("no_such_conv",), samples=16), digits, cache)


class _Outlier(nn.Module):
    """The digits CNN with an extra linear pair whose middle activation has one huge channel.

    Float outputs are unchanged; per-tensor INT8 of that activation wipes out the other channels.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.features = base.features
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 10)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(64))
            self.a.bias.zero_()
            self.a.weight[0] *= 1e4
            self.b.weight.copy_(base.classifier.weight)
            self.b.bias.copy_(base.classifier.bias)
            self.b.weight[:, 0] *= 1e-4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(torch.flatten(self.features(x), 1)))


def test_accuracy_control_keeps_sensitive_layers_in_float(cnn: nn.Module, digits: DataBundle, cache: Cache) -> None:
    import copy

    model = _Outlier(copy.deepcopy(cnn)).eval()
    assert top1(model, digits, digits.val) == pytest.approx(top1(cnn, digits, digits.val), abs=0.01)
    onnx_art = _run(model, [ExportOnnx()], None, cache)[0]
    # Plain PTQ breaks the model: without labels the fidelity guard (per-sample cosine) refuses it first ...
    with pytest.raises(AccuracyError, match=r"per-sample cosine .* mean"):
        _quantize(onnx_art, QuantizeInt8(samples=32), digits, cache)
    # ... and with the guard off, the parity check against the float input still does ...
    with pytest.raises(PassError, match=r"differs from its input model beyond the tolerance: cosine 0\.\d+ < 0\.98"):
        _quantize(onnx_art, QuantizeInt8(samples=32, min_sample_cosine=None), digits, cache)
    # ... unless both are lowered on purpose (here: to show what accuracy control recovers).
    plain = _quantize(onnx_art, QuantizeInt8(samples=32, min_sample_cosine=None, min_cosine=0.0, min_agreement=0.0),
                      digits, cache)
    fp = _ort_top1(onnx_art, digits)
    assert fp - _ort_top1(plain, digits) > 0.05, "the outlier should break plain PTQ"
    ctl = _quantize(onnx_art, QuantizeInt8(samples=32, max_accuracy_drop=0.01), digits, cache)
    ac = ctl.metadata["quantize.int8"]["accuracy_control"]
    assert ac["kept_by_control"], ac
    assert set(ac["kept_by_control"]) <= set(ctl.metadata["quantize.int8"]["kept_float"])
    assert fp - _ort_top1(ctl, digits) <= 0.01 + 1e-9
    assert any("accuracy control kept" in n for n in ctl.metadata["quantize.int8"]["notes"])
    assert "QuantizeLinear" in _ops(ctl)


def test_int8_refuses_without_data(cnn_onnx: Artifact, cache: Cache) -> None:
    with pytest.raises(PassError, match="set `data`"):
        _quantize(cnn_onnx, QuantizeInt8(), None, cache)


def test_int8_refuses_nan_calibration_naming_the_sample(cnn_onnx: Artifact, digits: DataBundle,
                                                       cache: Cache) -> None:
    x = digits.calib.x.copy()
    x[5, 0, 3, 3] = np.nan
    bad = dataclasses.replace(digits, calib=Split(x, digits.calib.y))
    with pytest.raises(InputError, match="sample 5 contains NaN or Inf"):
        _quantize(cnn_onnx, QuantizeInt8(samples=16), bad, cache)
    x2 = digits.calib.x.copy()
    x2[2] = np.inf
    with pytest.raises(InputError, match="sample 2"):
        _quantize(cnn_onnx, QuantizeInt8(samples=16), dataclasses.replace(digits, calib=Split(x2, None)), cache)


def test_int8_refuses_too_few_calibration_samples(cnn_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    n = len(digits.calib)
    # More samples asked than the split holds: the whole split is used, as for token data, and the notes say so.
    out = _quantize(cnn_onnx, QuantizeInt8(samples=n + 1), digits, cache)
    assert f"calibrated on {n} samples of {digits.name}" in out.metadata["quantize.int8"]["notes"]
    tiny = dataclasses.replace(digits, calib=Split(digits.calib.x[:4], digits.calib.y[:4]))
    with pytest.raises(InputError, match="fewer than the minimum"):
        _quantize(cnn_onnx, QuantizeInt8(samples=8), tiny, cache)
    with pytest.raises(ValidationError):
        QuantizeInt8(samples=2)


class _NoWeights(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(torch.relu(x), 1)[:, :10]


def test_refuses_model_without_quantizable_layers(digits: DataBundle, cache: Cache) -> None:
    art = _run(_NoWeights(), [ExportOnnx()], None, cache)[0]
    with pytest.raises(PassError, match="no quantizable layers"):
        _quantize(art, QuantizeInt8(samples=16), digits, cache)
    with pytest.raises(PassError, match="no MatMul/Gemm"):
        _quantize(art, QuantizeDynamic(), None, cache)
    with pytest.raises(PassError, match="no MatMul"):
        _quantize(art, QuantizeWeightOnly(), None, cache)


def test_simulated_agreement_with_a_target_runner(cnn_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget

    q = _quantize(cnn_onnx, QuantizeInt8(samples=64), digits, cache)
    target = OnnxRuntimeTarget(OnnxRuntimeConfig())
    ctx = PassContext(cache=cache, progress=False)
    runner = target.runner(target.compile(q, ctx), threads=1)
    rep = simulated_agreement(q, runner.infer, digits, max_samples=64, batch=8)
    assert not rep["flagged"] and rep["agreement"] >= 0.98 and rep["samples"] == 64
    assert "top1_deployed" in rep and "top1_simulated" in rep
    # A deployed engine that computes something else is flagged.
    float_sess = ort_session(cnn_onnx.path / "model.onnx")

    def broken(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [-float_sess.run(None, feeds)[0]]

    assert simulated_agreement(q, broken, digits, max_samples=32, batch=8)["flagged"]
    rnd = simulated_agreement(q, runner.infer, None, max_samples=4)
    assert rnd["split"] == "random" and rnd["samples"] == 4


@pytest.fixture(scope="session")
def transformer_onnx(session_cache: Cache) -> Artifact:
    torch.manual_seed(0)
    return _run(zoo.build("transformer").eval(), [ExportOnnx()], None, session_cache)[0]


def _cos_vs(ref: Artifact, got: Artifact, x: np.ndarray) -> float:
    a = ort_session(ref.path / "model.onnx").run(None, {"input": x})[0].ravel()
    b = ort_session(got.path / "model.onnx").run(None, {"input": x})[0].ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_dynamic_int8_on_transformer(transformer_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    q = _quantize(transformer_onnx, QuantizeDynamic(), None, cache)
    assert "MatMulInteger" in _ops(q) and "DynamicQuantizeLinear" in _ops(q)
    assert q.metadata["quantize.dynamic"]["integer_nodes"] >= 12
    assert _cos_vs(transformer_onnx, q, digits.adapt(digits.val.x[:32]).numpy()) > 0.99


def test_smoothquant_static_int8_on_transformer(transformer_onnx: Artifact, digits: DataBundle,
                                                cache: Cache) -> None:
    q = _quantize(transformer_onnx, QuantizeInt8(smoothquant=True, samples=32), digits, cache)
    sq = q.metadata["quantize.int8"]["smoothquant"]
    assert sq["smoothed_layernorms"] == 4 and sq["smoothed_matmuls"] == 8  # norm1 -> q,k,v and norm2 -> fc1, x2
    assert _cos_vs(transformer_onnx, q, digits.adapt(digits.val.x[:32]).numpy()) > 0.98


def test_fp16_keeps_float32_io_and_says_precision(cnn_onnx: Artifact, digits: DataBundle, cache: Cache) -> None:
    q = _quantize(cnn_onnx, QuantizeFp16(), None, cache)
    g = onnx.load(str(q.path / "model.onnx")).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.initializer)
    assert q.known_facts().precision == "fp16" and q.metadata["quantize.fp16"]["precision"] == "fp16"
    assert any("ONNX Runtime's CPU provider" in n for n in q.metadata["quantize.fp16"]["notes"])
    assert 0 <= q.metadata["quantize.fp16"]["ort_cpu_fp16_initializers"] <= q.metadata["quantize.fp16"][
        "fp16_initializers"]
    assert _ort_top1(cnn_onnx, digits) - _ort_top1(q, digits) <= 0.01


def test_weight_only_int4_and_int8(transformer_onnx: Artifact, digits: DataBundle, cnn_onnx: Artifact,
                                   cache: Cache) -> None:
    x = digits.adapt(digits.val.x[:16]).numpy()
    q4 = _quantize(transformer_onnx, QuantizeWeightOnly(bits=4, group_size=32), None, cache)
    assert _ops(q4).count("MatMulNBits") == 12
    assert q4.known_facts().required_ops == ("com.microsoft:MatMulNBits",)
    assert q4.known_facts().precision == "int4" and q4.known_facts().quantization == "weight_only"
    q8 = _quantize(transformer_onnx, QuantizeWeightOnly(bits=8, group_size=16), None, cache)
    assert _ops(q8).count("MatMulNBits") == 12
    assert _cos_vs(transformer_onnx, q8, x) > _cos_vs(transformer_onnx, q4, x) > 0.95
    qq = _quantize(transformer_onnx, QuantizeWeightOnly(format="qdq"), None, cache)
    assert "MatMulNBits" not in _ops(qq) and "DequantizeLinear" in _ops(qq)
    with pytest.raises(PassError, match="Gemm"):
        _quantize(cnn_onnx, QuantizeWeightOnly(), None, cache)
    with pytest.raises(ValidationError, match="power of two"):
        QuantizeWeightOnly(group_size=48)
    with pytest.raises(ValidationError, match="bits=8 needs"):
        QuantizeWeightOnly(bits=8, format="qdq")


def test_qat_exports_qdq_and_rebuilds_from_disk_per_isa(forced_isa: str, cnn: nn.Module, digits: DataBundle,
                                                         cache: Cache) -> None:
    out, recs = _run(cnn, [QuantizeQat(epochs=1, lr=1e-4), QAT_EXPORT], digits, cache)
    with pytest.raises(PassError, match="already quantized"):
        _quantize(out, QuantizeInt8(samples=16), digits, cache)
    qat_art = recs[0].artifact
    meta = qat_art.metadata["quantize.qat"]
    scheme = SCHEME_FOR_ISA[forced_isa]
    assert meta["scheme"] == scheme and "forced by COMPRESS_ISA" in meta["scheme_reason"]
    assert meta["folded_bn"] == 3 and len(meta["quantized_modules"]) == 4
    assert meta["top1_float"] - meta["top1_fakequant_after"] <= 0.02
    ops = _ops(out)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "BatchNormalization" not in ops
    # Weights are quantized offline and stored as INT8 initializers: 7 bits under reduce-range, 8 otherwise.
    weights = weight_ints(out)
    assert len(weights) == 4
    lo, hi = (-64, 63) if scheme == "u8s8_reduce_range" else (-128, 127)
    assert all(w.min() >= lo and w.max() <= hi for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == hi  # the per-channel scale puts one weight at the edge
    # The simulated model (reference Q/DQ kernels) is the fake-quant model: top-1 within 0.5 points.
    sim = ort_session(out.path / "model.onnx", optimize=False)
    x = digits.adapt(digits.val.x).numpy()
    top1_sim = float((sim.run(None, {"input": x})[0].argmax(1) == digits.val.y).mean())
    assert abs(top1_sim - meta["top1_fakequant_after"]) <= 0.005
    if host_int8_kernels_exact(scheme):
        # Deployed integer kernels (QLinearConv...) on this CPU: within 0.5 points of the simulation.
        assert abs(_ort_top1(out, digits) - meta["top1_fakequant_after"]) <= 0.005
        deployed = session_infer(ort_session(out.path / "model.onnx"))
        rep = simulated_agreement(out, deployed, digits, max_samples=64, batch=16)
        assert not rep["flagged"]
    # Rebuilt from disk (no live object): same structure and outputs.
    fresh = Artifact.load(qat_art.path)
    rebuilt = load_torch(fresh)
    assert sum(isinstance(m, QuantWrap) for m in rebuilt.modules()) == 4
    xs = digits.adapt(digits.val.x[:8])
    with torch.no_grad():
        assert torch.equal(rebuilt(xs), load_torch(qat_art)(xs))


def test_qat_eval_weight_tracks_training_steps() -> None:
    """After an optimizer step, eval mode quantizes the new weights (not those of the last forward)."""
    torch.manual_seed(0)
    w = QuantWrap(nn.Linear(4, 3), -64, 63)
    x = torch.randn(2, 4)
    w.train()
    w(x).sum().backward()
    with torch.no_grad():
        w.module.weight.add_(0.5)
    w.eval()
    scale = w.w_scale.reshape(-1, 1)
    assert torch.equal(w.w_int, torch.round(w.module.weight / scale).clamp(-64, 63).to(torch.int8))
    with pytest.raises(ValueError, match="within INT8"):
        QuantWrap(nn.Linear(4, 3), -200, 127)


def test_qat_with_distillation_before_and_after_per_isa(forced_isa: str, cnn: nn.Module, digits: DataBundle,
                                                         cache: Cache) -> None:
    from compress.passes.distill import Distill

    out, recs = _run(cnn, [QuantizeQat(epochs=0), Distill(epochs=1, patience=0), QAT_EXPORT], digits, cache)
    student = recs[1].artifact
    assert sum(isinstance(m, QuantWrap) for m in load_torch(Artifact.load(student.path)).modules()) == 4
    assert "QuantizeLinear" in _ops(out)
    out2, _ = _run(cnn, [Distill(epochs=1, patience=0), QuantizeQat(epochs=1), QAT_EXPORT], digits, cache)
    assert "QuantizeLinear" in _ops(out2)
    if host_int8_kernels_exact(SCHEME_FOR_ISA[forced_isa]):
        assert abs(_ort_top1(out2, digits) - top1(cnn, digits, digits.val)) <= 0.03


def test_qat_refusals(cnn: nn.Module, digits: DataBundle, cache: Cache) -> None:
    with pytest.raises(PassError, match="set `data`"):
        _run(cnn, [QuantizeQat()], None, cache)
    unlabelled = dataclasses.replace(digits, labelled=False)
    with pytest.raises(PassError, match="labelled"):
        _run(cnn, [QuantizeQat()], unlabelled, cache)
    with pytest.raises(PassError, match="no Conv2d or Linear"):
        _run(_NoWeights(), [QuantizeQat()], digits, cache)
    with pytest.raises(CompressError, match="ran before"):
        _run(cnn, [QuantizeQat(epochs=0), QuantizeQat(epochs=0)], digits, cache)


@pytest.mark.slow
def test_qat_legacy_exporter(cnn: nn.Module, digits: DataBundle, cache: Cache) -> None:
    out, _ = _run(cnn, [QuantizeQat(epochs=0), ExportOnnx(dynamo=False, atol=0.1)], digits, cache)
    assert "QuantizeLinear" in _ops(out)
    assert _ort_top1(out, digits) >= top1(cnn, digits, digits.val) - 0.03


@pytest.mark.slow
def test_int8_on_resnet18_zoo_model(tmp_path: Path) -> None:
    data = load_data(DataSpec(source="builtin:digits", max_val_samples=32), (1, 3, 64, 64))
    torch.manual_seed(0)
    m = zoo.build("resnet18", (1, 3, 64, 64)).eval()
    cache = Cache(tmp_path)
    root = module_artifact(m, (1, 3, 64, 64), cache)
    ctx = PassContext(cache=cache, data=data, progress=False, original=root)
    out, _ = PassManager([ExportOnnx(), QuantizeInt8(samples=16)]).run(root, ctx)
    assert out.metadata["quantize.int8"]["quantizable_nodes"] == 21
    assert not out.metadata["quantize.int8"]["parity"]["flagged"]
