"""The tvm target: parity, the tuning database (reuse, foreign records), bad input, the deployed library."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

from compress.targets._tvm_tuning import TuningDatabase, TvmDatabaseWarning
from compress.targets.tvm_compiler import TvmConfig, TvmTarget, host_target_json, make_target
from pydantic import ValidationError

from compress.core.artifact import Artifact, InputSpec, sha256_files
from compress.core.cache import Cache
from compress.core.manager import PassContext
from compress.errors import BuildError, InputError, RecipeError, TargetUnavailable
from tests.tvm_helpers import check_library_elf, run_in_fresh_process

SHAPE = (1, 1, 8, 8)


def _onnx_artifact(cache: Cache, model_path: Path) -> Artifact:
    d = cache.new_dir("onnx")
    shutil.copy(model_path, d / "model.onnx")
    return Artifact("onnx", d, sha256_files(d), (InputSpec("input", SHAPE),))


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo digits CNN (random weights, fixed seed) exported to ONNX once for the module."""
    import torch
    from compress.passes.export_onnx import ExportOnnx

    from compress.api import apply
    from compress.inputs import zoo

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("digits")
    art = apply(zoo.build("digits-cnn", SHAPE).eval(), ExportOnnx(), input_shape=SHAPE, data=None,
                cache_dir=root / "cache")
    out = root / "digits.onnx"
    shutil.copy(art.path / "model.onnx", out)
    return out


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(cache=Cache(tmp_path / "cache"), progress=True, seed=0)


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _ort(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def tuned(digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small tuned build (8 trials), then the same compile again against the same database."""
    root = tmp_path_factory.mktemp("tuned")
    db = root / "tvm-db"
    cfg = TvmConfig(tuning_trials=8, database=str(db))
    ctx = PassContext(cache=Cache(root / "cache"), seed=0)
    art = _onnx_artifact(ctx.cache, digits_onnx)
    first = TvmTarget(cfg).compile(art, ctx)
    # A second run: new target object and context, another cache, same database (as a second recipe would).
    ctx2 = PassContext(cache=Cache(root / "cache2"), seed=0)
    second = TvmTarget(cfg).compile(_onnx_artifact(ctx2.cache, digits_onnx), ctx2)
    return {"db": db, "first": first, "second": second, "art": art, "ctx": ctx, "cfg": cfg}


def test_untuned_matches_onnxruntime_and_is_labelled_untuned(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0))
    comp = target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    info = comp.metadata["tvm"]
    assert info["label"] == "untuned" and info["tuned"] is False
    assert any("not representative" in n for n in info["notes"])
    # What the pipeline reads: the caveat for the report, and that the build has a fixed batch.
    assert comp.metadata["target_notes"] == info["notes"] and comp.metadata["dynamic_batch"] is False
    x = _x()
    got = target.runner(comp).infer({"input": x})
    np.testing.assert_allclose(got[0], _ort(digits_onnx, x), rtol=1e-4, atol=1e-5)


def test_host_target_follows_the_forced_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.targets.tvm_compiler import mcpu_for_isa

    assert mcpu_for_isa(["avx", "avx2", "fma"], "x86_64") == "haswell"
    assert mcpu_for_isa(["avx2", "avx512_vnni", "avx512f", "fma"], "x86_64") == "cascadelake"
    assert mcpu_for_isa(["amx_int8", "amx_tile", "avx512f"], "x86_64") == "sapphirerapids"
    assert mcpu_for_isa([], "x86_64") == "x86-64"
    assert mcpu_for_isa(["neon"], "aarch64") is None
    monkeypatch.setenv("COMPRESS_ISA", "avx,avx2,fma")
    monkeypatch.setenv("COMPRESS_ARCH", "x86_64")
    assert host_target_json()["mcpu"] == "haswell"
    monkeypatch.delenv("COMPRESS_ISA")
    monkeypatch.delenv("COMPRESS_ARCH")
    from tvm.target import codegen

    assert host_target_json().get("mcpu", "generic") == codegen.llvm_get_system_cpu()


def test_untuned_build_per_isa_matches_onnxruntime(forced_isa: str, digits_onnx: Path, tmp_path: Path) -> None:
    """The code built for the forced CPU (AVX2-only or AVX-512 VNNI) computes the model's outputs."""
    from compress.core.fingerprint import detected_cpu

    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0))
    comp = target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    want = {"novnni": "haswell", "vnni": "cascadelake"}[forced_isa]
    assert comp.metadata["tvm"]["target"]["mcpu"] == want
    if forced_isa == "vnni" and "avx512_vnni" not in detected_cpu()["isa"]:
        pytest.skip("built for AVX-512 VNNI; this CPU cannot run that code (the build itself was checked)")
    x = _x()
    np.testing.assert_allclose(target.runner(comp).infer({"input": x})[0], _ort(digits_onnx, x), rtol=1e-4,
                               atol=1e-5)


