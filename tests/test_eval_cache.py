"""Evaluations cached by artifact digest and evaluation settings (compress.quality.eval_cache), and the run's lineage
(compress.core.lineage): a second identical run, or a search trial whose model another trial made, does not run
the model over the evaluation data again; a changed evaluation setting does; a damaged record is not trusted."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.quality.eval_cache import evaluation_key
from compress.stages.pipeline import run

HEAD = ('name = "c"\nmodel = { source = "zoo:digits-cnn" }\n'
        'data = { source = "builtin:digits"DATA }\n'
        'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0METRIC }\n')
SCALE = '[[passes]]\nkind = "test.scale"\nfactor = 0.5\n'
TARGET = '[[targets]]\nkind = "onnxruntime"\n'


def _recipe(tmp_path: Path, data: str = "", metric: str = "") -> Path:
    p = tmp_path / "r.toml"
    p.write_text(HEAD.replace("DATA", data).replace("METRIC", metric) + SCALE + TARGET)
    return p


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every run of a model over the evaluation data: the scorer's ``predict``, wherever a module of the
    package bound it (the spy follows it if the scorer moves)."""
    import compress.quality.evaluate as ev

    calls: list[int] = []
    original = ev.predict

    def spy(runner: Any, data: Any, split: Any, batch_size: int) -> np.ndarray:
        calls.append(batch_size)
        return original(runner, data, split, batch_size)

    for name, mod in list(sys.modules.items()):
        if (name == "compress" or name.startswith("compress.")) and getattr(mod, "predict", None) is original:
            monkeypatch.setattr(mod, "predict", spy)
    return calls


def _scored(rep: Any) -> list[Any]:
    return [e for e in rep.lineage.evaluations if e.what == "accuracy+fidelity"]


def _run(recipe: Path, tmp_path: Path, cache: Path, name: str, log: list[str] | None = None) -> Any:
    return run(recipe, out_dir=tmp_path / name, cache_dir=cache, progress=False,
               log=log.append if log is not None else None)


def test_a_second_identical_run_does_not_evaluate_again(tmp_path: Path, evaluations: list[int]) -> None:
    r, cache = _recipe(tmp_path), tmp_path / "cache"
    rep1 = _run(r, tmp_path, cache, "o1")
    assert len(evaluations) == 2  # the baseline and the variant
    assert [e.cached for e in _scored(rep1)] == [False, False]

    lines: list[str] = []
    rep2 = _run(r, tmp_path, cache, "o2", lines)
    assert len(evaluations) == 2  # nothing ran over the evaluation data again
    assert [e.cached for e in _scored(rep2)] == [True, True]
    assert sum("cached evaluation" in m for m in lines) >= 2
    # The builds' parity checks against their input models too: read from the records, not run again.
    assert [(e.variant, e.cached) for e in rep2.lineage.evaluations if e.what == "parity"] == [
        ("baseline", True), ("c", True)]
    for a, b in zip(rep1.results, rep2.results, strict=True):  # the same figures, from the records
        assert (a.accuracy_top1, a.fidelity, a.parity) == (b.accuracy_top1, b.fidelity, b.parity)
    # Written into the run folder and report.json: the graph from the model to each build, and the evaluations.
    on_disk = json.loads((tmp_path / "o2" / "lineage.json").read_text())
    assert on_disk == json.loads((tmp_path / "o2" / "report.json").read_text())["lineage"]
    nodes = {n["digest"]: n for n in on_disk["artifacts"]}
    build = rep2.cell("c", "onnxruntime").compiled_digest
    chain = []
    while build is not None and build in nodes:
        chain.append(nodes[build]["step"])
        build = nodes[build]["parent"]
    assert chain == ["compile onnxruntime", "export.onnx", "test.scale", "source"]
    assert nodes[rep2.variants["c"].steps[0].digest]["settings"]["factor"] == 0.5

    # A record changed on disk is not trusted: it is discarded with a note, and that model evaluated again.
    key = next(e.key for e in _scored(rep2) if e.variant == "c")
    record = cache / "evaluations" / key[:2] / f"{key}.json"
    d = json.loads(record.read_text())
    d["record"]["accuracy_top1"] = 0.999
    record.write_text(json.dumps(d))
    lines.clear()
    rep3 = _run(r, tmp_path, cache, "o3", lines)
    # The variant again, alone: its fidelity is judged against the reference's kept outputs (not run again).
    assert len(evaluations) == 3
    assert [(e.variant, e.cached) for e in _scored(rep3)] == [("baseline", True), ("c", False)]
    assert any("cached evaluation" in m and "was not used" in m for m in lines)
    assert [c.accuracy_top1 for c in rep3.results] == [c.accuracy_top1 for c in rep1.results]


