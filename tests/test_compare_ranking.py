"""`compress compare` answers "which backend is fastest here": one ranked table per batch size with each
cell's ratio to the fastest and its interval, a bar chart of latency per backend, and one results table in
report.md (not one per target)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from compress.cli import main
from compress.reporting.ranking import ranking
from compress.reporting.report_schema import load_report


def test_compare_ranks_backends_with_ratios_to_the_fastest(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    code = main(["compare", "digits-cnn", "--targets", "torch,onnxruntime", "--precision", "fp32,int8",
                 "--batch", "1,4", "--rounds", "6", "--min-time", "0", "--cache", str(tmp_path / "c"),
                 "--out", str(out), "-q"])
    got = capsys.readouterr()
    assert code == 0, got.err
    rep = load_report(out / "report.json")
    for b in ("1", "4"):
        rows = ranking(rep, b)
        assert len(rows) == 3  # fp32 on torch and onnxruntime, int8 on onnxruntime (the torch int8 cell is skipped)
        assert [r.p50_ms for r in rows] == sorted(r.p50_ms for r in rows)
        assert rows[0].ratio == 1.0 and all(r.ratio >= 1.0 and r.low <= r.ratio <= r.high for r in rows[1:])
        after = got.out.split(f"ranking at batch {b} ")[1].splitlines()[1:]
        block = after[:next((i for i, ln in enumerate(after) if not ln.startswith("  ")), len(after))]
        assert [ln.split()[1] for ln in block] == [f"{'fp32' if r.variant == 'baseline' else r.variant}/{r.target}"
                                                 for r in rows]
        assert "fastest" in block[0] and re.search(r"\d\.\d\dx \[\d+\.\d\dx, \d+\.\d\dx\]", block[1])
    md = (out / "report.md").read_text()
    assert md.count("| variant | target | top-1 |") == 1  # one results table for every target
    assert "## onnxruntime" not in md and "## Ranking at batch 1" in md and "## Ranking at batch 4" in md
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["schema"] == "compress.report/v1"
    assert all(len(ln) <= 120 for ln in got.out.split("\n\n")[0].splitlines())  # the table fits 120 columns