def test_tuned_build_matches_onnxruntime_and_records_its_trials(tuned: dict, digits_onnx: Path) -> None:
    t = tuned["first"].metadata["tvm"]["tuning"]
    assert tuned["first"].metadata["tvm"]["label"] == "tuned"
    assert t["status"] == "tuned" and t["trials_this_run"] >= 8 and t["tasks_with_records"] >= 1
    assert t["build_errors"] == 0 and t["run_errors"] == 0
    # Prepacking on by default: tuned conv/matmul kernels read weights repacked at build time.
    assert t["weight_prepack"] is True and t["prepacked_kernels"] >= 1
    x = _x(1)
    got = TvmTarget(tuned["cfg"]).runner(tuned["first"]).infer({"input": x})
    np.testing.assert_allclose(got[0], _ort(digits_onnx, x), rtol=1e-4, atol=1e-5)


def test_weight_prepack_can_be_switched_off(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    cfg = TvmConfig(tuning_trials=4, database=str(tmp_path / "db"), weight_prepack=False)
    comp = TvmTarget(cfg).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    t = comp.metadata["tvm"]["tuning"]
    assert t["weight_prepack"] is False and t["prepacked_kernels"] == 0
    x = _x(2)
    got = TvmTarget(cfg).runner(comp).infer({"input": x})
    np.testing.assert_allclose(got[0], _ort(digits_onnx, x), rtol=1e-4, atol=1e-5)


def test_second_compile_reuses_the_database_without_tuning(tuned: dict) -> None:
    first, second = tuned["first"].metadata["tvm"], tuned["second"].metadata["tvm"]
    assert second["tuning"]["status"] == "reused"
    assert second["tuning"]["trials_this_run"] == 0
    assert second["tuning"]["trials_in_database"] == first["tuning"]["trials_this_run"]
    assert second["tuning"]["tasks_with_records"] == first["tuning"]["tasks_with_records"]
    # Same records applied, same code: the library is byte-identical.
    assert second["library_sha256"] == first["library_sha256"]


def test_database_from_another_tvm_version_is_ignored_with_a_warning(tuned: dict, digits_onnx: Path,
                                                                     tmp_path: Path) -> None:
    db = tmp_path / "copied-db"
    shutil.copytree(tuned["db"], db)
    [entry] = [d for d in db.iterdir() if d.is_dir()]
    meta = json.loads((entry / "meta.json").read_text())
    meta["tvm"] = "0.26.0"
    (entry / "meta.json").write_text(json.dumps(meta))
    ctx = _ctx(tmp_path)
    with pytest.warns(TvmDatabaseWarning, match="ignored, never used"):
        comp = TvmTarget(TvmConfig(tuning_trials=4, database=str(db))).compile(
            _onnx_artifact(ctx.cache, digits_onnx), ctx)
    t = comp.metadata["tvm"]["tuning"]
    assert t["status"] == "tuned" and t["trials_this_run"] >= 4  # tuned from scratch, not reused
    assert t["trials_in_database"] == t["trials_this_run"]
    assert any("0.26.0" in n for n in comp.metadata["tvm"]["notes"])
    assert any(".foreign-" in d.name for d in db.iterdir())  # kept aside for inspection, not deleted


def test_database_identity_checks_without_tuning(tmp_path: Path) -> None:
    target = make_target(host_target_json())
    other = make_target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 1})
    logs: list[str] = []
    # Records for another target sit beside ours: never opened, reported.
    TuningDatabase.open(tmp_path, other, logs.append)
    with pytest.warns(TvmDatabaseWarning, match="another TVM version, target or timing device"):
        db = TuningDatabase.open(tmp_path, target, logs.append)
    assert db.path.name.startswith("llvm-") and json.loads((db.path / "meta.json").read_text())["target"]["kind"]
    # A bare MetaSchedule work_dir says nothing about where it came from.
    (tmp_path / "database_workload.json").write_text("")
    with pytest.warns(TvmDatabaseWarning, match="unknown TVM version"):
        TuningDatabase.open(tmp_path, target, logs.append)
    # Our own entry opens silently.
    (tmp_path / "database_workload.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TuningDatabase.open(tmp_path, target, logs.append).path == db.path
    # The same target timed on an RPC device is another database: this machine's records never stand for
    # the device's.
    with pytest.warns(TvmDatabaseWarning, match="timed on rpc:127.0.0.1:9190 in"):
        dev = TuningDatabase.open(tmp_path, target, logs.append, timed_on="rpc:127.0.0.1:9190")
    assert dev.path != db.path and "-rpc-" in dev.path.name
    assert json.loads((dev.path / "meta.json").read_text())["timed_on"] == "rpc:127.0.0.1:9190"


def test_bad_budgets_are_rejected() -> None:
    with pytest.raises(ValidationError, match="tuning_trials"):
        TvmConfig(tuning_trials=-1)
    with pytest.raises(ValidationError, match="tuning_time_s"):
        TvmConfig(tuning_time_s=0)
    with pytest.raises(ValidationError, match="kind"):
        TvmConfig(target={"mcpu": "znver3"})
    assert TvmConfig(tuning_trials=0).tuning_trials == 0  # zero is the explicit untuned build


@pytest.mark.parametrize("spec, match", [
    ({"kind": "no-such-kind"}, "TVM rejected target"),
    ({"kind": "llvm", "mcpu": "not-a-cpu"}, "does not know mcpu"),
    ({"kind": "llvm", "no-such-attr": 3}, "TVM rejected target"),
])
def test_target_json_tvm_rejects_is_a_recipe_error(digits_onnx: Path, tmp_path: Path, spec: dict,
                                                   match: str) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(RecipeError, match=match):
        TvmTarget(TvmConfig(tuning_trials=0, target=spec)).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)