def test_a_changed_evaluation_setting_evaluates_again(tmp_path: Path, evaluations: list[int]) -> None:
    cache = tmp_path / "cache"
    rep1 = _run(_recipe(tmp_path), tmp_path, cache, "o1")
    assert len(evaluations) == 2
    # Other evaluation data: the same models (the same digests) are evaluated again.
    rep = _run(_recipe(tmp_path, data=", max_val_samples = 50"), tmp_path, cache, "o2")
    assert len(evaluations) == 4 and not any(e.cached for e in _scored(rep))
    assert [c.compiled_digest for c in rep.results] == [c.compiled_digest for c in rep1.results]
    # A user metric named: evaluated again (its figures are part of the record).
    rep = _run(_recipe(tmp_path, metric=', metric = "tests.user_models:recall_at_1"'), tmp_path, cache, "o3")
    assert len(evaluations) == 6 and rep.cell("c", "onnxruntime").fidelity.metric is not None
    # Another output kind (how fidelity is judged): evaluated again.
    rep = _run(_recipe(tmp_path, metric=', output_kind = "embedding"'), tmp_path, cache, "o4")
    assert len(evaluations) == 8 and rep.cell("c", "onnxruntime").fidelity.kind == "embedding"


def test_the_evaluation_key_covers_artifact_settings_and_reference() -> None:
    setting = {"data": "d1", "batch": 64, "target": {"name": "onnxruntime"}, "code": "x", "libs": {}}
    key = evaluation_key("a" * 64, "accuracy+fidelity", setting, "r1", {"output_kind": "auto", "metric": None})
    changed = [evaluation_key("b" * 64, "accuracy+fidelity", setting, "r1", {"output_kind": "auto", "metric": None}),
               evaluation_key("a" * 64, "accuracy+fidelity", {**setting, "batch": 1}, "r1",
                              {"output_kind": "auto", "metric": None}),
               evaluation_key("a" * 64, "accuracy+fidelity", {**setting, "data": "d2"}, "r1",
                              {"output_kind": "auto", "metric": None}),
               evaluation_key("a" * 64, "accuracy+fidelity", setting, "r2", {"output_kind": "auto", "metric": None}),
               evaluation_key("a" * 64, "accuracy+fidelity", setting, "r1", {"output_kind": "embedding",
                                                                               "metric": None})]
    assert len({key, *changed}) == 6 and len(key) == 64


