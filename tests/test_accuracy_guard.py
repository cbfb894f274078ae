"""The accuracy guard: a variant that lost more than measure.max_accuracy_drop points against the original
is not reported ok: its status says by how much, one warning names the passes that could win it back, and
the plot draws it apart from the front."""

from __future__ import annotations

import json
from pathlib import Path

from compress.cli import main
from compress.measuring.measurement import Cell
from compress.quality.accuracy_guard import judge

FAST = 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0, max_time_s = 5.0 '


def _recipe(tmp_path: Path, factor: float, bound: str = "") -> Path:
    p = tmp_path / "r.toml"
    p.write_text('name = "broken"\nmodel = { source = "zoo:digits-cnn", train_epochs = 2 }\n'
                 'data = { source = "builtin:digits" }\n' + FAST + bound + '}\n'
                 f'[[passes]]\nkind = "test.scale"\nfactor = {factor}\n')
    return p


def test_a_broken_variant_is_flagged_once_with_the_passes_that_recover_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    # Weights scaled to almost nothing: the model answers one class for everything.
    code = main(["run", str(_recipe(tmp_path, 1e-6)), "--out", str(out), "--cache", str(tmp_path / "c")])
    got = capsys.readouterr()
    assert code == 0, got.err
    rep = json.loads((out / "report.json").read_text())
    broken = [c for c in rep["results"] if c["variant"] == "broken"]
    assert broken and all(c["accuracy_guard"] is not None for c in broken)
    g = broken[0]["accuracy_guard"]
    assert g["figure"] == "top-1" and g["drop_pt"] > 30 and g["bound_pt"] == 1.0
    assert all(c["accuracy_guard"] is None for c in rep["results"] if c["variant"] == "baseline")
    table = [ln for ln in got.out.splitlines() if ln.startswith("broken ")]
    assert table and all(f"ACCURACY -{g['drop_pt']:.1f} pt" in ln for ln in table)
    assert not any(ln.rstrip().endswith(" ok") for ln in table)
    warnings = [ln for ln in got.err.splitlines() if "WARNING accuracy" in ln]
    assert len(warnings) == 1 and "distill" in warnings[0] and "max_accuracy_drop" in warnings[0]
    assert "## " in (out / "report.md").read_text() and "ACCURACY -" in (out / "report.md").read_text()


def test_the_bound_is_set_in_the_measure_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    code = main(["run", str(_recipe(tmp_path, 1e-6, ", max_accuracy_drop = 100.0")), "--out", str(out),
                 "--cache", str(tmp_path / "c"), "-q"])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert all(c["accuracy_guard"] is None for c in rep["results"])
    assert "ACCURACY" not in capsys.readouterr().out


def test_without_labels_fidelity_is_judged_and_without_data_nothing(tmp_path: Path) -> None:
    def cells() -> list[Cell]:
        return [Cell("baseline", "onnxruntime", fidelity={"agreement": 1.0}),
                Cell("v", "onnxruntime", fidelity={"agreement": 0.9}),
                Cell("w", "onnxruntime", fidelity={"agreement": 0.995})]

    cs = cells()
    lines = judge(cs, 1.0, labelled=False, real_data=True, chains={})
    assert cs[1].guard is not None and cs[1].guard["figure"] == "agreement" and cs[2].guard is None
    assert len(lines) == 1 and lines[0].startswith("v: agreement 90.00%")
    cs = cells()
    assert judge(cs, 1.0, labelled=False, real_data=False, chains={}) == [] and cs[1].guard is None