def test_every_unsupported_op_is_listed_before_compiling(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Relu", ["input"], ["a"], name="relu"),
        helper.make_node("Det", ["a"], ["b"], name="det0"),
        helper.make_node("Det", ["a"], ["c"], name="det1"),
        helper.make_node("Foo", ["a"], ["d"], name="custom", domain="com.example"),
        helper.make_node("Relu", ["a"], ["e"], name="relu_custom", domain="com.example"),
        helper.make_node("Sum", ["b", "c", "d", "e"], ["y"], name="sum"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    ctx = _ctx(tmp_path)
    with pytest.raises(BuildError) as e:
        TvmTarget(TvmConfig(tuning_trials=0)).compile(_onnx_artifact(ctx.cache, path), ctx)
    msg = str(e.value)
    assert "3 op(s)" in msg
    assert "Det (domain ai.onnx, 2x, first node 'det0')" in msg
    assert "Foo (domain com.example" in msg and "Relu (domain com.example" in msg


def test_exported_library_runs_in_a_fresh_process(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0))
    comp = target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    assert check_library_elf(comp.path / "model.so")["class"] == "64-bit"
    x = _x(2)
    fresh = run_in_fresh_process(comp.path, {"input": x})
    np.testing.assert_array_equal(fresh[0], target.runner(comp).infer({"input": x})[0])
    assert comp.metadata["tvm"]["library_sha256"] == json.loads((comp.path / "tvm.json").read_text())["library_sha256"]


def test_runner_refuses_a_swapped_library_and_foreign_artifacts(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0))
    comp = target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    lib = comp.path / "model.so"
    lib.write_bytes(lib.read_bytes() + b"\0")  # any change to the library
    with pytest.raises(InputError, match="does not match the SHA-256"):
        target.runner(comp)
    other = Artifact("compiled", tmp_path, "x", comp.inputs, metadata={"target": "onnxruntime"})
    with pytest.raises(InputError, match="not compiled by the tvm target"):
        target.runner(other)


def test_runner_rejects_a_shape_the_library_was_not_built_for(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0))
    runner = target.runner(target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx))
    with pytest.raises(InputError, match="compiled for"):
        runner.infer({"input": np.zeros((2, 1, 8, 8), np.float32)})


