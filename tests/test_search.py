"""compress search: the space is validated up front, trials run through the cache, a search resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("optuna")

from compress.apps.search import load_space, run_search
from compress.cli import main
from compress.errors import RecipeError
from compress.stages.recipe import load_recipe

HEAD = ('name = "s"\nmodel = { source = "zoo:digits-cnn", train_epochs = 1 }\ndata = { source = "builtin:digits" }\n'
        'measure = { batch_sizes = [1], warmup = 1, min_runs = 5, min_time_s = 0.0 }\n')
PRUNE = '[[passes]]\nkind = "prune.channels"\noptional = true\nratio = [0.2, 0.5]\nround_to = { choices = [2, 4] }\n'
TARGET = '[[targets]]\nkind = "onnxruntime"\n'


def space(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "space.toml"
    p.write_text(body)
    return p


def test_space_lists_its_open_values(tmp_path: Path) -> None:
    sp = load_space(space(tmp_path, HEAD + '[search]\ntrials = 3\n' + PRUNE + TARGET))
    kinds = {p.name: p.kind for p in sp.params}
    assert kinds == {"passes[1].enabled": "optional", "passes[1].ratio": "float", "passes[1].round_to": "choice"}
    off = sp.recipe({"passes[1].enabled": False})
    assert off.passes == []
    on = sp.recipe({"passes[1].enabled": True, "passes[1].ratio": 0.3, "passes[1].round_to": 4})
    assert on.passes[0].ratio == 0.3 and on.passes[0].round_to == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize("body, match", [
    (HEAD + PRUNE.replace("[0.2, 0.5]", "[0.5, 0.2]") + TARGET, "empty range"),
    (HEAD + PRUNE.replace("round_to", "round_too") + TARGET, "unknown key 'round_too'"),
    (HEAD + PRUNE.replace("[2, 4]", "[2, 1000]") + TARGET, "round_to = 1000"),
    (HEAD + PRUNE.replace("[2, 4]", "[]") + TARGET, "non-empty list"),
    (HEAD + '[search]\nobjectives = ["speed"]\n' + PRUNE + TARGET, "unknown objective"),
    (HEAD + '[search]\nconstraints = { accuracy_drop = "about 1" }\n' + PRUNE + TARGET, "<= NUMBER"),
    (HEAD.replace("builtin:digits", "random").replace(", train_epochs = 1", "") + PRUNE + TARGET,
     "accuracy_drop needs labelled data"),
    (HEAD + '[search]\ntarget = "tvm"\n' + PRUNE + TARGET, "not among the space's targets"),
    (HEAD + '[search]\nbatch = 8\n' + PRUNE + TARGET, "not among measure.batch_sizes"),
    (HEAD + '[[passes]]\nkind = "quantize.int8"\n' + TARGET, "nothing to search"),
    (HEAD + PRUNE, "list the target"),
    (HEAD + '[[passes]]\nkind = "distill"\nlr = { low = 0, high = 0.1, log = true }\n' + TARGET, "positive low"),
    (HEAD + '[[passes]]\nkind = "no.such"\n' + TARGET, "unknown pass"),
])
def test_bad_spaces_are_refused_before_any_trial(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        load_space(space(tmp_path, body))


def test_search_finds_a_front_writes_a_runnable_recipe_and_resumes(tmp_path: Path) -> None:
    body = (HEAD + '[search]\ntrials = 3\nsampler = "random"\nobjectives = ["latency_ratio", "accuracy_drop"]\n'
            'constraints = { accuracy_drop = "<= 50" }\n' + PRUNE + TARGET)
    path = space(tmp_path, body)
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = run_search(path, out, cache_dir=cache)
    assert len(res["trials"]) == 3 and all(t["state"] == "COMPLETE" for t in res["trials"])
    assert res["best"] is not None and res["front"]
    for t in res["trials"]:
        m = t["metrics"]
        assert m["latency_ratio"] > 0 and len(m["latency_ratio_ci"]) == 2 and "accuracy_drop" in m
        assert m["threads"] == 1  # auto threads are pinned: every trial timed alike
        # The interval is widened by the spread pooled over all trials, the trial's own draw kept beside it.
        lo, hi = m["latency_ratio_ci"]
        assert lo <= m["latency_ratio"] <= hi and len(m["latency_ratio_ci_own"]) == 2
    # Every trial whose run measured an A/A offset counts (a trial with its passes off is the original itself).
    assert all(t["metrics"]["train_threads"] >= 1 and t["metrics"]["build_s"] > 0 for t in res["trials"])
    draws = sum("aa_offset" in t["metrics"] for t in res["trials"])
    assert draws >= 1 and res["session_spread"]["draws"] == draws
    best = load_recipe(res["best_recipe"])  # a plain recipe that `compress run` takes
    assert best.targets[0].kind == "onnxruntime"
    assert (out / "front.md").read_text().startswith("# Search")
    assert (out / "front.png").exists() and (out / "search.db").exists()
    # Resume: the finished trials are not run again; only the missing one is.
    lines: list[str] = []
    res2 = run_search(path, out, cache_dir=cache, trials=4, log=lines.append)
    assert len(res2["trials"]) == 4
    assert any("resuming" in m and "3 trial(s) already finished" in m for m in lines)
    assert sum(m.startswith("trial ") for m in lines) == 1


def test_cli_dry_run_and_bad_space_exit_codes(tmp_path: Path, capsys) -> None:
    path = space(tmp_path, HEAD + PRUNE + TARGET)
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "passes[1].ratio: float in [0.2, 0.5]" in out and "passes[1].enabled: on/off" in out
    bad = space(tmp_path, HEAD + PRUNE.replace("[0.2, 0.5]", "[0.5, 0.5]") + TARGET)
    assert main(["search", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "empty range" in err and len(err.strip().splitlines()) == 1
    assert main(["search", str(path), "--trials", "0"]) == 2


def test_ray_executor_builds_in_parallel_and_measures_on_the_measuring_node(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    body = (HEAD + '[search]\ntrials = 2\nsampler = "random"\nobjectives = ["latency_ratio", "accuracy_drop"]\n'
            + PRUNE + TARGET)
    lines: list[str] = []
    res = run_search(space(tmp_path, body), tmp_path / "out", cache_dir=tmp_path / "cache", executor="ray",
                     workers=2, log=lines.append)
    assert [t["state"] for t in res["trials"]] == ["COMPLETE", "COMPLETE"], res["trials"]
    assert all(t["metrics"].get("measured_on") for t in res["trials"])
    assert any(m.startswith("ray: 2 CPU(s), measuring on resource measure-") for m in lines)
    # The model was trained once, before the trials (two builds on a cold cache each trained it).
    assert res["root_train"]["error"] is None and res["root_train"]["train_s"] > 0
    assert sum(m.startswith("model trained 1 epochs before the trials") for m in lines) == 1
    from compress.core.fingerprint import cpu_info

    share = max(1, int(cpu_info()["affinity_cores"] or 1) // 2)  # two workers: half the cores each
    for t in res["trials"]:
        m = t["metrics"]
        # Each build pinned torch to its task's share (fewer while other processes hold cores), and no
        # trial trained the root again: these trials have no training pass, so nothing was trained.
        assert 1 <= m["train_threads"] <= share and m["train_s"] == 0 and m["build_s"] > 0


def test_ray_address_that_does_not_answer_is_a_usage_error(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    with pytest.raises(RecipeError, match="does not answer"):
        run_search(space(tmp_path, HEAD + PRUNE + TARGET), tmp_path / "out", executor="ray",
                   address="127.0.0.1:1")


FINETUNED = '[[passes]]\nkind = "prune.channels"\nratio = [0.1, 0.6]\nround_to = 2\nfinetune_epochs = 1\n'


def count_finetunes(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every fine-tuning run of channel pruning (the training a pruned trial must not reach)."""
    import compress.passes.prune_channels as pc

    calls: list[float] = []
    real = pc.finetune

    def counted(model, ctx, epochs, lr, name):  # type: ignore[no-untyped-def]
        calls.append(epochs)
        return real(model, ctx, epochs, lr, name)

    monkeypatch.setattr(pc, "finetune", counted)
    return calls


