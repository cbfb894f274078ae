"""compress history: the store (concurrent appends), change points, and check --drift on synthetic series."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.apps import history
from compress.cli import main
from tests.reports import cell, latency, make_report

MACHINE = "m" * 16


def budget_record(commit: str, p50: float, step_status: str = "pass", machine: str = MACHINE,
                  limit: str = "1.1x recorded", half: float = 0.01) -> dict[str, Any]:
    """What compress check appends for one model with one latency budget (the statistic behind it included)."""
    fig = {"name": "budget digits/q/onnxruntime/p50@b1", "value": 1.0, "low": 0.99, "high": 1.01,
           "unit": "x recorded", "better": "lower", "limit": limit, "status": step_status, "metric": "p50",
           "abs": {"value": p50, "low": p50 * math.exp(-half), "high": p50 * math.exp(half), "unit": "ms"}}
    return {"schema": history.SCHEMA, "kind": "check", "time": "2026-12-07T00:00:00+00:00", "commit": commit,
            "dirty": False, "machine": machine, "machine_desc": "test cpu", "recipe": "digits",
            "recipe_digest": "0" * 64, "figures": [fig, {"name": "q/onnxruntime/p50@1", "value": p50, "unit": "ms",
                                                         "better": "lower"}]}


def series_values(rng: np.random.Generator, n: int, step: float, noise: float) -> list[float]:
    """p50 over n commits: x(1 + step) per commit, each run off by a session offset of sd ``noise`` (A/A)."""
    return [1.0 * (1 + step) ** k * math.exp(rng.normal(0, noise)) for k in range(n)]


def drift_alarms(values: list[float], n: int) -> list[str]:
    """Run the drift judgement at every commit, as CI would, against the records before it."""
    recs = [budget_record(f"c{k}", v) for k, v in enumerate(values)]
    out = []
    for k in range(1, len(recs)):
        out += [d.status for d in history.drift(recs[:k], [recs[k]], n)]
    return out


def test_drift_of_3_percent_per_commit_is_caught_and_each_step_passes() -> None:
    caught = 0
    seeds = 20
    for seed in range(seeds):
        vals = series_values(np.random.default_rng(seed), 6, 0.03, 0.01)  # commit 0, then 5 commits of +3%
        # Each step alone is within the budget "1.1x recorded" (the baseline re-recorded at the commit before).
        assert all(b / a < 1.1 for a, b in itertools.pairwise(vals))
        recs = [budget_record(f"c{k}", v) for k, v in enumerate(vals)]
        [d] = history.drift(recs[:-1], recs[-1:], 5)
        assert d.steps == 5 and d.since == "c0" and d.ratio == pytest.approx(1.03**5, rel=0.05)
        assert d.status in ("fail", "warn")  # never a silent pass
        caught += d.status == "fail"
    assert caught >= 18  # noise sd 1%: 192 of 200 series fail, the rest warn (docs/history.md)


def test_flat_series_of_aa_noise_raises_no_alarm() -> None:
    alarms = 0
    for seed in range(20):
        vals = series_values(np.random.default_rng(100 + seed), 20, 0.0, 0.01)  # 20 flat commits, A/A noise
        st = drift_alarms(vals, 5)
        assert len(st) == 19
        alarms += sum(s == "fail" for s in st)
        pts = [history.Point(f"c{k}", "", v, v * 0.99, v * 1.01) for k, v in enumerate(vals)]
        assert history.change_points(pts) == []
    assert alarms == 0


def test_a_step_is_a_change_point_and_drift_needs_a_limit_to_judge() -> None:
    rng = np.random.default_rng(7)
    vals = [v * (1.2 if k >= 10 else 1.0) for k, v in enumerate(series_values(rng, 20, 0.0, 0.01))]
    pts = [history.Point(f"c{k}", "", v, v * 0.99, v * 1.01) for k, v in enumerate(vals)]
    assert history.change_points(pts) == [10]
    # An absolute budget bounds the figure itself every time: no drift judgement unless --drift-max asks.
    recs = [budget_record(f"c{k}", 1.03**k, limit="2 ms") for k in range(6)]
    assert history.drift(recs[:-1], recs[-1:], 5) == []
    [d] = history.drift(recs[:-1], recs[-1:], 5, drift_max=0.1)
    assert d.status == "fail" and d.limit == pytest.approx(1.1)
    # Another machine's records are not this machine's past.
    other = [budget_record(f"c{k}", 1.03**k, machine="x" * 16) for k in range(5)]
    [d] = history.drift(other, [budget_record("c5", 1.03**5)], 5)
    assert d.status == "skipped" and "no earlier record" in d.detail


def _writer(path: str, worker: int, n: int) -> None:
    for i in range(n):
        rec = budget_record(f"w{worker}-{i}", 1.0)
        rec["figures"] *= 60  # ~20 KB a line: larger than any atomic-pipe size, so only the lock keeps lines whole
        history.append(Path(path), rec)


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records, skipped = history.read(path)
    assert skipped == 0 and len(records) == 100
    assert len({r["commit"] for r in records}) == 100
    # A writer killed mid-line leaves a partial line: it is skipped and counted, the rest still read.
    with path.open("a") as f:
        f.write('{"schema": "compress.history/v1", "figu')
    records, skipped = history.read(path)
    assert len(records) == 100 and skipped == 1


def test_history_command_prints_trends_and_marks_change_points(tmp_path: Path, capsys) -> None:
    path = tmp_path / "h.jsonl"
    rng = np.random.default_rng(3)
    for k, v in enumerate(series_values(rng, 16, 0.0, 0.005)):
        history.append(path, budget_record(f"{k:07x}", v * (1.25 if k >= 8 else 1.0)))
    page = tmp_path / "h.html"
    code = main(["history", str(path), "--figure", "q/onnxruntime/p50@1", "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "16 records, 1 machine(s)" in out and "digits: q/onnxruntime/p50@1 [ms, lower is better]" in out
    assert re.search(r"CHANGE at 0000008 \(after 0000007\): .* \(\+2\d\.\d%\)", out), out
    svgs = re.findall(r"<svg\b.*?</svg>", page.read_text(), re.S)
    marks = ET.fromstring(svgs[0]).findall(".//{http://www.w3.org/2000/svg}line[@class='flag']")
    assert len(svgs) == 1 and len(marks) == 1
    # Usage errors are one line, exit 2.
    assert main(["history", str(tmp_path / "none.jsonl")]) == 2
    assert "no history yet" in capsys.readouterr().err


def _check_result(p50: float) -> Any:
    from compress.apps.budget import CheckResult, Verdict

    rng = np.random.default_rng(int(p50 * 1000))
    lat = latency(list(rng.normal(p50, 0.005 * p50, 40)), 1)
    rep = make_report([cell("baseline", "onnxruntime", lat={"1": lat}), cell("q", "onnxruntime", lat={"1": lat})],
                      name="digits")
    v = Verdict("digits/q/onnxruntime/p50@b1", "digits", "q", "onnxruntime", "p50", "1.1x recorded", "pass",
                1.03, 1.02, 1.04, "x recorded", at="1")
    return CheckResult([v], 0, {"digits": rep})


def test_check_drift_fails_the_gate_and_every_check_appends(tmp_path: Path, capsys, monkeypatch) -> None:
    import compress.apps.budget

    store = tmp_path / "hist.jsonl"
    monkeypatch.setenv(history.ENV, str(store))
    budgets = tmp_path / "b.toml"
    budgets.write_text("")  # check itself is replaced below; only the gate's handling of drift is under test
    p50 = iter([1.03**k for k in range(6)])
    monkeypatch.setattr(compress.apps.budget, "check", lambda *a, **k: _check_result(next(p50)))
    codes = []
    for k in range(6):
        monkeypatch.setenv(history.COMMIT_ENV, f"c{k}")
        codes.append(main(["check", str(budgets), "--drift", "5", "--out", str(tmp_path / "o")]))
    out = capsys.readouterr().out
    # Every step passed on its own (+3% against "1.1x recorded"); 4 commits of +3% together moved x1.125, 5 x1.159.
    assert codes == [0, 0, 0, 0, 1, 1], out
    assert "FAIL         digits/q/onnxruntime/p50@b1 (drift over 5 commits): 1.159" in out and "against c0" in out
    assert "each step judged alone passed" in out
    saved = json.loads((tmp_path / "o" / "check.json").read_text())
    assert saved["exit_code"] == 1 and saved["verdicts"][-1]["metric"] == "drift"
    records, _ = history.read(store)
    assert [r["commit"] for r in records] == [f"c{k}" for k in range(6)]
    fig = next(f for f in records[-1]["figures"] if f["name"].startswith("budget "))
    assert fig["limit"] == "1.1x recorded" and fig["abs"]["value"] == pytest.approx(1.03**5, rel=0.01)
    assert main(["check", str(budgets), "--drift", "0"]) == 2


def test_run_appends_a_record_beside_the_run_folders(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(history.ENV, raising=False)
    monkeypatch.setenv(history.COMMIT_ENV, "abc123")
    r = tmp_path / "r.toml"
    r.write_text('name = "t"\nmodel = { source = "zoo:digits-cnn" }\n'
                 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                 '[[targets]]\nkind = "onnxruntime"\n')
    code = main(["run", str(r), "--out", str(tmp_path / "runs" / "t"), "--cache", str(tmp_path / "c"), "-q"])
    assert code == 0, capsys.readouterr().err
    [rec] = history.read(tmp_path / "runs" / "history.jsonl")[0]
    assert rec["commit"] == "abc123" and rec["recipe"] == "t" and len(rec["machine"]) == 16
    names = {f["name"]: f for f in rec["figures"]}
    p50 = names["baseline/onnxruntime/p50@1"]
    assert p50["unit"] == "ms" and p50["low"] <= p50["value"] <= p50["high"]
    assert json.loads(json.dumps(rec)) == rec


def test_same_run_ratio_budgets_drift_on_the_ratio_and_short_history_only_warns() -> None:
    from compress.apps.budget import Verdict

    res = _check_result(1.0)
    res.verdicts = [Verdict("r", "digits", "q", "onnxruntime", "p50", "0.5x torch", "pass", 0.3, 0.29, 0.31,
                            "x torch", at="1")]
    [fig] = history.budget_figures(res, "digits")
    # The ratio measured in the run is what drifts (the machine's load cancels in it), not the absolute p50.
    assert fig["abs"] == {"value": 0.3, "low": 0.29, "high": 0.31, "unit": "x torch"}
    # Two earlier runs cannot show the run-to-run noise: a large move warns instead of failing.
    recs = [budget_record(f"c{k}", 1.2**k) for k in range(3)]
    [d] = history.drift(recs[:-1], recs[-1:], 5)
    assert d.status == "warn" and "only 2 earlier run(s)" in d.detail
