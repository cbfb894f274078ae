"""``compress search``: find the fastest model that keeps its accuracy, by measuring.

A search space is a recipe whose pass and target settings may be open:

* ``macs_target = [0.15, 0.6]``: a range (float when either end is a float, else int), only for
  numeric settings; ``{ low = 1e-5, high = 1e-2, log = true }`` for a log scale;
* ``calibration = { choices = ["minmax", "percentile"] }``: a choice among values;
* ``optional = true`` on a pass: the search decides whether it runs.

Every value a range or choice can take is validated up front with the pass's own typed config,
so a space that a trial could not run is refused before any trial. Each trial is an ordinary
recipe run through :func:`compress.stages.pipeline.run`: its artifacts go through the content-addressed
cache (the same pruning before different quantizations is computed once), and its latency is
measured interleaved with the original model in the same run, so the objective
``latency_ratio`` (trial / original, p50, paired rounds) does not drift with the machine's load
between trials the way an absolute time does.

Optuna drives the search (TPE, NSGA-II or random sampling; constraints as Optuna constraints),
with its SQLite storage in the output folder: a killed search resumes without redoing finished
trials, and the study can be inspected with Optuna's own tools.

The search's parts, one job each: the space (``apps.search_space``), one trial (``apps.search_trials``),
the Optuna study (``compress.apps.search_study``), where trials run (``compress.apps.search_workers``) and the results
written (``compress.apps.search_results``). This module runs the search and is their public face.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import CompressError
from ..stages.recipe import Recipe
from .search_results import write_results
from .search_space import (
    METRICS,
    PROBE_METRICS,
    TIMED,
    Param,
    SearchSpec,
    Space,
    check_points,
    load_space,
    search_target,
)
from .search_study import (
    INTERRUPTED,
    _constraint_values,
    _feasible,
    _front,
    _open_study,
    _sampler,
    _suggest,
    _tell,
    _values,
    close_interrupted,
)
from .search_trials import _unwiden as _unwiden
from .search_trials import (
    evaluate_trial,
    hopeless,
    pooled_ci,
    probe_recipe,
    probe_trial,
    retime_trials,
    session_spread,
    trial_metrics,
)
from .search_workers import (
    _RayPool,
    build_trial,
    measure_resource,
    prepare_root,
    task_threads,
    training_kinds,
    training_seconds,
    training_threads,
)

__all__ = [
    "INTERRUPTED", "METRICS", "PROBE_METRICS", "Param", "SearchSpec", "Space", "build_trial", "check_points",
    "close_interrupted",
    "evaluate_trial", "hopeless", "load_space", "measure_resource", "pin_threads", "pooled_ci", "prepare_root",
    "probe_recipe", "probe_trial", "retime_trials", "run_search", "search_target", "session_spread", "task_threads",
    "training_kinds", "training_seconds", "training_threads", "trial_metrics", "write_results",
]


def run_search(space: Space | str | Path, out_dir: str | Path, cache_dir: str | Path | None = None,
               trials: int | None = None, timeout_s: float | None = None,
               log: Callable[[str], None] | None = None, executor: Literal["local", "ray"] = "local",
               address: str | None = None, workers: int = 2,
               warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a search; write ``search.db``, ``search.json``, ``front.md``, ``front.png``, ``best.toml``.

    ``executor="ray"`` runs trials on a Ray cluster (``address``; None starts a local one with
    ``workers`` CPUs): each trial's passes are built by any worker into the shared cache, then its
    latency is measured by a task that holds the measuring node's one ``measure-<fingerprint>``
    resource, so timings never overlap on a node and never come from another kind of machine.
    """
    sp = space if isinstance(space, Space) else load_space(space)
    say = log or (lambda m: None)
    out = Path(out_dir)
    # Before any trial: a search whose results cannot be written must not run for an hour first.
    from ..stages.preflight import check_out_dir

    check_out_dir(out)
    sp = pin_threads(sp, say)
    target = search_target(sp)
    check_points(sp, cache_dir, say)  # a point the model cannot take (too many blocks removed ...): refused now
    pool = _RayPool(sp, target, address, workers, cache_dir, say) if executor == "ray" else None
    out.mkdir(parents=True, exist_ok=True)
    s = _Search.open(sp, out, cache_dir, target, trials, timeout_s, say, warn or say)
    started = 0
    root_train: dict[str, Any] = {"train_s": 0.0, "threads": None}
    try:
        root_train = s.train_root(pool)
        if pool is None:
            started = s.run_local()
        else:
            started = pool.run(s.ask, s.budget, out, s.spec, s.needed, s.probe_for, s.judge, s.tell)
        if started < s.budget:
            say(f"time budget reached after {started} new trial(s)")
        if s.spec.retime_front:
            _retime(s.study, sp, out, cache_dir, target, say, pool)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trials under way are closed now, and retried first on resume
        close_interrupted(s.study, say)
        raise
    finally:
        if pool is not None:
            pool.close()
    result = write_results(s.study, sp, out, target)
    result["root_train"] = root_train  # this invocation's training of the model (not kept in the study)
    return result