def _qdq(digits_onnx: Path, tmp_path: Path, weights: str = "int8") -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calib(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": _x(10 + i)} for i in range(8)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    qpath = tmp_path / f"qdq-{weights}.onnx"
    quantize_static(str(digits_onnx), str(qpath), Calib(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8)
    return qpath


def _output_step(qpath: Path) -> float:
    """The scale of the model's last DequantizeLinear: one step of the quantized output."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qpath))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[model.graph.node[-1].input[1]])


@pytest.mark.parametrize("arith", ["integer", "float"])
def test_quantized_qdq_model_compiles_and_matches_onnxruntime(arith: str, digits_onnx: Path, tmp_path: Path) -> None:
    qpath = _qdq(digits_onnx, tmp_path)
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0, int8_arith=arith))
    comp = target.compile(_onnx_artifact(ctx.cache, qpath), ctx)
    meta = comp.metadata["tvm"]
    assert meta["quantized"] is True and meta["int8"]["arith"] == arith
    x = _x(3)
    ref = _ort(qpath, x)
    got = target.runner(comp).infer({"input": x})[0]
    if arith == "integer":
        # Every convolution runs ONNX Runtime's integer arithmetic: the same int32 sums times the same
        # scales, so the outputs agree to within one step of the quantized output (a rounding tie).
        assert meta["int8"]["integer_convolutions"] == 3 and meta["int8"]["float_convolutions"] == {}
        assert np.abs(got - ref).max() <= _output_step(qpath) * 1.001
    else:
        assert "integer_convolutions" not in meta["int8"]
        # Rounding of requantized activations may differ by one step between the two runtimes.
        assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max() + 1e-6


def test_integer_convolutions_carry_through_nhwc_and_asymmetric_weights_stay_float(digits_onnx: Path,
                                                                                   tmp_path: Path) -> None:
    import onnx
    import tvm
    from compress.targets._tvm_rewrites import integer_convolutions, layout_passes
    from tvm.relax.frontend.onnx import from_onnx

    def imported(path: Path) -> object:
        return from_onnx(onnx.load(str(path)), shape_dict={"input": list(SHAPE)}, keep_params_in_input=False)

    qdq = imported(_qdq(digits_onnx, tmp_path))
    mod, counts = integer_convolutions(qdq)
    assert counts == {"integer": 3}
    nhwc = tvm.transform.Sequential(layout_passes("NHWC"))
    text = nhwc(mod)["main"].script()
    # int32 sums in NHWC, and no transpose around any quantize/dequantize: one in at the input, one out
    # before the classifier's flatten. The same for the float convolutions of the model as imported.
    assert text.count('out_dtype="int32"') == 3 and text.count('data_layout="NHWC"') == 3
    for t in (text, nhwc(qdq)["main"].script()):
        assert t.count("R.permute_dims") == 2 and "R.quantize" not in t and "R.dequantize" not in t
    # u8 weights with zero points (scheme u8u8) are not what the rewrite computes: left in float, said why.
    ctx = _ctx(tmp_path)
    qpath = _qdq(digits_onnx, tmp_path, weights="uint8")
    target = TvmTarget(TvmConfig(tuning_trials=0, int8_arith="integer"))
    comp = target.compile(_onnx_artifact(ctx.cache, qpath), ctx)
    assert comp.metadata["tvm"]["int8"]["float_convolutions"] == {"weights not symmetric int8": 3}
    assert any("left in float" in n for n in comp.metadata["tvm"]["notes"])
    x = _x(4)
    ref = _ort(qpath, x)
    assert np.abs(target.runner(comp).infer({"input": x})[0] - ref).max() <= 0.05 * np.abs(ref).max() + 1e-6


AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
needs_cross_cc = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")


def _aarch64_runtime() -> Path | None:
    """The aarch64 TVM runtime fetched by `compress tvm-runtime aarch64` (make test does it), if any."""
    import os

    from compress.targets._tvm_emulate import check_runtime

    p = os.environ.get("COMPRESS_TVM_CROSS_RUNTIME")
    return Path(p) if p and check_runtime(Path(p), "aarch64") is None else None


@needs_cross_cc
def test_cross_compiles_an_aarch64_library(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    # emulate=off: this test is about the build; the emulated run has its own test below.
    target = TvmTarget(TvmConfig(tuning_trials=0, target=AARCH64, emulate="off"))
    comp = target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    assert comp.metadata["tvm"]["cross_compiled"] is True
    assert check_library_elf(comp.path / "model.so") == {"class": "64-bit", "machine": "aarch64"}
    # This machine's TVM cannot load it; the runner says so instead of crashing.
    with pytest.raises(TargetUnavailable, match="cannot run on this"):
        target.runner(comp)
    with pytest.raises(RecipeError, match="cannot tune"):
        TvmTarget(TvmConfig(tuning_trials=8, target=AARCH64)).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)


@needs_cross_cc
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="needs qemu-user (apt-get install qemu-user)")
def test_cross_compiled_library_runs_under_qemu_and_matches_onnxruntime(digits_onnx: Path, tmp_path: Path) -> None:
    runtime = _aarch64_runtime()
    if runtime is None:
        pytest.skip("no aarch64 TVM runtime: set COMPRESS_TVM_CROSS_RUNTIME to a folder fetched with "
                    "`compress tvm-runtime aarch64` (make test does this)")
    ctx = _ctx(tmp_path)
    cfg = TvmConfig(tuning_trials=0, target=AARCH64, emulate="required", cross_runtime=str(runtime))
    comp = TvmTarget(cfg).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    check = comp.metadata["tvm"]["emulated_check"]
    assert check["status"] == "ok" and check["emulator"] == "qemu-aarch64"
    assert check["max_abs_diff"] < 1e-4 and check["cosine"] > 0.9999
    assert any("checked under qemu-aarch64" in n for n in comp.metadata["target_notes"])


@needs_cross_cc
def test_emulated_check_refuses_a_missing_or_tampered_runtime(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    empty = tmp_path / "no-runtime"
    empty.mkdir()
    # auto: the build stands, and the report says why its outputs were not checked
    comp = TvmTarget(TvmConfig(tuning_trials=0, target=AARCH64, cross_runtime=str(empty))).compile(
        _onnx_artifact(ctx.cache, digits_onnx), ctx)
    assert comp.metadata["tvm"]["emulated_check"]["status"] == "not run"
    assert any("not checked under emulation" in n and "tvm-runtime aarch64" in n
               for n in comp.metadata["target_notes"])
    # required: no check means no build
    with pytest.raises(BuildError, match="could not be run"):
        TvmTarget(TvmConfig(tuning_trials=0, target=AARCH64, emulate="required", cross_runtime=str(empty))).compile(
            _onnx_artifact(ctx.cache, digits_onnx), ctx)
    runtime = _aarch64_runtime()
    if runtime is not None:  # a library changed after it was fetched is refused, never run
        from compress.targets._tvm_emulate import check_runtime

        copy = tmp_path / "rt"
        shutil.copytree(runtime, copy)
        with (copy / "libtvm_runtime.so").open("ab") as f:
            f.write(b"\0")
        assert "changed since it was fetched" in (check_runtime(copy, "aarch64") or "")


def test_time_budget_stops_tuning_early(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    cfg = TvmConfig(tuning_trials=64, tuning_time_s=0.01, database=str(tmp_path / "db"))
    comp = TvmTarget(cfg).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    t = comp.metadata["tvm"]["tuning"]
    assert t["stopped_by_time"] is True
    assert 0 < t["trials_this_run"] < 64
    # The ledger holds the spent time, so the same budget again does no more tuning.
    again = TvmTarget(cfg).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx).metadata["tvm"]["tuning"]
    assert again["status"] == "reused" and again["trials_this_run"] == 0


def test_a_scheme_tvm_cannot_run_fails_that_cell_and_the_run_goes_on(tmp_path: Path) -> None:
    import tomllib

    from compress.stages.pipeline import run
    from compress.stages.recipe import recipe_from_dict

    rec = recipe_from_dict(tomllib.loads(
        'name = "wo"\nmodel = { source = "zoo:transformer" }\ndata = { source = "random" }\n'
        'measure = { batch_sizes = [1], warmup = 1, min_runs = 2, min_time_s = 0.0 }\n'
        '[[passes]]\nkind = "quantize.weight_only"\nbits = 4\n'
        '[[targets]]\nkind = "onnxruntime"\n[[targets]]\nkind = "tvm"\ntuning_trials = 0\n'))
    rep = run(rec, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    cells = {(c.variant, c.target): c for c in rep.results}
    assert cells[("wo", "onnxruntime")].status == "ok"
    assert cells[("baseline", "tvm")].status == "ok"
    bad = cells[("wo", "tvm")]
    assert bad.status == "failed" and "MatMulNBits" in (bad.reason or "") and "onnxruntime" in (bad.reason or "")


def test_worker_kills_a_frozen_or_dead_candidate_and_serves_the_next() -> None:
    """The worker's timeout holds even when the worker cannot answer at all (stopped, as a native call that
    never returns holding the GIL would be), and a crash costs only that candidate."""
    import os
    import signal

    from compress.targets._tvm_worker import CandidateWorker

    w = CandidateWorker(init=os.getpid)  # no TVM imports in the worker: this test is about the process
    try:
        first = w.call(os.getpid, (), 60)
        assert first.status == "ok" and first.value == w.pid
        frozen = w.call(os.kill, (first.value, signal.SIGSTOP), 2)  # the worker stops itself: no answer ever
        assert frozen.status == "timeout" and "killed" in (frozen.error or "")
        assert w.killed_pids == [first.value] and w.kills == 1
        with pytest.raises(ProcessLookupError):
            os.kill(first.value, 0)  # killed and reaped, not left stopped
        again = w.call(os.getpid, (), 60)
        assert again.status == "ok" and again.value != first.value  # a fresh worker took over
        died = w.call(os._exit, (3,), 60)
        assert died.status == "crashed"
        raised = w.call(int, ("not a number",), 60)
        assert raised.status == "error" and "invalid literal" in (raised.error or "")
        assert w.call(os.getpid, (), 60).status == "ok"
    finally:
        w.close()


def test_a_tvm_whose_worker_hides_its_answer_pipe_is_refused_in_one_line() -> None:
    """The timeout waits on TVM's private answer pipe: the installed TVM has it, and one that renamed it is
    refused naming the pin, instead of a tuning run that can hang on a frozen candidate."""
    from compress.targets._tvm_worker import answer_pipe
    from tvm.support.popen_pool import PopenWorker

    from compress.errors import BuildError

    w = PopenWorker()
    try:
        w.send(int, ("1",), None, None)
        assert answer_pipe(w) is not None and w.recv() == 1
    finally:
        w.kill()
    with pytest.raises(BuildError, match="apache-tvm version pyproject.toml pins"):
        answer_pipe(object())


def test_progress_line_shows_trials_best_and_time_left() -> None:
    import time

    from compress.targets._tvm_tuning import TuneStats, progress_line

    stats = TuneStats(trials=16, best_s={0: 2e-4, 1: 1e-3}, timeouts=1)
    line = progress_line(stats, 1, ["conv", "dense"], [2.0, 1.0], 64, 40.0, None)
    assert "16/64 trials" in line and "40 s elapsed" in line and "~120 s left at this rate" in line
    assert "task 2/2 'dense' best 1.0000 ms" in line and "model 1.400 ms" in line and "1 failed" in line
    line = progress_line(stats, 0, ["conv", "dense"], [2.0, 1.0], 64, 40.0, time.perf_counter() + 30)
    assert "s left of the time budget" in line and "task 1/2 'conv' best 0.2000 ms" in line


@pytest.mark.slow
def test_a_hung_candidate_costs_its_timeout_and_tuning_finishes(digits_onnx: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    from compress.targets._tvm_worker import HANG_ENV

    monkeypatch.setenv(HANG_ENV, "2")  # the 2nd candidate freezes its worker (SIGSTOP)
    said: list[str] = []
    ctx = PassContext(cache=Cache(tmp_path / "cache"), progress=True, seed=0, log=said.append)
    cfg = TvmConfig(tuning_trials=8, tuning_time_s=600, candidate_timeout_s=5, database=str(tmp_path / "db"))
    comp = TvmTarget(cfg).compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    t = comp.metadata["tvm"]["tuning"]
    assert t["candidate_timeouts"] == 1 and t["worker_kills"] == 1 and t["worker_crashes"] == 0
    assert t["candidates_measured"] >= 8 and t["trials_this_run"] >= 8 and t["status"] == "tuned"
    assert any("candidate 2: no answer within 5 s; worker killed" in m for m in said)
    # Progress the user watches: trials against the budget, best so far, time left.
    assert any("/8 trials" in m and "left of the time budget" in m and "best" in m for m in said)
    # TVM's own console lines and C++ warnings go to the log beside the database, not the terminal.
    err = capfd.readouterr()
    assert "Warning" not in err.err and "[INFO]" not in err.out
    log = Path(t["log_dir"]) / "console.log"
    assert log.exists() and "Initializing Task" in log.read_text()
    x = _x(4)
    np.testing.assert_allclose(TvmTarget(cfg).runner(comp).infer({"input": x})[0], _ort(digits_onnx, x),
                               rtol=1e-4, atol=1e-5)


def test_dominant_scheduler_visits_every_task_largest_first_then_follows_the_time_share() -> None:
    from compress.targets._tvm_tuning import dominant_next

    weights, flops = [1.0, 2.0, 1.0], [1e6, 1e6, 5e6]
    batches: dict[int, int] = {}
    best: dict[int, float] = {}
    order = []
    for _ in range(3):
        i = dominant_next([0, 1, 2], batches, weights, flops, best)
        batches[i] = batches.get(i, 0) + 1
        order.append(i)
    # First round: by estimated share weight x FLOPs (5e6, 2e6, 1e6), each task once.
    assert order == [2, 1, 0]
    # Then by measured share: task 0 is 80 % of the model's time, so it gets the next batches until its
    # per-batch share falls below the others'.
    best.update({0: 8e-3, 1: 0.5e-3, 2: 1e-3})
    nxt = []
    for _ in range(10):
        i = dominant_next([0, 1, 2], batches, weights, flops, best)
        batches[i] += 1
        nxt.append(i)
    # Shares per batch: task 0 8e-3/n, tasks 1 and 2 1e-3 each; at n = 8 task 0 ties them (lower index wins).
    assert nxt == [0] * 7 + [0, 1, 2]
    assert dominant_next([1, 2], batches, weights, flops, best) in (1, 2)  # a terminated task is never picked


def test_tuned_build_reports_where_the_batches_went(tuned: dict) -> None:
    t = tuned["first"].metadata["tvm"]["tuning"]
    assert t["scheduler"] == "dominant"
    # 8 trials in batches of at least 4: two batches, to the two largest kernels (every task visited once
    # first, largest first, so no task gets a second batch before all have had one).
    assert sum(t["batches_per_task"].values()) == 2 and len(t["batches_per_task"]) == 2


def test_nhwc_layout_builds_and_matches_onnxruntime(digits_onnx: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0, layout="NHWC"))
    comp = target.compile(_onnx_artifact(ctx.cache, digits_onnx), ctx)
    x = _x(3)
    np.testing.assert_allclose(target.runner(comp).infer({"input": x})[0], _ort(digits_onnx, x), rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(ValidationError, match="layout"):
        TvmConfig(layout="NCHW16c")


def test_kernels_tuned_for_one_model_are_not_tuned_again_for_another(tuned: dict, tmp_path: Path) -> None:
    import torch
    from compress.passes.export_onnx import ExportOnnx

    from compress.api import apply
    from compress.inputs import zoo

    # The same convolutions with another classifier: a second model that shares most kernels.
    torch.manual_seed(1)
    other = apply(zoo.DigitsCNN(num_classes=4).eval(), ExportOnnx(), input_shape=SHAPE, data=None,
                  cache_dir=tmp_path / "export")
    path = tmp_path / "other.onnx"
    shutil.copy(other.path / "model.onnx", path)
    first = tuned["first"].metadata["tvm"]["tuning"]
    ctx = PassContext(cache=Cache(tmp_path / "cache"), seed=0)
    cfg = TvmConfig(tuning_trials=8, database=str(tuned["db"]))
    comp = TvmTarget(cfg).compile(_onnx_artifact(ctx.cache, path), ctx)
    t = comp.metadata["tvm"]["tuning"]
    assert t["model_key"] != first["model_key"]
    assert t["tasks_reused_from_database"] >= 1
    # The reused kernels got no batch this run; what was tuned is only what the database lacked.
    assert len(t["batches_per_task"]) <= t["tasks"] - t["tasks_reused_from_database"]
    x = _x(4)
    np.testing.assert_allclose(TvmTarget(cfg).runner(comp).infer({"input": x})[0], _ort(path, x), rtol=1e-4,
                               atol=1e-5)
    # Switched off, every task is tuned again.
    ctx2 = PassContext(cache=Cache(tmp_path / "cache2"), seed=0)
    off = TvmConfig(tuning_trials=8, database=str(tmp_path / "db2"), reuse_kernels=False)
    t2 = TvmTarget(off).compile(_onnx_artifact(ctx2.cache, path), ctx2).metadata["tvm"]["tuning"]
    assert t2["tasks_reused_from_database"] == 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU mask of at least 2 cores to see it narrowed")
def test_a_tvm_build_and_run_leave_the_process_cpu_mask_alone(tuned: dict, digits_onnx: Path) -> None:
    # TVM's pool used to pin the calling thread to one core (TVM_BIND_THREADS), and every thread started
    # afterwards (another target's pool) inherited it. The tuned build folded constants in-process, and
    # the run starts TVM's pool: neither may narrow the mask now.
    before = os.sched_getaffinity(0)
    target = TvmTarget(tuned["cfg"])
    target.runner(tuned["first"], threads=2).infer({"input": _x(5)})
    assert os.sched_getaffinity(0) == before
    import threading

    seen: list[set[int]] = []
    th = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    th.start()
    th.join()
    assert seen == [before]


def test_nhwc_carries_relu6_along_without_transposes(tmp_path: Path) -> None:
    import onnx
    import torch
    import tvm
    from compress.passes.export_onnx import ExportOnnx
    from compress.targets._tvm_rewrites import layout_passes
    from tvm.relax.frontend.onnx import from_onnx

    from compress.api import apply

    class ConvReLU6(torch.nn.Module):  # MobileNet's block shape: conv -> ReLU6 -> conv
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.nn.functional.relu6(self.a(x)))

    torch.manual_seed(0)
    art = apply(ConvReLU6().eval(), ExportOnnx(), input_shape=SHAPE, data=None, cache_dir=tmp_path / "c")
    model = onnx.load(str(art.path / "model.onnx"))
    mod = from_onnx(model, shape_dict={"input": list(SHAPE)}, keep_params_in_input=False)
    text = tvm.transform.Sequential(layout_passes("NHWC"))(mod)["main"].script()
    # One transpose in (NCHW -> NHWC), one out; none around the ReLU6 between the convolutions.
    assert text.count("R.permute_dims") == 2 and "R.maximum" in text and "R.minimum" in text
    # And the whole build still computes what ONNX Runtime computes (ReLU6 saturates at 6: inputs x 10).
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0, layout="NHWC"))
    path = tmp_path / "relu6.onnx"
    shutil.copy(art.path / "model.onnx", path)
    x = _x(6) * 10
    comp = target.compile(_onnx_artifact(ctx.cache, path), ctx)
    np.testing.assert_allclose(target.runner(comp).infer({"input": x})[0], _ort(path, x), rtol=1e-4, atol=1e-4)


def test_a_graph_convertlayout_cannot_handle_is_built_in_nchw_with_a_note(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # conv -> ONNX Min against a constant -> conv: TVM's frontend imports Min as a stack + reduction,
    # which its ConvertLayout rejects (InternalError "Invalid SLayout").
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5, np.float32), "cap"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Min", ["a", "cap"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["output"])]
    graph = helper.make_graph(nodes, "min", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "min.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    ctx = _ctx(tmp_path)
    target = TvmTarget(TvmConfig(tuning_trials=0))  # NHWC, the default
    comp = target.compile(_onnx_artifact(ctx.cache, path), ctx)
    info = comp.metadata["tvm"]
    assert info["layout"] == "NCHW"
    assert any("layout NHWC could not be applied" in n and "built in NCHW" in n for n in info["notes"])
    x = _x(7)
    np.testing.assert_allclose(target.runner(comp).infer({"input": x})[0], _ort(path, x), rtol=1e-4, atol=1e-5)


def test_importing_the_tvm_target_leaves_the_environment_alone(tmp_path: Path) -> None:
    """TVM_BIND_THREADS is set only while TVM may start its thread pool, and put back after (it was set for the
    whole process at import before)."""
    import subprocess
    import sys

    from compress.targets._tvm_runner import BIND_ENV, unbound_threads

    env = {k: v for k, v in os.environ.items() if k != BIND_ENV}
    code = "import os, compress.targets.tvm_compiler; print(os.environ.get('TVM_BIND_THREADS'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "None"
    saved = os.environ.pop(BIND_ENV, None)
    try:
        with unbound_threads():
            with unbound_threads():  # nested (a build that loads a runner): still set
                assert os.environ[BIND_ENV] == "0"
            assert os.environ[BIND_ENV] == "0"
        assert BIND_ENV not in os.environ
        os.environ[BIND_ENV] = "1"  # the user's own setting stands, and stays
        with unbound_threads():
            assert os.environ[BIND_ENV] == "1"
        assert os.environ[BIND_ENV] == "1"
    finally:
        os.environ.pop(BIND_ENV, None)
        if saved is not None:
            os.environ[BIND_ENV] = saved