def test_trials_that_cannot_meet_a_macs_constraint_are_pruned_before_training(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    calls = count_finetunes(monkeypatch)
    body = (HEAD + '[search]\ntrials = 5\nsampler = "random"\nseed = 1\n'
            'objectives = ["latency_ratio", "accuracy_drop"]\nconstraints = { macs_ratio = "<= 0.5" }\n'
            + FINETUNED + TARGET)
    out = tmp_path / "out"
    lines: list[str] = []
    res = run_search(space(tmp_path, body), out, cache_dir=tmp_path / "cache", log=lines.append)
    pruned = [t for t in res["trials"] if t["state"] == "PRUNED"]
    done = [t for t in res["trials"] if t["state"] == "COMPLETE"]
    assert pruned and done and len(pruned) + len(done) == 5, [(t["state"], t["params"]) for t in res["trials"]]
    # Only the trials that went on were fine-tuned: the probe itself never trains.
    assert len(calls) == len(done)
    for t in pruned:
        assert t["metrics"]["probe_macs_ratio"] > 0.5 and "cannot meet macs_ratio <= 0.5" in t["pruned"]
        assert t["values"] is None and "accuracy_drop" not in t["metrics"]
    for t in done:
        assert t["metrics"]["macs_ratio"] <= 0.5 and "accuracy_drop" in t["metrics"]
    # Pruning is by the structure, which training does not change: the pruned trials are the weaker pruning.
    assert max(t["params"]["passes[1].ratio"] for t in pruned) < min(t["params"]["passes[1].ratio"] for t in done)
    assert res["best"] in {t["number"] for t in done}
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{out / 'search.db'}")
    in_study = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    assert in_study == {t["number"] for t in pruned}
    assert "Pruned trials" in (out / "front.md").read_text()
    assert sum("pruned: cannot meet" in m for m in lines) == len(pruned)


def test_a_trial_dominated_on_every_objective_is_pruned_untrained(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Both objectives are known from the structure alone, so a weaker pruning than a finished
    # trial's can never join the front: its probe rules it out.
    calls = count_finetunes(monkeypatch)
    body = (HEAD + '[search]\ntrials = 5\nsampler = "random"\nseed = 1\n'
            'objectives = ["macs_ratio", "params_ratio"]\n' + FINETUNED + TARGET)
    res = run_search(space(tmp_path, body), tmp_path / "out", cache_dir=tmp_path / "cache")
    states = [t["state"] for t in res["trials"]]
    assert "PRUNED" in states and states[0] == "COMPLETE", states
    assert len(calls) == states.count("COMPLETE")
    for i, t in enumerate(res["trials"]):
        if t["state"] == "PRUNED":
            assert "dominated by trial" in t["pruned"]
            earlier = [u["params"]["passes[1].ratio"] for u in res["trials"][:i] if u["state"] == "COMPLETE"]
            assert t["params"]["passes[1].ratio"] < max(earlier)


def test_probe_recipe_leaves_out_training_only() -> None:
    from compress.apps.search import probe_recipe
    from compress.stages.recipe import recipe_from_dict

    rec = recipe_from_dict({"name": "r", "model": {"source": "zoo:digits-cnn"}, "data": {"source": "builtin:digits"},
                            "passes": [{"kind": "prune.channels", "ratio": 0.3, "finetune_epochs": 2},
                                       {"kind": "distill", "epochs": 3}, {"kind": "quantize.int8"}],
                            "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]}, where="test")
    probe = probe_recipe(rec, 1, "onnxruntime")
    assert probe is not None
    assert [p.kind for p in probe.passes] == ["prune.channels", "quantize.int8"]
    assert probe.passes[0].finetune_epochs == 0 and probe.passes[0].ratio == 0.3  # type: ignore[attr-defined]
    assert [t.kind for t in probe.targets] == ["onnxruntime"] and probe.measure.batch_sizes == [1]
    untrained = rec.model_copy(update={"passes": [rec.passes[0].model_copy(update={"finetune_epochs": 0})]})
    assert probe_recipe(untrained, 1, "onnxruntime") is None  # nothing to save: the trial runs as it is
    assert probe.passes[1].min_sample_cosine is None  # type: ignore[attr-defined]  # the guard would judge noise
    controlled = rec.model_copy(update={"passes": [*rec.passes[:2], rec.passes[2].model_copy(
        update={"max_accuracy_drop": 0.01})]})
    assert probe_recipe(controlled, 1, "onnxruntime") is None  # float nodes chosen by the trained accuracy


def test_the_pooled_session_spread_replaces_one_trials_own_draw() -> None:
    import math
    from types import SimpleNamespace

    from compress.apps.search import _unwiden, pooled_ci, session_spread
    from compress.measuring.stats import RatioCI, widen

    paired = RatioCI(0.6, 0.59, 0.61, rounds=100, block=5, mde=0.01)
    own = widen(paired, {"ratio": math.exp(0.002)})  # a small draw: the interval hardly widens
    assert _unwiden(own.ratio, own.low, own.high, own.session) == pytest.approx([0.59, 0.61], rel=1e-9)
    trials = [SimpleNamespace(state=SimpleNamespace(name="COMPLETE"), user_attrs={"aa_offset": d})
              for d in (0.002, 0.1, 0.1, 0.1)]
    trials.append(SimpleNamespace(state=SimpleNamespace(name="PRUNED"), user_attrs={"aa_offset": 5.0}))
    spread, draws = session_spread(trials)  # type: ignore[arg-type]
    assert draws == 4 and spread == pytest.approx(math.sqrt((0.002 ** 2 + 3 * 0.01) / 4))
    attrs = {"latency_ratio": 0.6, "latency_ratio_ci": [own.low, own.high], "latency_ratio_ci_paired": [0.59, 0.61]}
    lo, hi = pooled_ci(attrs, spread)  # type: ignore[misc]
    assert lo < own.low and hi > own.high
    assert lo == pytest.approx(0.6 * math.exp(-math.hypot(math.log(0.6 / 0.59), 1.959964 * spread)))


def test_front_trials_are_re_timed_together_in_one_run(tmp_path: Path) -> None:
    from compress.apps.search import retime_trials

    sp = load_space(space(tmp_path, HEAD + '[search]\ntrials = 2\n' + PRUNE + TARGET))
    recs = {"trial0": sp.recipe({"passes[1].enabled": True, "passes[1].ratio": 0.2, "passes[1].round_to": 2}),
            "trial1": sp.recipe({"passes[1].enabled": True, "passes[1].ratio": 0.5, "passes[1].round_to": 2})}
    res = retime_trials(recs, tmp_path / "front", tmp_path / "cache", "onnxruntime", 1)
    assert isinstance(res, dict) and set(res) == {"trial0", "trial1"}, res
    for m in res.values():
        lo, hi = m["latency_ratio_ci"]
        assert lo <= m["latency_ratio"] <= hi and m["p50_ms"] > 0
    # One run: both models were timed in the same interleaved rounds against the same baseline.
    import json

    report = json.loads((tmp_path / "front" / "report.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"baseline", "trial0", "trial1"}


def test_a_ray_build_trains_with_its_share_of_the_node_s_cores() -> None:
    from compress.apps.search import task_threads

    assert task_threads(1, 1, 2) == 2  # one worker on a 2-core machine trains on both cores
    assert task_threads(1, 2, 2) == 1  # two workers: one core each, never 2 + 2 threads on 2 cores
    assert task_threads(2, 2, 2) == 2  # a task holding the whole node
    assert task_threads(1, 8, 8) == 1 and task_threads(3, 8, 8) == 3  # a cluster whose CPUs are its cores
    assert task_threads(1, 4, 2) == 1  # more Ray CPUs than cores: still one thread, never 0
    assert task_threads(4, 1, 2) == 2  # never more than the cores


@pytest.mark.parametrize("others, share, expected", [(0.0, 2, 2), (1.0, 2, 1), (1.0, 4, 3), (None, 2, 2)])
def test_training_leaves_the_cores_other_processes_hold(monkeypatch: pytest.MonkeyPatch, others: float | None,
                                                         share: int, expected: int) -> None:
    import compress.measuring.contention as contention
    from compress.apps.search import training_threads

    looks: list[float] = []

    def before(self, seconds: float = 0.3):  # type: ignore[no-untyped-def]
        looks.append(seconds)
        return None if others is None else {"others_cores": others}

    monkeypatch.setattr(contention.ContentionProbe, "before", before)
    assert training_threads(share) == expected and len(looks) == 1
    assert training_threads(1) == 1 and len(looks) == 1  # one thread needs no look


def test_training_seconds_count_only_passes_that_train() -> None:
    from compress.apps.search import training_kinds, training_seconds
    from compress.stages.recipe import recipe_from_dict

    rec = recipe_from_dict({"name": "r", "model": {"source": "zoo:digits-cnn"}, "data": {"source": "builtin:digits"},
                            "passes": [{"kind": "prune.channels", "ratio": 0.3},
                                       {"kind": "distill", "epochs": 3}],
                            "targets": [{"kind": "onnxruntime"}]}, where="test")
    assert training_kinds(rec) == {"distill"}  # pruning without fine-tuning does not train
    steps = [("prune.channels", 1.0, False), ("distill", 5.0, False), ("export.onnx", 2.0, False)]
    assert training_seconds(rec, steps) == 5.0
    assert training_seconds(rec, [("distill", 5.0, True)]) == 0.0  # a cache hit trained nothing here
    tuned = rec.model_copy(update={"passes": [rec.passes[0].model_copy(update={"finetune_epochs": 1})]})
    assert training_kinds(tuned) == {"prune.channels"}