@dataclass
class _Search:
    """A search under way: its study, what it measures, and how far it may go."""

    sp: Space
    study: Any
    out: Path
    cache_dir: str | Path | None
    target: str
    budget: int
    deadline: float
    say: Callable[[str], None]
    clock: dict[str, Any]

    @classmethod
    def open(cls, sp: Space, out: Path, cache_dir: str | Path | None, target: str, trials: int | None,
             timeout_s: float | None, say: Callable[[str], None], warn: Callable[[str], None]) -> _Search:
        """The study (resumed from ``search.db`` if there is one) and this invocation's share of the trials."""
        import optuna

        spec, limits = sp.search, sp.search.limits()
        directions: list[Literal["minimize", "maximize"]] = ["minimize"] * len(spec.objectives)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = Path(sp.source).stem
        study = _open_study(out / "search.db", name, directions,
                            lambda drawn: _sampler(spec, _constraint_values if limits else None, drawn))
        close_interrupted(study, warn)  # what an earlier, stopped process left running: said even when quiet
        done = [t for t in study.trials if t.state.is_finished() and INTERRUPTED not in t.user_attrs]
        budget = max(0, (trials or spec.trials) - len(done))
        deadline = time.monotonic() + (timeout_s or spec.timeout_s or math.inf)
        if done:
            say(f"resuming {name}: {len(done)} trial(s) already finished in {out / 'search.db'}")
        clock = {"start": time.monotonic(), "told": 0, "budget": budget, "deadline": deadline}
        return cls(sp, study, out, cache_dir, target, budget, deadline, say, clock)

    @property
    def spec(self) -> SearchSpec:
        return self.sp.search

    @property
    def limits(self) -> dict[str, float]:
        return self.spec.limits()

    @property
    def needed(self) -> list[str]:
        return [*self.spec.objectives, *self.limits]

    @property
    def probing(self) -> bool:
        """Probe a trial untrained first only when its probe can rule it out: a constraint on a metric the probe
        measures, or objectives it all measures (dominance)."""
        return self.spec.early_pruning and (any(c in PROBE_METRICS for c in self.limits)
                                            or all(o in PROBE_METRICS for o in self.spec.objectives))

    def probe_for(self, rec: Recipe) -> Recipe | None:
        return probe_recipe(rec, self.spec.batch, self.target) if self.probing else None

    def tell(self, trial: Any, res: dict[str, Any], secs: float) -> None:
        _tell(self.study, trial, res, secs, self.spec, self.limits, self.say, self.clock)

    def judge(self, trial: Any, pres: dict[str, Any], secs: float) -> bool:
        """Tell the study a trial its probe ruled out (True), or let it go on to training."""
        if not pres["ok"]:
            # An untrained model may fail where the trained one passes (a parity check, say): no verdict.
            trial.set_user_attr("probe_error", pres["error"])
            self.say(f"trial {trial.number}: {pres['error'][:200]}; trained without a probe verdict")
            return False
        reason = hopeless(pres["metrics"], self.spec, self.limits, _feasible(self.study),
                          session_spread(self.study.trials)[0])
        if reason is None:
            return False
        self.tell(trial, {"ok": False, "pruned": reason, "probe": pres["metrics"]}, secs)
        return True

    def ask(self) -> tuple[Any, Recipe | None] | None:
        """The next trial and its recipe; None when the time is up. A point a finished trial already measured is
        told that trial's figures at once and comes back without a recipe (nothing to build or time): samplers
        draw a discrete point again (TPE's start-up repeated one of four on SmolLM2, a quarter of the budget)."""
        if time.monotonic() > self.deadline:
            return None
        trial = self.study.ask()
        values = {p.name: _suggest(trial, p) for p in self.sp.params}
        rec = self.sp.recipe(values, name=f"trial{trial.number}")
        trial.set_user_attr("recipe", rec.pipeline_text())
        # The same recipe, not the same values: a switched-off pass's settings are drawn too, and change nothing.
        point = self.sp.recipe(values, name="point").pipeline_text()
        earlier = next((t for t in self.study.trials if t.state.name == "COMPLETE" and "repeat_of" not in t.user_attrs
                        and self.sp.recipe(_values(self.sp, t), name="point").pipeline_text() == point), None)
        if earlier is None:
            return trial, rec
        trial.set_user_attr("repeat_of", earlier.number)
        skip = ("recipe", "constraint", "seconds", "retry_of", "repeat_of", "measured_on", "aa_offset")
        self.tell(trial, {"ok": True, "metrics": {k: v for k, v in earlier.user_attrs.items() if k not in skip},
                          "repeat_of": earlier.number}, 0.0)
        return trial, None

    def train_root(self, pool: _RayPool | None) -> dict[str, Any]:
        """Once, before any trial: two trials started side by side on a cold cache each trained the model."""
        rec0 = self.sp.recipe(self.sp.first_point())
        if not (self.budget and rec0.model.train_epochs):
            return {"train_s": 0.0, "threads": None}
        got = prepare_root(rec0, self.cache_dir) if pool is None else pool.prepare(rec0)
        if got["error"] is not None:
            raise CompressError(f"training the model before the search: {got['error']}")
        self.say(f"model trained {rec0.model.train_epochs} epochs before the trials "
                 f"({got['train_s']:.1f} s, {got['threads']} thread(s); a cache hit when 0)")
        return got

    def run_local(self) -> int:
        """Trials one after another on this machine; how many were started."""
        started = 0
        while started < self.budget and (nxt := self.ask()) is not None:
            started += 1
            trial, rec = nxt
            if rec is None:  # a repeated point, told already
                continue
            t0 = time.monotonic()
            prec = self.probe_for(rec)
            if prec is not None and self.judge(trial, probe_trial(prec, self.out / "trials" / rec.name / "probe",
                                                                  self.cache_dir, self.target, self.spec.batch),
                                               time.monotonic() - t0):
                continue
            # Built first with every core (training), then measured from the cache with the pinned threads.
            built = build_trial(rec, self.cache_dir)
            if built["error"] is not None:
                res = {"ok": False, "error": built["error"]}
            else:
                res = evaluate_trial(rec, self.out / "trials" / rec.name, self.cache_dir, self.target,
                                     self.spec.batch, self.needed)
                res["timing"] = {"train_s": built["train_s"], "build_s": built["build_s"],
                                 "train_threads": built["threads"]}
            self.tell(trial, res, time.monotonic() - t0)
        return started


