"""The compatibility matrix as a regression test (a few architectures; the benchmark runs all of them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_compat import MODELS_2, run_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BERT", "ViT", "ConvNeXt"])
def test_architecture_goes_through_prune_export_int8_ort(name: str, tmp_path: Path) -> None:
    r = run_model(name, tmp_path / "cache")
    assert r["prune"]["ok"], r["prune"]
    assert r["prune"]["macs_ratio"] < 0.95
    if name in ("BERT", "ViT"):
        assert r["prune"]["heads"] is not None  # attention recognised: whole heads removed
    ex = r["export"]
    assert ex["ok"], ex
    if name == "ConvNeXt":
        # Its dynamic batch fails inside torch.export: the pass exports a fixed batch by itself and says why.
        assert "Constraints violated (batch)" in ex["auto_static"]
    assert ex["of"] == "pruned" and ex["cosine"] > 0.9999
    for q in ("int8", "dynamic"):
        assert r[q]["ok"], r[q]
        assert r[q]["cos_mean"] >= 0.95  # the guard's threshold, checked again on held-out inputs


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS_2)
def test_second_round_cell_works_or_refuses_with_an_action_that_works(name: str, tmp_path: Path) -> None:
    """Issue 31's architectures: every step works, or refuses in one line with an action that works: prune.channels
    and quantize.int8 name a checked skip that the matrix then takes, or say no skip helps and what does instead
    (the rest runs unpruned; quantize.dynamic, or the float model, which the matrix runs too)."""
    r = run_model(name, tmp_path / "cache", tvm=False)
    assert "crash" not in r, r
    p = r["prune"]
    if p["ok"]:
        if r.get("prune_default"):
            assert "\n" not in r["prune_default"] and r["prune_keep_checked"]
    else:
        assert "\n" not in p["why"] and "no skip" in p["why"].lower(), p
    ex = r["export"]
    assert (ex["ok"] or ex.get("fallback")) and ex["cosine"] > 0.9999, ex
    if r.get("int8_default"):
        # Refused with a skip checked to pass, naming the modules; the matrix took it and it went through.
        assert "\n" not in r["int8_default"] and "(module " in r["int8_default"], r["int8_default"]
        assert r["int8"]["ok"], r["int8"]
    elif not r["int8"]["ok"]:
        # No skip helps (random weights: the error builds up over the layers): the one line names the modules and
        # says which checked action works instead: quantize.dynamic, or (when that fails too) leaving it in float.
        why = r["int8"]["full"]
        assert "\n" not in why and "(module " in why and "(checked)" in why, why
        assert "per_channel = true" not in why  # already the default: never advised
        if "quantize.dynamic does not either" in why:
            assert not r["dynamic"]["ok"] and "leave it in float" in why  # and the float export above works
        else:
            assert "use it instead" in why and r["dynamic"]["ok"], why
    if not r["dynamic"]["ok"]:
        assert "quantize.dynamic does not either" in r["int8"].get("full", ""), r
