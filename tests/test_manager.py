"""The pass manager: chain validation, error history, instruments, cache keys and resume."""

from __future__ import annotations

import pytest
import torch
from compress.passes.export_onnx import ExportOnnx

from compress.api import module_artifact
from compress.core.cache import Cache
from compress.core.config import PassConfig
from compress.core.manager import PassContext, PassManager, TimingInstrument, VerifyInstrument
from compress.core.registry import get_pass
from compress.errors import ExportError, PassError, RecipeError
from compress.inputs.torch_io import load_torch


def scale(factor: float = 1.0, fail: bool = False) -> PassConfig:
    return get_pass("test.scale").config_cls(factor=factor, fail=fail)  # type: ignore[call-arg]


def test_chain_validation_rejects_torch_pass_after_export_before_running(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    pm = PassManager([scale(2.0), ExportOnnx(), scale(3.0)])
    with pytest.raises(RecipeError) as e:
        pm.run(root, PassContext(cache=cache, progress=False))
    msg = str(e.value)
    assert "pass #3 'test.scale' consumes a PyTorch model but gets an ONNX model" in msg
    assert "put it before export.onnx" in msg
    assert len(list(cache.objects.iterdir())) == 1, "validation must fail before any pass runs (only the root)"


def test_failure_names_the_pass_and_those_before_it(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    pm = PassManager([scale(2.0), scale(3.0, fail=True), ExportOnnx()])
    with pytest.raises(PassError) as e:
        pm.run(root, PassContext(cache=cache, progress=False))
    assert "pass #2 'test.scale' failed: boom on purpose (passes that ran before it: test.scale)" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert list(cache.tmp.iterdir()) == []  # no half-written output left behind


def test_instruments_time_and_verify_each_pass(tiny, cache) -> None:
    timing = TimingInstrument()
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    out, _recs = PassManager([scale(2.0), ExportOnnx()], [timing, VerifyInstrument()]).run(
        root, PassContext(cache=cache, progress=False))
    assert [t[0] for t in timing.times] == ["test.scale{factor=2.0}", "export.onnx"]
    assert out.kind == "onnx" and (out.path / "model.onnx").exists()
    assert out.metadata["history"] == ["test.scale{factor=2.0}", "export.onnx"]
    assert out.metadata["test.scale"]["factor"] == 2.0  # pass metadata flows down the chain


def test_verify_instrument_catches_a_broken_model(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    with pytest.raises(PassError, match="NaN or Inf"):
        PassManager([scale(float("inf"))], [VerifyInstrument()]).run(root, PassContext(cache=cache, progress=False))


def test_cache_keys_are_full_sha256_and_change_with_each_ingredient() -> None:
    base = Cache.key("a" * 64, "p", 1, {"x": 1})
    assert len(base) == 64 and int(base, 16) >= 0
    assert Cache.key("b" * 64, "p", 1, {"x": 1}) != base  # parent digest
    assert Cache.key("a" * 64, "q", 1, {"x": 1}) != base  # pass
    assert Cache.key("a" * 64, "p", 2, {"x": 1}) != base  # pass version
    assert Cache.key("a" * 64, "p", 1, {"x": 2}) != base  # config
    assert Cache.key("a" * 64, "p", 1, {"x": 1}, extra={"isa": "avx2"}) != base  # target fingerprint
    assert Cache.key("a" * 64, "p", 1, {"x": 1}) == base  # deterministic


def test_library_versions_are_in_the_key(monkeypatch) -> None:
    from compress.core import cache as cache_mod

    before = Cache.key("a" * 64, "p", 1, {})
    monkeypatch.setattr(cache_mod, "library_versions", lambda: {"torch": "0.0.1"})
    assert Cache.key("a" * 64, "p", 1, {}) != before


def test_second_run_is_all_cache_hits_with_same_artifacts(tiny, cache) -> None:
    chain = [scale(2.0), ExportOnnx()]
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    out1, r1 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    out2, r2 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    assert [r.cache_hit for r in r1] == [False, False]
    assert [r.cache_hit for r in r2] == [True, True]
    assert out1.digest == out2.digest and out1.path == out2.path


def test_changed_early_pass_invalidates_only_what_follows(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    PassManager([scale(1.0), scale(2.0)]).run(root, PassContext(cache=cache, progress=False))
    _, recs = PassManager([scale(1.0), scale(3.0)]).run(root, PassContext(cache=cache, progress=False))
    assert [r.cache_hit for r in recs] == [True, False]


def test_interrupted_run_resumes_from_last_finished_pass(tiny, cache, monkeypatch) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    chain = [scale(2.0), scale(0.5), ExportOnnx()]
    from compress.core import registry

    def killed(*a, **k):
        raise KeyboardInterrupt

    real = registry._PASSES["export.onnx"]
    monkeypatch.setitem(registry._PASSES, "export.onnx", real.__class__(**{**real.__dict__, "fn": killed}))
    with pytest.raises(KeyboardInterrupt):
        PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    entries = list(cache.objects.iterdir())
    assert len(entries) == 3 and all((e / "COMPLETE").exists() for e in entries)  # root + two finished passes
    assert list(cache.tmp.iterdir()) == []
    monkeypatch.setitem(registry._PASSES, "export.onnx", real)
    out, recs = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    assert [r.cache_hit for r in recs] == [True, True, False]
    fresh_cache = Cache(cache.root.parent / "fresh")
    ref, _ = PassManager(chain).run(module_artifact(tiny, (1, 1, 8, 8), fresh_cache),
                                    PassContext(cache=fresh_cache, progress=False))
    assert out.digest == ref.digest  # the resumed run ends with the same artifact


def test_entry_without_completion_marker_does_not_exist(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    out, recs = PassManager([scale(2.0)]).run(root, PassContext(cache=cache, progress=False))
    (out.path / "COMPLETE").unlink()  # as if killed between writing files and the marker
    assert cache.get(recs[0].key) is None
    out2, recs2 = PassManager([scale(2.0)]).run(root, PassContext(cache=cache, progress=False))
    assert recs2[0].cache_hit is False and (out2.path / "COMPLETE").exists()


def test_cached_torch_artifact_reloads_from_disk_without_pickle(tiny, cache) -> None:
    from compress.core.artifact import Artifact

    # A model from a zoo/factory source can be rebuilt from disk; weights load with weights_only=True.
    from compress.inputs.models import load_model
    from compress.stages.recipe import ModelSpec

    root = load_model(ModelSpec(source="zoo:digits-cnn"), cache)
    out, _ = PassManager([scale(2.0)]).run(root, PassContext(cache=cache, progress=False))
    again = load_torch(Artifact.load(out.path))
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(again(x), load_torch(out)(x))


def test_export_parity_check_fails_beyond_tolerance(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    with pytest.raises(ExportError, match="ONNX output differs from PyTorch"):
        PassManager([ExportOnnx(atol=1e-30)]).run(root, PassContext(cache=cache, progress=False))
    out, _ = PassManager([ExportOnnx()]).run(root, PassContext(cache=cache, progress=False))
    meta = out.metadata["export.onnx"]
    assert meta["max_abs_diff"] < 1e-4 and meta["cosine"] > 0.9999


def test_model_that_does_not_export_gives_export_error(cache) -> None:
    from user_models import not_exportable

    root = module_artifact(not_exportable(), (1, 1, 8, 8), cache)
    with pytest.raises(ExportError, match="NotExportable cannot be exported to ONNX: .*data-dependent"):
        PassManager([ExportOnnx()]).run(root, PassContext(cache=cache, progress=False))


def test_registering_a_config_without_its_kind_is_refused() -> None:
    from compress.core.registry import register_pass

    class NoKind(PassConfig):  # forgot `kind: Literal["..."] = "..."`
        factor: float = 1.0

    with pytest.raises(TypeError, match="NoKind must set kind"):
        register_pass(NoKind, consumes="pytorch", produces="pytorch")


def test_export_cause_picks_the_construct_not_the_banner() -> None:
    from compress.passes.export_onnx import export_cause

    inner = RuntimeError("Constraints violated (batch)! For more information, run with TORCH_LOGS=\"+dynamic\".\n"
                         "  - Not all values of batch in the specified range satisfy the guard size()[0] <= 2\n"
                         "Suggested fixes:\n  batch = Dim('batch', max=1)")
    try:
        try:
            raise inner
        except RuntimeError as e:
            raise ValueError("Failed to export the model with torch.export. This is step 1/3 of exporting\n"
                             "- Modify the model code for `torch.export.export` to succeed.") from e
    except ValueError as outer:
        cause = export_cause(outer)
    assert "Constraints violated (batch)!" in cause and "size()[0] <= 2" in cause and "\n" not in cause
    assert "Failed to export" not in cause
    try:
        try:
            raise RuntimeError("running_mean should contain 320 elements not 2560")
        except RuntimeError as e:
            raise ValueError("Failed to export the model with torch.export. banner") from e
    except ValueError as outer:
        assert export_cause(outer) == "RuntimeError: running_mean should contain 320 elements not 2560"


def test_execute_reads_the_plan_and_never_writes_it(tmp_path) -> None:
    """Stage 2 trains the root and runs the chains in a context of its own: the plan stays as it was made
    (its root the model as loaded, its context without a pipeline original), and the chains started from the
    trained model."""
    from compress.stages.execute import execute
    from compress.stages.plan import make_plan
    from compress.stages.recipe import parse_pipeline, recipe_from_dict

    rec = recipe_from_dict({"name": "p", "model": {"source": "zoo:digits-cnn", "train_epochs": 1},
                            "data": {"source": "builtin:digits"}, "targets": [{"kind": "torch"}],
                            "passes": [p.model_dump() for p in parse_pipeline("test.scale{factor=0.5}")[0]]})
    plan = make_plan(rec, tmp_path / "out", tmp_path / "cache", progress=False, write=False)
    root, ctx = plan.root, plan.ctx
    variants = execute(plan)
    assert plan.root is root and plan.ctx is ctx and plan.ctx.original is None
    trained = variants[0].torch_art
    assert trained is not None and trained.digest != root.digest  # the baseline is the trained model
    assert variants[1].steps[0].artifact is not None and variants[1].steps[0].artifact.parent == trained.digest