def _retime(study: Any, sp: Space, out: Path, cache_dir: str | Path | None, target: str,
            say: Callable[[str], None], pool: _RayPool | None) -> None:
    """Time the feasible front again, every model in one run. Each trial's ratio came from its own
    run, and a run-wide state of the machine can move a small model's ratio by a quarter with
    intervals that do not show it (benchmarks/RESULTS.md, search); in one run the front's models
    share that state, so they can be ranked against each other."""
    front = _front(study)
    if len(front) < 2:
        return
    if sp.search.draft:
        say("front not re-timed together: each trial drafts for the original, in a run of its own")
        return
    if any(p.section == "targets" for p in sp.params):
        say("front not re-timed together: its trials differ in target settings, and one run times one target "
            "configuration")
        return
    recs = {f"trial{t.number}": sp.recipe(_values(sp, t)) for t in front}
    args = (recs, out / "front-retimed", cache_dir, target, sp.search.batch)
    res = retime_trials(*args) if pool is None else pool.timed(retime_trials, *args)
    if isinstance(res, str):
        say(f"front not re-timed together: {res}")
        return
    study.set_user_attr("retimed", {name[5:]: m for name, m in res.items()})
    say("front re-timed together in one run: " + ", ".join(
        f"trial {name[5:]} " + " ".join(f"{k} {m[k]:.4g}" for k in TIMED if k in m and k != "p50_ms")
        for name, m in res.items()))


def pin_threads(sp: Space, say: Callable[[str], None]) -> Space:
    """Every trial is timed with the same thread count. With measure.threads = 0 (auto) each run
    would pick its own from the load of that moment (pipeline.pick_threads), and trials timed at
    1 and at 2 threads were compared as if alike (the speed-up of a pruned model depends on the
    thread count); two searches of one space also disagreed for it. Auto becomes 1 thread: the
    count a shared machine can give every trial."""
    base = json.loads(json.dumps(sp.base))
    measure = base.setdefault("measure", {})
    if not isinstance(measure, dict) or measure.get("threads"):
        return sp
    measure["threads"] = 1
    say("measure.threads = 0 (auto) would let each trial pick its thread count from the load of the moment; "
        "every trial is timed with 1 thread (set measure.threads to choose)")
    from dataclasses import replace

    return replace(sp, base=base)
