"""The compatibility matrix as a regression test (a few architectures; the benchmark runs all of them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_compat import run_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BERT", "ViT", "ConvNeXt"])
def test_architecture_goes_through_prune_export_int8_ort(name: str, tmp_path: Path) -> None:
    r = run_model(name, tmp_path / "cache")
    assert r["prune"]["ok"], r["prune"]
    assert r["prune"]["macs_ratio"] < 0.95
    if name in ("BERT", "ViT"):
        assert r["prune"]["heads"] is not None  # attention recognised: whole heads removed
    ex = r["export"]
    if name == "ConvNeXt":
        # Its dynamic batch is refused with one line naming the setting that works, which is then followed.
        assert not ex["ok"] and "Constraints violated (batch)" in ex["why"] and ex["fallback"] == "dynamic_batch=false"
    else:
        assert ex["ok"], ex
    assert ex["of"] == "pruned" and ex["cosine"] > 0.9999
    for q in ("int8", "dynamic"):
        assert r[q]["ok"], r[q]
        assert r[q]["cos_mean"] >= 0.95  # the guard's threshold, checked again on held-out inputs
