"""The TensorRT target: everything that does not need a GPU, plus GPU tests that skip with the reason.

The build/run orchestration is exercised with TensorRT's two GPU-bound calls (environment probe,
engine build) replaced by fakes, so engine caching, sidecar checks and trust rules are tested here;
the real TensorRT calls are held against the API by mypy with the tensorrt-stubs package instead
(see mypy-tensorrt.ini).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from compress.targets import _trt_cache as tc
from compress.targets import tensorrt_engine as te
from compress.targets.tensorrt_engine import TensorRTConfig, TensorRTTarget
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from compress.core.artifact import Artifact, InputSpec, sha256_files
from compress.core.cache import Cache
from compress.core.capabilities import Facts
from compress.core.manager import PassContext
from compress.core.protocols import DeviceClockRunner
from compress.core.registry import make_target, targets
from compress.errors import BuildError, InputError, RecipeError, TargetUnavailable
from compress.stages.recipe import parse_pipeline, recipe_from_dict

ENV = {"tensorrt_version": "10.13.0.35", "gpu": "NVIDIA H200", "compute_capability": "9.0", "cuda_driver": 12080}


# -- helpers -----------------------------------------------------------------------------------------


def onnx_artifact(folder: Path, *, qdq: bool = False, dynamic: bool = True, metadata: dict | None = None) -> Artifact:
    """A tiny ONNX model y = x @ W (x: [batch, 4]), optionally with Q/DQ on its input."""
    folder.mkdir(parents=True, exist_ok=True)
    batch: Any = "batch" if dynamic else 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    inits = [w]
    nodes = []
    src = "x"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q0"),
                  helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq0")]
        src = "xd"
    nodes.append(helper.make_node("MatMul", [src, "W"], ["y"], name="mm"))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    return Artifact("onnx", folder, sha256_files(folder), (InputSpec("x", (1, 4)),), metadata=metadata or {})


def fake_engine_folder(folder: Path, **sidecar: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tc.ENGINE).write_bytes(b"not really an engine")
    fields = {"tensorrt_version": ENV["tensorrt_version"], "compute_capability": ENV["compute_capability"],
              "gpu": ENV["gpu"], "settings": {"profiles": {}}}
    fields.update(sidecar)
    tc.write_sidecar(folder, **fields)
    return folder


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Pretend TensorRT and a GPU exist; record engine builds instead of running TensorRT."""
    env = dict(ENV)
    builds: list[dict[str, Any]] = []

    def fake_build(onnx_path: Path, settings: dict, timing_cache: Path | None, out_engine: Path,
                   log: Any = None) -> dict[str, Any]:
        builds.append({"settings": settings, "timing_cache": timing_cache})
        out_engine.write_bytes(json.dumps([str(onnx_path.name), settings, env]).encode())
        if timing_cache is not None:
            tc.save_bytes_atomic(timing_cache, b"timing")
        return {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}], "build_s": 0.0, "warnings": []}

    monkeypatch.setattr(TensorRTTarget, "_environment", lambda self: dict(env))
    monkeypatch.setattr(te, "build_engine", fake_build)
    return {"env": env, "builds": builds}


def ctx_for(cache: Cache) -> PassContext:
    return PassContext(cache=cache, progress=False)


# -- availability --------------------------------------------------------------------------------------