def test_search_trials_sharing_a_pruning_prefix_evaluate_it_once(tmp_path: Path, evaluations: list[int]) -> None:
    pytest.importorskip("optuna")
    from compress.apps.search import run_search

    # Every trial prunes alike; the scaling after it is on or off. Three trials, two possible models: at least
    # two trials make the same model, and every trial's run evaluates the baseline beside its model.
    body = (HEAD.replace("DATA", "").replace("METRIC", "")
            + '[search]\ntrials = 3\nsampler = "random"\nseed = 1\nretime_front = false\n'
            '[[passes]]\nkind = "prune.channels"\nratio = 0.5\n'
            '[[passes]]\nkind = "test.scale"\noptional = true\nfactor = 2.0\n' + TARGET)
    space = tmp_path / "space.toml"
    space.write_text(body)
    res = run_search(space, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert len(res["trials"]) == 3 and all(t["state"] == "COMPLETE" for t in res["trials"])
    # A trial that draws a recipe an earlier trial measured reuses its figures and runs nothing (repeat_of);
    # the others ran, each with its report.
    repeats = {t["number"] for t in res["trials"] if t.get("repeat_of") is not None}
    ran = [t for t in range(3) if t not in repeats]
    built = set()
    for t in ran:
        rep = json.loads((tmp_path / "out" / "trials" / f"trial{t}" / "report.json").read_text())
        built |= {c["compiled_digest"] for c in rep["results"]}
    assert len(built) <= 3 < 2 * len(ran)  # the baseline and at most two trial models, among 2 x runs evaluations
    assert len(evaluations) == len(built)  # each model evaluated once, the shared ones read from the cache


def test_a_recorded_baseline_keeps_the_runs_lineage_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.measuring.measure_timing as stage3  # the timing stage times the candidates
    from compress.cli import main
    from tests.test_budget import _fake_measure, write_budgets

    monkeypatch.setattr(stage3, "measure_interleaved", _fake_measure({"torch": 1.0, "onnxruntime": 0.25}))
    b = write_budgets(tmp_path, '[[budget]]\nmodel = "m"\nmetric = "p50"\nmax = "1.1x recorded"\n')
    args = ["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert main([*args, "--update-baseline"]) == 0
    stored = json.loads((tmp_path / "budgets.baseline.json").read_text())
    entry = next(e for k, e in stored["entries"].items() if "|baseline|onnxruntime|" in k)
    chain = entry["lineage"]["artifacts"]
    assert chain[0]["digest"] == entry["digest"] and chain[0]["step"] == "compile onnxruntime"
    assert [n["step"] for n in chain[1:]] == ["export.onnx", "source"]
    # Its evaluations are the evaluation cache's own records (the same keys), not a second copy of the figures.
    evals = entry["lineage"]["evaluations"]
    assert {e["what"] for e in evals} == {"accuracy+fidelity", "parity"}
    for e in evals:
        assert e["artifact"] == entry["digest"]
        assert (tmp_path / "c" / "evaluations" / e["key"][:2] / f"{e['key']}.json").is_file()
    # A baseline recorded before these records existed still loads and is checked against.
    for e in stored["entries"].values():
        e.pop("lineage")
    (tmp_path / "budgets.baseline.json").write_text(json.dumps(stored))
    assert main(args) == 0


def test_concurrent_writers_never_leave_a_partial_record(tmp_path: Path) -> None:
    """Runs of one search write the same evaluation side by side: a reader sees a whole record or none, and
    a record changed on disk is discarded with a note."""
    import threading

    from compress.core.cache import Cache
    from compress.quality.eval_cache import EvalStore

    cache = Cache(tmp_path / "cache")
    store = EvalStore(cache)
    key = "ab" * 32
    record = {"accuracy_top1": 0.5, "fidelity": {"agreement": 1.0, "values": list(range(2000))}}
    seen: list[Any] = []

    def write() -> None:
        for _ in range(40):
            store.put(key, record)

    def read() -> None:
        for _ in range(200):
            seen.append(store.get(key))

    threads = [threading.Thread(target=write) for _ in range(3)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is None or r == record for r in seen) and store.get(key) == record
    assert cache.notes == []  # nothing was ever half-written
    path = tmp_path / "cache" / "evaluations" / key[:2] / f"{key}.json"
    path.write_text(path.read_text().replace('"accuracy_top1": 0.5', '"accuracy_top1": 0.9'))
    assert store.get(key) is None and not path.exists()
    assert "was not used" in cache.notes[0]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]  # no temporary file left behind


def test_a_new_variant_beside_a_known_baseline_runs_only_itself(tmp_path: Path, evaluations: list[int]) -> None:
    cache = tmp_path / "cache"
    r = _recipe(tmp_path)
    _run(r, tmp_path, cache, "o1")
    assert len(evaluations) == 2
    r.write_text(r.read_text().replace("factor = 0.5", "factor = 0.25"))
    rep = _run(r, tmp_path, cache, "o2")
    # The new model alone: its fidelity is judged against the reference's kept outputs.
    assert len(evaluations) == 3
    assert [(e.variant, e.cached) for e in _scored(rep)] == [("baseline", True), ("c", False)]
    assert rep.cell("c", "onnxruntime").fidelity.agreement is not None
    # Without the reference's outputs (deleted here; too large to keep, elsewhere) the reference runs again.
    for npy in (cache / "evaluations").glob("*/*.npy"):
        npy.unlink()
    r.write_text(r.read_text().replace("factor = 0.25", "factor = 0.75"))
    rep = _run(r, tmp_path, cache, "o3")
    assert len(evaluations) == 5
    assert sorted((e.variant, e.cached) for e in _scored(rep)) == [("baseline", False), ("c", False)]