_REAL_TRT = te.import_tensorrt()[0] is not None


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import tensorrt` fail, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Neither cuda-python nor a CUDA torch: no device can be found."""
    import torch

    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    te.cuda_device.cache_clear()
    yield
    te.cuda_device.cache_clear()


@pytest.mark.skipif(_REAL_TRT, reason="TensorRT is installed here; this checks a machine with only the stubs")
def test_module_imports_without_tensorrt_and_stubs_are_not_a_runtime() -> None:
    # The stubs package leaves an importable namespace package named tensorrt: it must not count.
    mod = importlib.import_module("compress.targets.tensorrt_engine")
    assert hasattr(mod, "TensorRTTarget")
    trt_mod, reason = te.import_tensorrt()
    assert trt_mod is None
    assert reason is not None and reason.startswith("tensorrt is not installed (")


def test_unavailable_reason_without_tensorrt(no_tensorrt: None) -> None:
    t = make_target(TensorRTConfig())
    reason = t.unavailable_reason()
    assert reason is not None and reason.startswith("tensorrt is not installed (")
    assert "pip install" in reason
    assert "tensorrt" in targets()
    fp = t.fingerprint()  # must not raise where TensorRT is absent (it is part of cache keys)
    assert fp["unavailable"] == reason


def _fake_trt(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    fake = type(sys)("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)


def test_unavailable_reason_without_cuda_device(monkeypatch: pytest.MonkeyPatch, no_cuda: None) -> None:
    _fake_trt(monkeypatch, "10.13.0.35")
    reason = TensorRTTarget(TensorRTConfig()).unavailable_reason()
    assert reason is not None and reason.startswith("no CUDA device (")


def test_old_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch, "8.6.1")
    _, reason = te.import_tensorrt()
    assert reason is not None and "8.6.1 is too old" in reason


def test_compile_says_unavailable(tmp_path: Path, no_tensorrt: None) -> None:
    cache = Cache(tmp_path / "cache")
    art = onnx_artifact(tmp_path / "m")
    t = TensorRTTarget(TensorRTConfig())
    with pytest.raises(TargetUnavailable, match="tensorrt is not installed"):
        t.compile(art, ctx_for(cache))


def test_cli_lists_tensorrt_as_unavailable(capsys: pytest.CaptureFixture[str], no_tensorrt: None) -> None:
    from compress.cli import main

    assert main(["targets"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tensorrt"))
    assert "unavailable: tensorrt is not installed" in line


# -- config / recipe validation -------------------------------------------------------------------------


@pytest.mark.parametrize("bad, msg", [
    ({"engine": "/tmp/x.engine"}, "allow_external_engine"),
    ({"precision": "fp16", "strongly_typed": True}, "strongly_typed"),
    ({"min_batch": 8, "max_batch": 4}, "min_batch"),
    ({"opt_batch": 64}, "opt_batch"),
    ({"optimization_level": 6}, "less than or equal to 5"),
    ({"workspace_mb": 0}, "greater than 0"),
    ({"precision": "int4"}, "'auto', 'fp32', 'fp16' or 'int8'"),
    ({"workspace": 1024}, "Extra inputs"),
])
def test_config_rejects_bad_settings(bad: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        TensorRTConfig(**bad)


def test_recipe_validation_names_key_and_allowed_values() -> None:
    _, tcfgs = parse_pipeline('-> tensorrt{precision="fp16",max_batch=8}')
    assert tcfgs[0] == TensorRTConfig(precision="fp16", max_batch=8)
    rec = {"model": {"source": "zoo:digits-cnn"}, "targets": [{"kind": "tensorrt", "precision": "int4"}]}
    with pytest.raises(RecipeError, match=r"targets\[1\] \(tensorrt\): key 'precision'"):
        recipe_from_dict(rec)
    rec["targets"] = [{"kind": "tensorrt", "engine": "downloaded.engine"}]
    with pytest.raises(RecipeError, match="native code"):
        recipe_from_dict(rec)
    rec["targets"] = [{"kind": "tensorrt", "max_shapes": {"x": [16, 4]}, "allow_external_engine": True}]
    assert recipe_from_dict(rec).targets[0].max_shapes == {"x": [16, 4]}


# -- profiles ------------------------------------------------------------------------------------------


def test_profile_dynamic_batch_from_graph() -> None:
    p = tc.derive_profiles([InputSpec("x", (1, 3, 8, 8))], {"x": [None, 3, 8, 8]}, max_batch=16)
    assert p["x"] == tc.Profile((1, 3, 8, 8), (1, 3, 8, 8), (16, 3, 8, 8))
    p = tc.derive_profiles([InputSpec("x", (4, 3, 8, 8))], {"x": [None, 3, 8, 8]}, min_batch=2, max_batch=16)
    assert p["x"].opt == (4, 3, 8, 8), "opt follows the recipe's batch"
    p = tc.derive_profiles([InputSpec("x", (1, 3, 8, 8))], {"x": [None, 3, 8, 8]}, min_batch=2, opt_batch=8)
    assert (p["x"].min[0], p["x"].opt[0], p["x"].max[0]) == (2, 8, 32)


def test_profile_static_graph_and_other_symbolic_dims() -> None:
    p = tc.derive_profiles([InputSpec("x", (1, 4))], {"x": [1, 4]})
    assert p["x"].min == p["x"].max == (1, 4)
    # a symbolic sequence dim takes the recipe's value unless overridden
    p = tc.derive_profiles([InputSpec("t", (1, 10))], {"t": [None, None]}, max_batch=4)
    assert p["t"] == tc.Profile((1, 10), (1, 10), (4, 10))
    p = tc.derive_profiles([InputSpec("t", (1, 10))], {"t": [None, None]},
                           min_shapes={"t": [1, 1]}, max_shapes={"t": [4, 128]})
    assert p["t"] == tc.Profile((1, 1), (1, 10), (4, 128))
    # without the graph every dim is taken as fixed
    assert tc.derive_profiles([InputSpec("x", (2, 4))], None)["x"] == tc.Profile((2, 4), (2, 4), (2, 4))


@pytest.mark.parametrize("kw, msg", [
    ({"max_shapes": {"nope": [4, 4]}}, r"names input\(s\) \['nope'\]"),
    ({"max_shapes": {"x": [4, 4, 1]}}, "has rank 3"),
    ({"max_shapes": {"x": [4, 5]}}, "ONNX graph fixes it to 4"),
    ({"min_shapes": {"x": [8, 4]}}, "min <= opt <= max at axis 0"),
    ({"min_shapes": {"x": [0, 4]}}, "dims must be >= 1"),
    ({"min_batch": 5, "max_batch": 2}, "min_batch <= max_batch"),
])
def test_profile_bad_overrides(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        tc.derive_profiles([InputSpec("x", (1, 4))], {"x": [None, 4]}, **kw)


def test_profile_rank_mismatch_between_graph_and_recipe() -> None:
    with pytest.raises(InputError, match="rank 3 in the ONNX graph"):
        tc.derive_profiles([InputSpec("x", (1, 4))], {"x": [None, 4, 4]})
    with pytest.raises(InputError, match=r"graph's inputs \['input'\] differ from the artifact's input specs"):
        tc.derive_profiles([InputSpec("x", (1, 4))], {"input": [None, 4]})


def test_profile_admits() -> None:
    p = tc.Profile((1, 4), (1, 4), (8, 4))
    assert p.admits((8, 4)) and not p.admits((9, 4)) and not p.admits((1, 4, 1))


# -- settings from the artifact ----------------------------------------------------------------------


def test_settings_from_onnx_artifact(tmp_path: Path) -> None:
    art = onnx_artifact(tmp_path / "m")
    s, _ = TensorRTTarget(TensorRTConfig(max_batch=8)).settings_for(art)
    assert s["precision"] == "fp32" and not s["strongly_typed"] and not s["sparse_weights"] and s["dynamic"]
    assert s["profiles"] == {"x": {"min": [1, 4], "opt": [1, 4], "max": [8, 4]}}
    s, _ = TensorRTTarget(TensorRTConfig()).settings_for(onnx_artifact(tmp_path / "s", dynamic=False))
    assert not s["dynamic"] and s["profiles"]["x"]["max"] == [1, 4]


def test_settings_int8_from_qdq_and_errors(tmp_path: Path) -> None:
    q = onnx_artifact(tmp_path / "q", qdq=True)
    s, _ = TensorRTTarget(TensorRTConfig()).settings_for(q)
    assert s["precision"] == "int8" and s["strongly_typed"] and s["qdq"]
    s, notes = TensorRTTarget(TensorRTConfig(precision="fp16")).settings_for(q)
    assert s["precision"] == "fp16" and not s["strongly_typed"] and any("FP16" in n for n in notes)
    with pytest.raises(BuildError, match=r"explicitly quantized \(2 Q/DQ nodes\)"):
        TensorRTTarget(TensorRTConfig(precision="fp32")).settings_for(q)
    with pytest.raises(BuildError, match="needs an explicitly quantized ONNX model"):
        TensorRTTarget(TensorRTConfig(precision="int8")).settings_for(onnx_artifact(tmp_path / "f"))


def test_settings_sparse_weights_follow_prune_2to4(tmp_path: Path) -> None:
    pruned = onnx_artifact(tmp_path / "p", metadata={"prune.2to4": {"pattern_ok": True}})
    pruned.facts = Facts(sparsity="2:4")  # what prune.2to4 records for every consumer
    s, notes = TensorRTTarget(TensorRTConfig()).settings_for(pruned)
    assert s["sparse_weights"] and any("SPARSE_WEIGHTS" in n for n in notes)
    s, _ = TensorRTTarget(TensorRTConfig(sparse_weights=False)).settings_for(pruned)
    assert not s["sparse_weights"]
    s, notes = TensorRTTarget(TensorRTConfig(sparse_weights=True)).settings_for(onnx_artifact(tmp_path / "d"))
    assert s["sparse_weights"] and any("prune.2to4 did not run" in n for n in notes)


@pytest.mark.slow
def test_settings_from_exported_zoo_model(tmp_path: Path) -> None:
    from compress.passes.export_onnx import ExportOnnx

    from compress import api
    from compress.inputs import zoo

    art = api.apply(zoo.build("digits-cnn", (1, 1, 8, 8)), ExportOnnx(), (1, 1, 8, 8), cache_dir=tmp_path)
    s, _ = TensorRTTarget(TensorRTConfig(max_batch=64)).settings_for(art)
    (prof,) = s["profiles"].values()
    assert prof == {"min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [64, 1, 8, 8]}


# -- cache key -----------------------------------------------------------------------------------------


def test_engine_key_changes_with_each_ingredient() -> None:
    settings = {"precision": "fp16", "optimization_level": 3, "profiles": {"x": {"min": [1], "opt": [1], "max": [8]}}}
    base = tc.engine_key("a" * 64, settings, "10.13.0.35", "9.0")
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == tc.engine_key("a" * 64, dict(reversed(list(settings.items()))), "10.13.0.35", "9.0")
    variants = [
        tc.engine_key("b" * 64, settings, "10.13.0.35", "9.0"),
        tc.engine_key("a" * 64, {**settings, "precision": "fp32"}, "10.13.0.35", "9.0"),
        tc.engine_key("a" * 64, {**settings, "optimization_level": 5}, "10.13.0.35", "9.0"),
        tc.engine_key("a" * 64, {**settings, "profiles": {"x": {"min": [1], "opt": [1], "max": [16]}}},
                      "10.13.0.35", "9.0"),
        tc.engine_key("a" * 64, settings, "10.14.1.48", "9.0"),
        tc.engine_key("a" * 64, settings, "10.13.0.35", "8.9"),
    ]
    assert len({base, *variants}) == len(variants) + 1


# -- foreign and tampered engines ------------------------------------------------------------------------


def test_foreign_tensorrt_version_is_refused(tmp_path: Path) -> None:
    folder = fake_engine_folder(tmp_path / "e", tensorrt_version="10.3.0.26")
    with pytest.raises(tc.ForeignEngine, match=r"TensorRT 10\.3\.0\.26 \(this machine has TensorRT 10\.13\.0\.35\)"
                       r".*must be rebuilt"):
        tc.check_engine(folder, ENV["tensorrt_version"], ENV["compute_capability"])


def test_foreign_gpu_is_refused(tmp_path: Path) -> None:
    folder = fake_engine_folder(tmp_path / "e", compute_capability="8.6", gpu="NVIDIA A10")
    with pytest.raises(tc.ForeignEngine, match=r"compute capability 8\.6 \(NVIDIA A10; this GPU is 9\.0\)"):
        tc.check_engine(folder, ENV["tensorrt_version"], ENV["compute_capability"])
    assert tc.check_engine(folder, ENV["tensorrt_version"], "8.6")["gpu"] == "NVIDIA A10"


def test_tampered_or_unrecorded_engine_is_refused(tmp_path: Path) -> None:
    folder = fake_engine_folder(tmp_path / "e")
    (folder / tc.ENGINE).write_bytes(b"swapped")
    with pytest.raises(InputError, match="does not match the SHA-256"):
        tc.check_engine(folder, ENV["tensorrt_version"], ENV["compute_capability"])
    (folder / tc.SIDECAR).unlink()
    with pytest.raises(InputError, match="not an engine built by the tensorrt target"):
        tc.check_engine(folder, ENV["tensorrt_version"], ENV["compute_capability"])


def test_runner_refuses_foreign_engine_in_cache(tmp_path: Path, fake_gpu: dict[str, Any]) -> None:
    cache = Cache(tmp_path / "cache")
    staged = fake_engine_folder(cache.new_dir("tensorrt"), tensorrt_version="10.0.1.6")
    art = cache.put("k" * 64, Artifact("compiled", staged, sha256_files(staged), (InputSpec("x", (1, 4)),)))
    with pytest.raises(tc.ForeignEngine, match=r"TensorRT 10\.0\.1\.6 .*must be rebuilt"):
        TensorRTTarget(TensorRTConfig()).runner(art)


def test_runner_refuses_engine_outside_the_cache(tmp_path: Path, fake_gpu: dict[str, Any]) -> None:
    folder = fake_engine_folder(tmp_path / "downloads" / "resnet")
    art = Artifact("compiled", folder, sha256_files(folder), (InputSpec("x", (1, 4)),))
    with pytest.raises(InputError, match="not in this tool's cache.*native code"):
        TensorRTTarget(TensorRTConfig()).runner(art)
    # allowed explicitly, the provenance checks still run (here: the foreign-version check)
    (folder / tc.SIDECAR).write_text(json.dumps({**json.loads((folder / tc.SIDECAR).read_text()),
                                                 "tensorrt_version": "9.9"}))
    with pytest.raises(tc.ForeignEngine):
        TensorRTTarget(TensorRTConfig(allow_external_engine=True)).runner(art)


def test_runner_outside_cache_checked_before_device(tmp_path: Path, no_tensorrt: None) -> None:
    folder = fake_engine_folder(tmp_path / "elsewhere")
    art = Artifact("compiled", folder, sha256_files(folder), (InputSpec("x", (1, 4)),))
    with pytest.raises(InputError, match="not in this tool's cache"):
        TensorRTTarget(TensorRTConfig()).runner(art)
    with pytest.raises(TargetUnavailable, match="tensorrt is not installed"):
        TensorRTTarget(TensorRTConfig(allow_external_engine=True)).runner(art)


# -- compile orchestration (TensorRT build faked) ----------------------------------------------------------


def test_compile_builds_once_then_reuses_engine_cache(tmp_path: Path, fake_gpu: dict[str, Any]) -> None:
    cache = Cache(tmp_path / "cache")
    art = onnx_artifact(tmp_path / "m")
    t = TensorRTTarget(TensorRTConfig(max_batch=8))
    c1 = t.compile(art, ctx_for(cache))
    assert len(fake_gpu["builds"]) == 1 and not c1.metadata["tensorrt"]["engine_cache_hit"]
    assert c1.metadata["dynamic_batch"] is True
    side = tc.read_sidecar(c1.path)
    assert side["tensorrt_version"] == ENV["tensorrt_version"] and side["compute_capability"] == "9.0"
    assert side["key"] == tc.engine_key(art.digest, side["settings"], ENV["tensorrt_version"], "9.0")
    timing = fake_gpu["builds"][0]["timing_cache"]
    assert timing == cache.root / "tensorrt" / "timing" / "trt-10.13.0.35-sm90.cache" and timing.read_bytes()
    # a config that resolves to the same build (timing cache off) reuses the engine
    c2 = TensorRTTarget(TensorRTConfig(max_batch=8, timing_cache=False)).compile(art, ctx_for(cache))
    assert len(fake_gpu["builds"]) == 1 and c2.metadata["tensorrt"]["engine_cache_hit"]
    assert (c2.path / tc.ENGINE).read_bytes() == (c1.path / tc.ENGINE).read_bytes()
    # another GPU architecture or build setting gives another engine
    fake_gpu["env"]["compute_capability"] = "8.9"
    t.compile(art, ctx_for(cache))
    TensorRTTarget(TensorRTConfig(max_batch=16)).compile(art, ctx_for(cache))
    assert len(fake_gpu["builds"]) == 3


def test_compile_refuses_foreign_engine_planted_in_cache(tmp_path: Path, fake_gpu: dict[str, Any]) -> None:
    cache = Cache(tmp_path / "cache")
    art = onnx_artifact(tmp_path / "m")
    t = TensorRTTarget(TensorRTConfig())
    settings, _ = t.settings_for(art)
    key = tc.engine_key(art.digest, settings, ENV["tensorrt_version"], ENV["compute_capability"])
    fake_engine_folder(cache.root / "tensorrt" / "engines" / key, compute_capability="7.5")
    with pytest.raises(tc.ForeignEngine, match="must be rebuilt"):
        t.compile(art, ctx_for(cache))


def test_compile_failure_leaves_no_engine(tmp_path: Path, fake_gpu: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*a: Any, **k: Any) -> dict[str, Any]:
        raise BuildError("TensorRT 10.13.0.35's ONNX parser rejected ...")

    monkeypatch.setattr(te, "build_engine", broken)
    cache = Cache(tmp_path / "cache")
    with pytest.raises(BuildError):
        TensorRTTarget(TensorRTConfig()).compile(onnx_artifact(tmp_path / "m"), ctx_for(cache))
    assert list((cache.root / "tensorrt" / "engines").iterdir()) == []


def test_compiled_artifact_in_cache_passes_trust_check(tmp_path: Path, fake_gpu: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "cache")
    t = TensorRTTarget(TensorRTConfig())
    compiled = t.compile(onnx_artifact(tmp_path / "m"), ctx_for(cache))
    stored = cache.put("c" * 64, compiled)
    # a later process knows no trusted roots: a finished cache entry is trusted by its layout
    monkeypatch.setattr(te, "_TRUSTED_ROOTS", set())
    assert tc.is_cache_entry(stored.path)
    side = t.check_trusted(stored)
    assert side["engine_sha256"] == tc.sha256_file(stored.path / tc.ENGINE) and "external" not in side


def test_external_engine_import(tmp_path: Path, fake_gpu: dict[str, Any]) -> None:
    cache = Cache(tmp_path / "cache")
    art = onnx_artifact(tmp_path / "m")
    src = fake_engine_folder(tmp_path / "prebuilt")
    t = TensorRTTarget(TensorRTConfig(engine=str(src / tc.ENGINE), allow_external_engine=True))
    compiled = t.compile(art, ctx_for(cache))
    assert fake_gpu["builds"] == [] and compiled.metadata["tensorrt"]["external"]
    assert tc.read_sidecar(compiled.path)["external_source"] == str((src / tc.ENGINE).resolve())
    # an external engine in the artifact is refused by a target that does not allow them
    with pytest.raises(InputError, match="external engine"):
        TensorRTTarget(TensorRTConfig()).check_trusted(compiled)
    foreign = fake_engine_folder(tmp_path / "foreign", tensorrt_version="10.1.0.27")
    t2 = TensorRTTarget(TensorRTConfig(engine=str(foreign), allow_external_engine=True))
    with pytest.raises(tc.ForeignEngine):
        t2.compile(art, ctx_for(cache))


# -- parity and a verified engine cache (TensorRT faked) ----------------------------------------------------


def test_parity_precision_follows_the_build_settings(tmp_path: Path) -> None:
    fp32 = onnx_artifact(tmp_path / "f")
    assert TensorRTTarget(TensorRTConfig()).parity_precision(fp32, "fp32") == "fp16"  # TF32 on by default
    assert TensorRTTarget(TensorRTConfig(tf32=False)).parity_precision(fp32, "fp32") == "fp32"
    assert TensorRTTarget(TensorRTConfig(tf32=False, precision="fp16")).parity_precision(fp32, "fp32") == "fp16"
    assert TensorRTTarget(TensorRTConfig(tf32=False)).parity_precision(fp32, "fp16") == "fp16"
    qdq = onnx_artifact(tmp_path / "q", qdq=True)
    assert TensorRTTarget(TensorRTConfig()).parity_precision(qdq, "int8") == "int8"


def test_corrupted_engine_in_the_engine_cache_is_rebuilt_with_a_note(tmp_path: Path,
                                                                     fake_gpu: dict[str, Any]) -> None:
    cache = Cache(tmp_path / "cache")
    art = onnx_artifact(tmp_path / "m")
    t = TensorRTTarget(TensorRTConfig())
    t.compile(art, ctx_for(cache))
    (entry,) = (cache.root / "tensorrt" / "engines").iterdir()
    good = (entry / tc.ENGINE).read_bytes()
    (entry / tc.ENGINE).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    again = t.compile(art, ctx_for(cache))
    assert len(fake_gpu["builds"]) == 2 and not again.metadata["tensorrt"]["engine_cache_hit"]
    assert (again.path / tc.ENGINE).read_bytes() == good
    assert any(entry.name[:16] in n and "rebuilt" in n for n in cache.notes)


class _NumpyEngine(DeviceClockRunner):
    """Stands in for TrtRunner (a device-timing runner, with its declared defaults): y = x @ W with W read from
    the ONNX model, optionally built wrong."""

    def __init__(self, onnx_path: Path, error: float) -> None:
        w = next(numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer if t.name == "W")
        self.w = w.copy()
        self.w[0, 0] += error
        self.input_names = ["x"]
        self.device_ms: list[float] = []  # TensorRT's runners time on the device (TargetCaps.device_timing)

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.device_ms.append(0.01)
        return [feeds["x"] @ self.w]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("error", [0.0, 0.5])
def test_pipeline_checks_tensorrt_parity(tmp_path: Path, fake_gpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                         error: float) -> None:
    """The tensorrt cell goes through the same parity check as every target (TF32: FP16 tolerance)."""
    from compress.stages.pipeline import run

    art = onnx_artifact(tmp_path / "m")
    monkeypatch.setattr(TensorRTTarget, "unavailable_reason", lambda self: None)
    monkeypatch.setattr(TensorRTTarget, "runner",
                        lambda self, compiled, threads=0: _NumpyEngine(art.path / "model.onnx", error))
    rec = recipe_from_dict({"name": "t", "model": {"source": str(art.path / "model.onnx")},
                            "measure": {"batch_sizes": [1], "warmup": 0, "min_runs": 2, "min_time_s": 0.0},
                            "targets": [{"kind": "tensorrt"}, {"kind": "onnxruntime"}]})
    rep = run(rec, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    cell = next(c for c in rep.results if c.target == "tensorrt")
    assert cell.parity is not None
    assert cell.parity.precision == "fp16" and cell.parity.inputs == "random inputs"
    if error == 0.0:
        assert cell.status == "ok" and cell.parity.ok and (cell.parity.max_abs_diff or 0.0) < 1e-5
    else:
        assert cell.status == "failed" and (cell.reason or "").startswith("parity: max abs diff")
        assert "fp16 tolerance" in (cell.reason or "")


# -- parser rejections -----------------------------------------------------------------------------------


def test_parser_rejections_list_every_node_and_version() -> None:
    msg = tc.format_rejections(
        "10.13.0.35", Path("/m/model.onnx"),
        [{"node": 3, "name": "nms", "op": "NonMaxSuppression", "desc": "unsupported op"}],
        [(3, "nms", "NonMaxSuppression"), (7, "roi", "RoiAlignX"), (9, "", "CustomOp")])
    assert msg.startswith("TensorRT 10.13.0.35's ONNX parser rejected /m/model.onnx (3 problem(s)")
    for part in ("node 3 'nms' (NonMaxSuppression): unsupported op", "node 7 'roi' (RoiAlignX)",
                 "node 9 '<unnamed>' (CustomOp)", "ops: CustomOp, NonMaxSuppression, RoiAlignX"):
        assert part in msg


# -- on a GPU -------------------------------------------------------------------------------------------

_GPU_REASON = TensorRTTarget(TensorRTConfig()).unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_REASON is not None, reason=f"tensorrt target unavailable: {_GPU_REASON}")
def test_gpu_build_and_run_matches_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    cache = Cache(tmp_path / "cache")
    art = onnx_artifact(tmp_path / "m")
    t = TensorRTTarget(TensorRTConfig(max_batch=8, tf32=False))
    compiled = cache.put("g" * 64, t.compile(art, ctx_for(cache)))
    runner = t.runner(compiled)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    got = runner.infer({"x": x})[0]
    ref = ort.InferenceSession(str(art.path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert runner.device_ms[-1] > 0 and runner.host_ms[-1] >= runner.device_ms[-1]
    with pytest.raises(InputError, match="outside the engine's optimization profile"):
        runner.infer({"x": np.zeros((9, 4), np.float32)})
    runner.close()
