"""``compress search``: find the fastest model that keeps its accuracy, by measuring.

A search space is a recipe whose pass and target settings may be open:

* ``macs_target = [0.15, 0.6]``: a range (float when either end is a float, else int), only for
  numeric settings; ``{ low = 1e-5, high = 1e-2, log = true }`` for a log scale;
* ``calibration = { choices = ["minmax", "percentile"] }``: a choice among values;
* ``optional = true`` on a pass: the search decides whether it runs.

Every value a range or choice can take is validated up front with the pass's own typed config,
so a space that a trial could not run is refused before any trial. Each trial is an ordinary
recipe run through :func:`compress.pipeline.run`: its artifacts go through the content-addressed
cache (the same pruning before different quantizations is computed once), and its latency is
measured interleaved with the original model in the same run, so the objective
``latency_ratio`` (trial / original, p50, paired rounds) does not drift with the machine's load
between trials the way an absolute time does.

Optuna drives the search (TPE, NSGA-II or random sampling; constraints as Optuna constraints),
with its SQLite storage in the output folder: a killed search resumes without redoing finished
trials, and the study can be inspected with Optuna's own tools.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .compare import compare
from .errors import CompressError, InputError, RecipeError
from .recipe import Recipe, _resolve_paths, read_toml, recipe_from_dict, recipe_to_toml
from .report_schema import MeasuredRatio, NoRatio, Report

# Metrics a trial yields; all are minimized (accuracy as a drop, fidelity as a loss).
METRICS: dict[str, str] = {
    "latency_ratio": "p50 latency of the trial / the original model on the search target (paired rounds)",
    "p50_ms": "p50 latency in ms on the search target at the search batch size",
    "accuracy_drop": "top-1 of the original minus the trial's, in points (needs labelled data)",
    "fidelity_loss": "1 - agreement of the trial's predictions with the original model's",
    "size_mb": "size of the compiled model in MB",
    "macs_ratio": "multiply-accumulates of the trial's model / the original's (channel pruning; 1.0 without it)",
    "params_ratio": "parameters of the trial's model / the original's (channel pruning; 1.0 without it)",
}
# Metrics the untrained probe of a trial measures (its structure without its training, see
# probe_recipe): training changes weights, not shapes, so these are known before it runs.
PROBE_METRICS = ("latency_ratio", "p50_ms", "size_mb", "macs_ratio", "params_ratio")

_CONSTRAINT = re.compile(r"^\s*(<=|<)\s*([-+0-9.eE]+)\s*$")


class SearchSpec(BaseModel):
    """The ``[search]`` table of a space."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trials: int = Field(20, ge=1, le=100_000)
    timeout_s: float | None = Field(None, gt=0, description="stop starting trials after this long")
    objectives: list[str] = Field(default_factory=lambda: ["latency_ratio", "accuracy_drop"], min_length=1)
    constraints: dict[str, str] = Field(default_factory=dict, description='e.g. { accuracy_drop = "<= 1.0" }')
    target: str | None = Field(None, description="target whose latency counts; default the first target")
    batch: int = Field(1, ge=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    early_pruning: bool = Field(True, description="probe each trial's structure untrained first and prune it "
                                "when it cannot meet a constraint or is dominated (see probe_recipe)")
    probe_margin: float = Field(0.05, ge=0, le=1, description="a timed probe is trusted to this fraction: it "
                                "prunes only when its interval is this far beyond the limit")
    retime_front: bool = Field(True, description="time the feasible front's models again together in one run at "
                               "the end (interleaved), and pick the best on those figures")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in METRICS]
        if bad:
            raise ValueError(f"unknown objective(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        return v

    @field_validator("constraints")
    @classmethod
    def _known_constraints(cls, v: dict[str, str]) -> dict[str, str]:
        for k, expr in v.items():
            if k not in METRICS:
                raise ValueError(f"constraint on unknown metric {k!r}; choose from {', '.join(METRICS)}")
            if not isinstance(expr, str) or not _CONSTRAINT.match(expr):
                raise ValueError(f"constraint {k} = {expr!r}: write it as \"<= NUMBER\"")
        return v

    def limits(self) -> dict[str, float]:
        out = {}
        for k, expr in self.constraints.items():
            m = _CONSTRAINT.match(expr)
            assert m is not None  # checked by the validator
            out[k] = float(m.group(2))
        return out


@dataclass(frozen=True)
class Param:
    """One open value: ``pass_index`` -1 for the target table; ``key`` None for a pass's on/off switch."""

    name: str
    section: str  # "passes" | "targets"
    index: int
    key: str | None
    kind: Literal["float", "int", "choice", "optional"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass
class Space:
    base: dict[str, Any]  # the recipe dict with every open value removed
    params: list[Param]
    search: SearchSpec
    source: str
    folder: Path = Path(".")  # file paths in the space are relative to it, as in a recipe

    def first_point(self) -> dict[str, Any]:
        """Every open value at its first value (passes on): a point to validate the space's fixed part with."""
        return {p.name: True if p.kind == "optional" else (p.choices[0] if p.kind == "choice" else p.low)
                for p in self.params}

    def recipe(self, values: dict[str, Any]) -> Recipe:
        """The plain recipe of one point of the space."""
        d = json.loads(json.dumps(self.base))
        for p in self.params:
            if p.key is not None and p.name in values:
                d[p.section][p.index][p.key] = values[p.name]
        # An optional pass runs unless the point switches it off (its "enabled" parameter).
        keep = [i for i in range(len(d.get("passes", []))) if values.get(f"passes[{i + 1}].enabled", True)]
        d["passes"] = [d["passes"][i] for i in keep]
        return _resolve_paths(recipe_from_dict(d, where=self.source), self.folder)


def _numeric(cls: type[BaseModel], key: str) -> bool:
    f = cls.model_fields.get(key)
    ann = str(f.annotation) if f is not None else ""
    return any(t in ann for t in ("int", "float")) and "tuple" not in ann and "list" not in ann


def _open_value(where: str, cls: type[BaseModel], key: str, v: Any) -> dict[str, Any] | None:
    """The range/choice a value declares, or None for a fixed value."""
    if isinstance(v, dict) and "choices" in v:
        if set(v) != {"choices"} or not isinstance(v["choices"], list) or not v["choices"]:
            raise RecipeError(f"{where}: {key} = {{ choices = [...] }} needs a non-empty list and nothing else")
        return {"kind": "choice", "choices": tuple(v["choices"])}
    if isinstance(v, dict) and {"low", "high"} <= set(v):
        extra = set(v) - {"low", "high", "log"}
        if extra:
            raise RecipeError(f"{where}: {key}: unknown range key(s) {', '.join(sorted(extra))}; use low, high, log")
        lo, hi = v["low"], v["high"]
        return _range(where, key, lo, hi, bool(v.get("log", False)))
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in v) and _numeric(cls, key):
        return _range(where, key, v[0], v[1], False)
    return None


def _range(where: str, key: str, lo: Any, hi: Any, log: bool) -> dict[str, Any]:
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)):
        raise RecipeError(f"{where}: {key}: a range needs two numbers, got {lo!r} and {hi!r}")
    if not lo < hi:
        raise RecipeError(f"{where}: {key} = [{lo}, {hi}] is an empty range; the first value must be below the "
                          "second (write a single value to fix it)")
    if log and lo <= 0:
        raise RecipeError(f"{where}: {key}: a log range needs a positive low end, got {lo}")
    kind = "int" if isinstance(lo, int) and isinstance(hi, int) and not log else "float"
    return {"kind": kind, "low": lo, "high": hi, "log": log}


def load_space(path: str | Path) -> Space:
    """Read and validate a search space; every value it can produce is checked before any trial."""
    from .registry import get_pass, get_target_config

    p, d = read_toml(path, "search space")
    raw_search = d.pop("search", {})
    try:
        search = SearchSpec.model_validate(raw_search)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'search'}: {x['msg']}" for x in e.errors())
        raise RecipeError(f"{p}: [search]: {msgs}") from None
    params: list[Param] = []
    for section in ("passes", "targets"):
        tables = d.get(section, [])
        if not isinstance(tables, list):
            raise RecipeError(f"{p}: '{section}' must be an array of tables ([[{section}]])")
        for i, t in enumerate(tables):
            where = f"{p}: {section}[{i + 1}]"
            if not isinstance(t, dict) or not isinstance(t.get("kind"), str):
                raise RecipeError(f"{where}: expected a table with a 'kind' key")
            try:
                cls: type[BaseModel] = get_target_config(t["kind"]) if section == "targets" \
                    else get_pass(t["kind"]).config_cls
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
            if t.pop("optional", False) is True:
                if section == "targets":
                    raise RecipeError(f"{where}: 'optional' applies to passes; list the targets to measure")
                params.append(Param(f"{section}[{i + 1}].enabled", section, i, None, "optional"))
            for key, v in list(t.items()):
                spec = _open_value(f"{where} ({t['kind']})", cls, key, v)
                if spec is None:
                    continue
                del t[key]
                params.append(Param(f"{section}[{i + 1}].{key}", section, i, key, spec["kind"],
                                    spec.get("low", 0.0), spec.get("high", 0.0), spec.get("log", False),
                                    spec.get("choices", ())))
            _check_values(where, cls, t, [q for q in params if q.section == section and q.index == i])
    space = Space(d, params, search, str(p), p.parent)
    rec = space.recipe(space.first_point())  # the fixed part of the recipe, validated as a recipe
    _check_search_against_recipe(p, search, rec)
    if not params:
        raise RecipeError(f"{p}: nothing to search: give a range ([low, high]), choices ({{ choices = [...] }}) or "
                          "optional = true on a pass")
    return space


def _check_values(where: str, cls: type[BaseModel], fixed: dict[str, Any], params: list[Param]) -> None:
    """Validate the table with every open value at its first value, then each other value in turn."""
    rep = {q.key: (q.choices[0] if q.kind == "choice" else q.low) for q in params if q.key is not None}

    def probe(table: dict[str, Any], label: str) -> None:
        try:
            cls.model_validate(table)
        except ValidationError as e:
            err = e.errors()[0]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(k for k in cls.model_fields if k != "kind")
                raise RecipeError(f"{where} ({fixed['kind']}): unknown key '{err['loc'][0]}'; allowed keys: "
                                  f"{allowed}") from None
            loc = ".".join(map(str, err["loc"]))
            raise RecipeError(f"{where} ({fixed['kind']}): {label}{loc + ': ' if loc else ''}{err['msg']}") from None

    probe({**fixed, **rep}, "with each open value at its first value, " if rep else "")
    for q in params:
        if q.key is None:
            continue
        for v in (q.choices if q.kind == "choice" else (q.low, q.high)):
            probe({**fixed, **rep, q.key: v}, f"{q.key} = {v!r} (a value of the search space): ")


def _check_search_against_recipe(p: Path, search: SearchSpec, rec: Recipe) -> None:
    kinds = [t.kind for t in rec.targets]
    if not kinds:
        raise RecipeError(f"{p}: list the target to measure on ([[targets]] kind = \"onnxruntime\")")
    if search.target is not None and search.target not in kinds:
        raise RecipeError(f"{p}: [search] target = {search.target!r} is not among the space's targets "
                          f"({', '.join(kinds)})")
    needs_labels = {"accuracy_drop"} & (set(search.objectives) | set(search.constraints))
    if needs_labels and rec.data.source == "random":
        raise RecipeError(f"{p}: accuracy_drop needs labelled data, and the space has none (data.source = "
                          "\"random\"); set data, or use fidelity_loss instead")
    if search.batch not in rec.measure.batch_sizes:
        raise RecipeError(f"{p}: [search] batch = {search.batch} is not among measure.batch_sizes "
                          f"{rec.measure.batch_sizes}")


# ------------------------------------------------------------------------------------------- trials


def trial_metrics(report: Report, variant: str, target: str, batch: int) -> dict[str, Any]:
    """Objectives of one trial from its run report (the trial's variant against the baseline)."""
    base, cell = report.cell("baseline", target), report.cell(variant, target)
    if cell is None and variant not in report.variants and base is not None:
        cell = base  # a point with every optional pass off is the original model itself
    if cell is None or cell.status != "ok":
        reason = "not measured" if cell is None else f"{cell.status}: {cell.reason}"
        raise CompressError(f"the trial's model on {target}: {reason}")
    b = str(batch)
    out: dict[str, Any] = {"p50_ms": cell.latency[b].p50_ms, "size_mb": (cell.size_bytes or 0) / 1e6}
    if base is not None and base.status == "ok":
        # The run's own paired ratio (block bootstrap, widened by the baseline's A/A spread); where the run gave
        # none (the trial is the original model itself), compress.compare's.
        r = cell.ratio_to_baseline.get(b) if cell is not base else None
        if r is None or isinstance(r, NoRatio):
            r = compare(cell, base, b)
        if isinstance(r, NoRatio):
            raise CompressError(f"the trial's latency on {target}: {r.text}")
        out.update(latency_ratio=r.ratio, latency_ratio_ci=[r.low, r.high])
        if isinstance(r, MeasuredRatio) and r.session:
            # the run's one-draw A/A offset, and its interval before that widening
            out.update(aa_offset=r.session, latency_ratio_ci_paired=_unwiden(r.ratio, r.low, r.high, r.session))
        if base.accuracy_top1 is not None and cell.accuracy_top1 is not None:
            out["accuracy_drop"] = (base.accuracy_top1 - cell.accuracy_top1) * 100
            out["top1"] = cell.accuracy_top1
    if cell.fidelity is not None and cell.fidelity.agreement is not None:
        out["fidelity_loss"] = 1.0 - float(cell.fidelity.agreement)
    out.update(_structure_and_conditions(report, variant, cell.latency[b], b))
    return out


def _structure_and_conditions(report: Report, variant: str, lat: Any, b: str) -> dict[str, Any]:
    """MACs/params ratios of the trial's model, and the conditions its latency was timed under
    (threads, other processes' load): two runs' figures are comparable only under like conditions."""
    # Whichever passes recorded a MACs/params ratio (structured pruning), multiplied; 1.0 when none did.
    info = report.variants.get(variant)
    metas = list(info.passes.values()) if info is not None else []
    out: dict[str, Any] = {"macs_ratio": math.prod(float(m["macs_ratio"]) for m in metas if "macs_ratio" in m),
                           "params_ratio": math.prod(float(m["params_ratio"]) for m in metas if "params_ratio" in m)}
    if lat.p50_ci:
        out["p50_ci"] = list(lat.p50_ci)
    out["threads"] = report.measurement.threads
    during = ((report.contention.during or {}) if report.contention is not None else {}).get(f"batch {b}")
    if during is not None:
        out["others_cores"] = during.others_cores
    return out


def _suggest(trial: Any, p: Param) -> Any:
    if p.kind == "optional":
        return trial.suggest_categorical(p.name, [True, False])
    if p.kind == "choice":
        # Optuna stores categorical choices as JSON-able scalars; lists are passed by index.
        if all(isinstance(c, (str, int, float, bool)) or c is None for c in p.choices):
            return trial.suggest_categorical(p.name, list(p.choices))
        return p.choices[trial.suggest_categorical(p.name + "#", list(range(len(p.choices))))]
    if p.kind == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high))
    return trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)


def _sampler(spec: SearchSpec, constraints: Callable[[Any], list[float]] | None, drawn: int = 0) -> Any:
    """The study's sampler. ``drawn``: trials the study already holds; a resumed search seeds its sampler past
    them (seeded alike, it would draw the first trials' exact points again)."""
    import optuna

    seed = spec.seed + drawn
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints,
                                      multivariate=True, n_startup_trials=min(10, max(2, spec.trials // 3)))


def _constraint_values(frozen: Any) -> list[float]:
    return list(frozen.user_attrs.get("constraint", []))


INTERRUPTED = "interrupted"  # user attribute of a trial stopped mid-way (Ctrl-C, SIGTERM, kill -9)
SQLITE_HEADER = b"SQLite format 3\x00"


def _open_study(db: Path, name: str, directions: list[Literal["minimize", "maximize"]],
                sampler: Callable[[int], Any]) -> Any:
    """Create or load the study in ``db``, checked first: a damaged file is one line naming it (exit 2), not a
    database library's traceback. A loaded study gets a sampler seeded past the trials it holds."""
    import optuna

    problem = _damaged(db)
    if problem is None:
        try:
            study = optuna.create_study(study_name=name, storage=f"sqlite:///{db.resolve()}", directions=directions,
                                        sampler=sampler(0), load_if_exists=True)
        except Exception as e:  # sqlalchemy's and optuna's own errors about the file (schema, version, locking)
            problem = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if problem is not None:
        raise InputError(f"{db}: the search's study file is damaged or unreadable ({problem}); move it aside to "
                         "start the search afresh (the finished trials' figures are also in search.json)")
    if study.trials:
        study.sampler = sampler(len(study.trials))
    return study


def _damaged(db: Path) -> str | None:
    """Why an existing study file cannot be opened as SQLite (a header check and SQLite's quick_check), or None."""
    import sqlite3

    if not db.exists():
        return None
    try:
        with db.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        return e.strerror or str(e)
    if head != SQLITE_HEADER:
        return "not an SQLite database" if head else "empty file"
    try:
        con = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
        try:
            row = con.execute("PRAGMA quick_check").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if row and row[0] == "ok" else f"SQLite quick_check: {row[0] if row else 'no answer'}"


def close_interrupted(study: Any, say: Callable[[str], None], numbers: list[int] | None = None) -> None:
    """Close trials left running (``numbers``, or every RUNNING one of an earlier process that was stopped) as
    interrupted failures, and queue their points so the next trial retries them first."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if numbers is not None and t.number not in numbers:
            continue
        # A finished trial's attributes cannot be set, and a FrozenTrial has no setter: through the storage.
        study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (the search was stopped during this "
                                           "trial); its point is retried first")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        say(f"trial {t.number} was interrupted (the search stopped during it); closed as such, and its point is "
            "retried first")


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
    import optuna

    sp = space if isinstance(space, Space) else load_space(space)
    say = log or (lambda m: None)
    out = Path(out_dir)
    # Before any trial: a search whose results cannot be written must not run for an hour first.
    from .preflight import check_out_dir

    check_out_dir(out)
    sp = pin_threads(sp, say)
    spec = sp.search
    target = spec.target or sp.recipe(sp.first_point()).targets[0].kind
    pool = _RayPool(sp, target, address, workers, cache_dir, say) if executor == "ray" else None
    out.mkdir(parents=True, exist_ok=True)
    limits = spec.limits()
    directions: list[Literal["minimize", "maximize"]] = ["minimize"] * len(spec.objectives)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = Path(sp.source).stem
    study = _open_study(out / "search.db", study_name, directions,
                        lambda drawn: _sampler(spec, _constraint_values if limits else None, drawn))
    close_interrupted(study, warn or say)  # what an earlier, stopped process left running: said even when quiet
    done = [t for t in study.trials if t.state.is_finished() and INTERRUPTED not in t.user_attrs]
    budget = max(0, (trials or spec.trials) - len(done))
    deadline = time.monotonic() + (timeout_s or spec.timeout_s or math.inf)
    if done:
        say(f"resuming {study_name}: {len(done)} trial(s) already finished in {out / 'search.db'}")
    needed = [*spec.objectives, *limits]
    clock = {"start": time.monotonic(), "told": 0, "budget": budget, "deadline": deadline}
    # Probe a trial untrained first only when its probe can rule it out: a constraint on a metric
    # the probe measures, or objectives it all measures (dominance).
    probing = spec.early_pruning and (any(c in PROBE_METRICS for c in limits)
                                      or all(o in PROBE_METRICS for o in spec.objectives))

    def probe_for(rec: Recipe) -> Recipe | None:
        return probe_recipe(rec, spec.batch, target) if probing else None

    def judge(trial: Any, pres: dict[str, Any], secs: float) -> bool:
        """Tell the study a trial its probe ruled out (True), or let it go on to training."""
        if not pres["ok"]:
            # An untrained model may fail where the trained one passes (a parity check, say): no verdict.
            trial.set_user_attr("probe_error", pres["error"])
            say(f"trial {trial.number}: {pres['error'][:200]}; trained without a probe verdict")
            return False
        reason = hopeless(pres["metrics"], spec, limits, _feasible(study), session_spread(study.trials)[0])
        if reason is None:
            return False
        _tell(study, trial, {"ok": False, "pruned": reason, "probe": pres["metrics"]}, secs, spec, limits, say, clock)
        return True

    def ask() -> tuple[Any, Recipe] | None:
        if time.monotonic() > deadline:
            return None
        trial = study.ask()
        values = {p.name: _suggest(trial, p) for p in sp.params}
        rec = sp.recipe(values).model_copy(update={"name": f"trial{trial.number}"})
        trial.set_user_attr("recipe", rec.pipeline_text())
        return trial, rec

    started = 0
    try:
        rec0 = sp.recipe(sp.first_point())
        root_train: dict[str, Any] = {"train_s": 0.0, "threads": None}
        if budget and rec0.model.train_epochs:
            # Once, before any trial: two trials started side by side on a cold cache each trained it.
            root_train = prepare_root(rec0, cache_dir) if pool is None else pool.prepare(rec0)
            if root_train["error"] is not None:
                raise CompressError(f"training the model before the search: {root_train['error']}")
            say(f"model trained {rec0.model.train_epochs} epochs before the trials "
                f"({root_train['train_s']:.1f} s, {root_train['threads']} thread(s); a cache hit when 0)")
        if pool is None:
            while started < budget and (nxt := ask()) is not None:
                started += 1
                trial, rec = nxt
                t0 = time.monotonic()
                prec = probe_for(rec)
                if prec is not None and judge(trial, probe_trial(prec, out / "trials" / rec.name / "probe", cache_dir,
                                                                 target, spec.batch), time.monotonic() - t0):
                    continue
                # Built first with every core (training), then measured from the cache with the pinned threads.
                built = build_trial(rec, cache_dir)
                if built["error"] is not None:
                    res = {"ok": False, "error": built["error"]}
                else:
                    res = evaluate_trial(rec, out / "trials" / rec.name, cache_dir, target, spec.batch, needed)
                    res["timing"] = {"train_s": built["train_s"], "build_s": built["build_s"],
                                     "train_threads": built["threads"]}
                _tell(study, trial, res, time.monotonic() - t0, spec, limits, say, clock)
        else:
            started = pool.run(ask, budget, out, spec, needed, probe_for, judge,
                               lambda trial, res, secs: _tell(study, trial, res, secs, spec, limits, say, clock))
        if started < budget:
            say(f"time budget reached after {started} new trial(s)")
        if spec.retime_front:
            _retime(study, sp, out, cache_dir, target, say, pool)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trials under way are closed now, and retried first on resume
        close_interrupted(study, say)
        raise
    finally:
        if pool is not None:
            pool.close()
    result = write_results(study, sp, out, target)
    result["root_train"] = root_train  # this invocation's training of the model (not kept in the study)
    return result


def _retime(study: Any, sp: Space, out: Path, cache_dir: str | Path | None, target: str,
            say: Callable[[str], None], pool: _RayPool | None) -> None:
    """Time the feasible front again, every model in one run. Each trial's ratio came from its own
    run, and a run-wide state of the machine can move a small model's ratio by a quarter with
    intervals that do not show it (benchmarks/RESULTS.md, search); in one run the front's models
    share that state, so they can be ranked against each other."""
    front = _front(study)
    if len(front) < 2:
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
        f"trial {name[5:]} {m['latency_ratio']:.4g}" for name, m in res.items()))


def retime_trials(recs: dict[str, Recipe], out: Path, cache_dir: str | Path | None, target: str,
                  batch: int) -> dict[str, dict[str, Any]] | str:
    """Time several trials' models in one run, interleaved with the original (cached builds); each
    one's latency figures, or the error line."""
    from .pipeline import run as run_recipe

    first = next(iter(recs.values()))
    base = first.model_copy(update={"name": "front", "targets": [t for t in first.targets if t.kind == target],
                                    "measure": first.measure.model_copy(update={"batch_sizes": [batch]})})
    try:
        report = run_recipe(base, out_dir=out, cache_dir=cache_dir, progress=False, write=True,
                            variants={name: list(r.passes) for name, r in recs.items()})
        metrics = {name: trial_metrics(report, name, target, batch) for name in recs}
    except CompressError as e:
        return str(e).splitlines()[0][:300]
    keep = ("latency_ratio", "latency_ratio_ci", "p50_ms")
    return {name: {k: m[k] for k in keep if k in m} for name, m in metrics.items()}


def _values(sp: Space, t: Any) -> dict[str, Any]:
    """A finished trial's point of the space (choices stored by index mapped back to their values)."""
    return {p.name: t.params[p.name] if p.kind != "choice" or p.name in t.params
            else p.choices[t.params[p.name + "#"]] for p in sp.params
            if p.name in t.params or p.name + "#" in t.params}


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


def evaluate_trial(rec: Recipe, out: Path, cache_dir: str | Path | None, target: str, batch: int,
                   needed: list[str]) -> dict[str, Any]:
    """Run one trial's recipe (cached steps are reused) and return its metrics, or why it failed."""
    from .pipeline import run as run_recipe

    try:
        report = run_recipe(rec, out_dir=out, cache_dir=cache_dir, progress=False, write=True)
        m = trial_metrics(report, rec.name, target, batch)
        missing = [o for o in needed if o not in m]
        if missing:
            raise CompressError(f"metric(s) {', '.join(missing)} could not be measured for this trial")
    except CompressError as e:
        return {"ok": False, "error": str(e).splitlines()[0][:500]}
    return {"ok": True, "metrics": m, "host": _host()}


def probe_recipe(rec: Recipe, batch: int, target: str) -> Recipe | None:
    """The trial's recipe without its training: passes that only train (``PassCaps.trains_only``:
    distill) left out, their training settings (``PassCaps.training_fields``) set to 0, and a
    short latency measurement at the search batch on the search target. Training changes weights,
    not shapes, so the probe's MACs, parameters, compiled size and latency are the trial's (its
    accuracy is not, and is not used). None when the trial has no training to save."""
    if any(getattr(p, "max_accuracy_drop", None) is not None for p in rec.passes):
        return None  # accuracy-controlled quantization picks its float nodes by the trained model's accuracy
    from .registry import get_pass

    passes = []
    for p in rec.passes:
        caps = get_pass(p.kind).caps  # what the pass declares it trains (PassCaps)
        if caps.trains_only:
            continue
        upd: dict[str, Any] = {f: 0 for f in caps.training_fields if getattr(p, f, 0)}
        passes.append(p.model_copy(update=upd) if upd else p)
    if passes == list(rec.passes):
        return None
    # The fidelity guard judges an untrained model here; it only refuses, it does not shape the model.
    passes = [p.model_copy(update={"min_sample_cosine": None}) if getattr(p, "min_sample_cosine", None) else p
              for p in passes]
    m = rec.measure
    fast = m.model_copy(update={"batch_sizes": [batch], "warmup": min(m.warmup, 2), "min_runs": min(m.min_runs, 15),
                                "min_time_s": min(m.min_time_s, 0.2)})
    return rec.model_copy(update={"passes": passes, "measure": fast,
                                  "targets": [t for t in rec.targets if t.kind == target]})


def probe_trial(rec: Recipe, out: Path, cache_dir: str | Path | None, target: str, batch: int) -> dict[str, Any]:
    """Build and time a probe recipe (see :func:`probe_recipe`); its structure metrics, or why it failed."""
    from .pipeline import run as run_recipe

    try:
        report = run_recipe(rec, out_dir=out, cache_dir=cache_dir, progress=False, write=False, aa_session=False)
        m = trial_metrics(report, rec.name, target, batch)
    except CompressError as e:
        return {"ok": False, "error": "probe (untrained): " + str(e).splitlines()[0][:480]}
    keep = (*PROBE_METRICS, "latency_ratio_ci", "p50_ci", "threads")
    return {"ok": True, "metrics": {k: v for k, v in m.items() if k in keep}}


_Z95 = 1.959964


def _unwiden(ratio: float, low: float, high: float, d: float) -> list[float]:
    """The paired interval before :func:`compress.stats.widen` combined z * d into it (in quadrature)."""
    zd = _Z95 * d
    lo = math.sqrt(max(math.log(ratio / low) ** 2 - zd * zd, 0.0))
    hi = math.sqrt(max(math.log(high / ratio) ** 2 - zd * zd, 0.0))
    return [ratio * math.exp(-lo), ratio * math.exp(hi)]


def session_spread(trials: list[Any]) -> tuple[float, int]:
    """The between-session spread of latency (log scale) pooled over the search's finished trials.

    Each trial's run times the baseline in a second session beside the first (the A/A offset d);
    one run's interval is widened by its own single draw of d, which is often far below the
    spread (|d| of one draw is under a quarter of its standard deviation one time in five), so two
    runs of one trial disagreed beyond their intervals. A search has many draws: their root mean
    square estimates the spread with as many degrees of freedom as trials. (0, 0) without any."""
    ds = [float(t.user_attrs["aa_offset"]) for t in trials
          if t.state.name == "COMPLETE" and t.user_attrs.get("aa_offset") is not None]
    if not ds:
        return 0.0, 0
    return math.sqrt(sum(d * d for d in ds) / len(ds)), len(ds)


def pooled_ci(attrs: dict[str, Any], spread: float) -> list[float] | None:
    """A trial's latency-ratio interval widened by the pooled session spread instead of its own draw."""
    raw, r = attrs.get("latency_ratio_ci_paired"), attrs.get("latency_ratio")
    if not raw or r is None or spread <= 0:
        return attrs.get("latency_ratio_ci")
    zd = _Z95 * spread
    lo = math.hypot(math.log(r / raw[0]), zd)
    hi = math.hypot(math.log(raw[1] / r), zd)
    return [r * math.exp(-lo), r * math.exp(hi)]


def _optimistic(probe: dict[str, Any], margin: float, spread: float = 0.0) -> dict[str, float]:
    """The best each probe metric could be in the trained trial: interval low ends, less the margin
    for timings (the probe is a separate, short session; the pooled session spread when that is
    wider), less 1% for the size."""
    out: dict[str, float] = {k: float(probe[k]) for k in ("macs_ratio", "params_ratio") if k in probe}
    if "size_mb" in probe:
        out["size_mb"] = float(probe["size_mb"]) * 0.99
    for k, ci in (("latency_ratio", "latency_ratio_ci"), ("p50_ms", "p50_ci")):
        if k in probe:
            out[k] = float((probe.get(ci) or [probe[k]])[0]) / max(1 + margin, math.exp(_Z95 * spread))
    return out


def hopeless(probe: dict[str, Any], spec: SearchSpec, limits: dict[str, float], feasible: list[Any],
             spread: float = 0.0) -> str | None:
    """Why a trial cannot help, judged from its untrained probe; None when it may.

    It cannot meet a constraint when even its optimistic figure is beyond the limit; it cannot
    join the front when every objective is known from the probe and a feasible finished trial is
    at least as good on all of them and better on one (with accuracy among the objectives, the
    probe cannot judge the front: training decides it)."""
    opt = _optimistic(probe, spec.probe_margin, spread)
    for c, lim in limits.items():
        if c in opt and opt[c] > lim:
            return (f"cannot meet {c} <= {lim:g}: the untrained probe measured {float(probe[c]):.4g} "
                    f"(at best {opt[c]:.4g}), before any training")
    if all(o in opt for o in spec.objectives):
        mine = [opt[o] for o in spec.objectives]
        for t in feasible:
            if all(v <= x for v, x in zip(t.values, mine, strict=True)) and list(t.values) != mine:
                return (f"dominated by trial {t.number} (" + ", ".join(f"{o} {v:.4g} vs at best {x:.4g}" for o, v, x
                                                                     in zip(spec.objectives, t.values, mine,
                                                                            strict=True)) + "), before any training")
    return None


def _host() -> str:
    import socket

    return socket.gethostname()


def _tell(study: Any, trial: Any, res: dict[str, Any], secs: float, spec: SearchSpec, limits: dict[str, float],
          say: Callable[[str], None], clock: dict[str, Any]) -> None:
    import optuna

    clock["told"] += 1
    if res.get("pruned"):
        # Optuna's pruned state: the trial stopped early by design, not a failure. Its probe
        # figures stay with it; constraint values (for the sampler) from the probe where it has them.
        trial.set_user_attr("pruned", res["pruned"])
        for key, v in res["probe"].items():
            trial.set_user_attr(f"probe_{key}", v)
        trial.set_user_attr("seconds", secs)
        if limits:
            trial.set_user_attr("constraint", [float(res["probe"][c]) - lim if c in res["probe"] else 0.0
                                               for c, lim in limits.items()])
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        say(f"trial {trial.number} ({clock['told']}/{clock['budget']}): pruned: {res['pruned']}")
        return
    if not res["ok"]:
        trial.set_user_attr("error", res["error"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        say(f"trial {trial.number}: failed: {res['error'][:200]}")
        return
    m = res["metrics"]
    for key, v in m.items():
        trial.set_user_attr(key, v)
    trial.set_user_attr("seconds", secs)
    for key, v in (res.get("timing") or {}).items():  # build_s, train_s, train_threads
        trial.set_user_attr(key, v)
    if res.get("host"):
        trial.set_user_attr("measured_on", res["host"])
    if limits:
        trial.set_user_attr("constraint", [m[c] - lim for c, lim in limits.items()])
    study.tell(trial, [float(m[o]) for o in spec.objectives])
    feasible = all(m[c] <= lim for c, lim in limits.items())
    best = _best(study)
    left = clock["deadline"] - time.monotonic()
    say(f"trial {trial.number} ({clock['told']}/{clock['budget']}): "
        + ", ".join(f"{o}={m[o]:.4g}" for o in spec.objectives)
        + ("" if feasible else " (violates a constraint)")
        + (f"; best so far trial {best.number}" if best is not None else "")
        + (f"; {left:.0f} s left" if math.isfinite(left) else "")
        + f"; {time.monotonic() - clock['start']:.0f} s elapsed")


def measure_resource() -> str:
    """The Ray resource that stands for "may time latency on a machine like this one" (one per node)."""
    from .artifact import sha256_json
    from .fingerprint import cpu_info

    c = cpu_info()
    return "measure-" + sha256_json({"cpu": c["model"], "isa": c["isa"], "cores": c["affinity_cores"]})[:16]


def training_kinds(rec: Recipe) -> set[str]:
    """Kinds of the recipe's passes that train (``PassCaps.trains_only``, or a training setting above 0):
    their steps' time is the trial's training time."""
    from .registry import get_pass

    out = set()
    for p in rec.passes:
        caps = get_pass(p.kind).caps
        if caps.trains_only or any(getattr(p, f, 0) for f in caps.training_fields):
            out.add(p.kind)
    return out


def training_seconds(rec: Recipe, steps: list[tuple[str, float, bool]]) -> float:
    """Seconds the trial's training passes ran (``(kind, seconds, cache_hit)`` per step; hits cost nothing)."""
    kinds = training_kinds(rec)
    return sum(secs for kind, secs, hit in steps if kind in kinds and not hit)


def task_threads(task_cpus: float, node_cpus: float, cores: int) -> int:
    """Threads a Ray task may train with: its share of the node's cores. A local cluster started with
    ``workers`` CPUs on a machine with more cores gives each CPU cores/workers of them (one worker
    trains on every core, two on half each); a cluster whose CPU count is its cores gives one per CPU.
    Never more than the node's cores, so builds side by side do not oversubscribe them."""
    share = task_cpus / node_cpus if node_cpus > 0 else 1.0
    return max(1, min(cores, int(cores * share + 1e-9)))


def training_threads(share: int) -> int:
    """The threads a build trains with: its share of the cores, less the cores other processes hold
    right now (a short look, as ``measure.threads = 0`` does: contention.pick_threads). A thread pool
    larger than the free cores waits on the busy one every step: on a 2-core machine with another
    process on one core, a 76-epoch digits-CNN distillation at 2 threads took about 100 s, where an
    82-epoch one at 2 threads on a quiet moment took 16 s (benchmarks/results/search.md)."""
    from .contention import ContentionProbe, pick_threads

    n, _ = pick_threads(0, share, ContentionProbe(share).before(0.3)) if share > 1 else (1, None)
    return n


def _task_share() -> int:
    """In a Ray task: its share of its node's cores (task_threads)."""
    import ray

    from .fingerprint import cpu_info

    ctx = ray.get_runtime_context()
    cpus = float(ctx.get_assigned_resources().get("CPU", 1.0))
    node = next((n for n in ray.nodes() if n.get("NodeID") == ctx.get_node_id()), None)
    node_cpus = float(node["Resources"].get("CPU", cpus)) if node is not None else cpus
    return task_threads(cpus, node_cpus, int(cpu_info()["affinity_cores"] or 1))


def _root(rec: Recipe, cache: Any) -> tuple[Any, Any, float]:
    """The recipe's root model trained as the recipe asks (from the cache when it is there), its data,
    and the seconds training took here (0 on a cache hit)."""
    from .data import load_data
    from .execute import train_root
    from .manager import PassContext
    from .models import load_model

    root = load_model(rec.model, cache)
    data = load_data(rec.data, root.inputs[0].shape, root.inputs, model_source=rec.model.source)
    said: list[str] = []
    ctx = PassContext(cache=cache, data=data, seed=rec.seed, progress=False, log=said.append)
    t0 = time.perf_counter()
    if rec.model.train_epochs and data is not None:
        root = train_root(root, data, rec.model.train_epochs, rec.seed, ctx)
    # Training seconds only when it trained here; train_root says "cache hit" when it did not.
    secs = 0.0 if any(m.endswith("cache hit") for m in said) else time.perf_counter() - t0
    ctx.log = lambda m: None
    return root, ctx, secs


def prepare_root(rec: Recipe, cache_dir: str | Path | None, ray_task: bool = False) -> dict[str, Any]:
    """Train the space's root model into the (shared) cache once, before any trial: trials started
    side by side would each train it from a cold cache. ``train_s``, ``threads``; ``error`` when it fails."""
    from .cache import Cache

    threads = _pin_threads_for_training(ray_task)
    try:
        _, _, secs = _root(rec, Cache(Path(cache_dir) if cache_dir else None))
    except CompressError as e:
        return {"error": str(e).splitlines()[0][:500], "train_s": 0.0, "threads": threads}
    return {"error": None, "train_s": secs, "threads": threads}


def _pin_threads_for_training(ray_task: bool) -> int:
    """Set the threads torch trains with: in a Ray task its share of the node (_task_share), in this
    process every core it may use; either less the cores others hold now (training_threads). Set for
    every build: Ray sets OMP_NUM_THREADS per task but torch reads it once per worker process, and a
    pipeline run sets torch to measure.threads (1 in a search, see pin_threads) and leaves it there."""
    import torch

    from .fingerprint import cpu_info

    threads = training_threads(_task_share() if ray_task else int(cpu_info()["affinity_cores"] or 1))
    torch.set_num_threads(threads)
    return threads


def build_trial(rec: Recipe, cache_dir: str | Path | None, ray_task: bool = False) -> dict[str, Any]:
    """Run a trial's passes into the (shared) cache without measuring. ``error`` (the line, or None),
    ``build_s`` and ``train_s`` (its training passes' seconds, and the root's if it trained here),
    ``threads`` torch trained with (see _pin_threads_for_training)."""
    from .artifact import ONNX
    from .cache import Cache
    from .manager import PassManager
    from .plan import with_lowering
    from .registry import make_target

    threads = _pin_threads_for_training(ray_task)
    t0 = time.perf_counter()
    try:
        cache = Cache(Path(cache_dir) if cache_dir else None)
        root, ctx, root_s = _root(rec, cache)
        ctx.original = root
        need_onnx = any(make_target(t).caps.consumes == ONNX for t in rec.targets)
        passes, _ = with_lowering(list(rec.passes), need_onnx, root.kind)
        _, records = PassManager(passes).run(root, ctx)
    except CompressError as e:
        return {"error": str(e).splitlines()[0][:500], "build_s": time.perf_counter() - t0, "train_s": 0.0,
                "threads": threads}
    steps = [(r.kind, r.seconds, r.cache_hit) for r in records]
    return {"error": None, "build_s": time.perf_counter() - t0, "train_s": root_s + training_seconds(rec, steps),
            "threads": threads}


def _probe_targets(kinds: list[str]) -> dict[str, str | None]:
    from .registry import get_target_config, make_target

    return {k: make_target(get_target_config(k)()).unavailable_reason() for k in kinds}


def _check_answers(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a Ray address whose port does not accept a connection (ray.init would retry for minutes)."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RecipeError(f"--address {address}: write it as HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RecipeError(f"--address {address}: the Ray cluster does not answer ({e.strerror or e}); start it "
                          "with `ray start --head` or drop --address for a local cluster") from None


class _RayPool:
    """Trials on a Ray cluster: builds anywhere, measurements one at a time on matching nodes."""

    def __init__(self, sp: Space, target: str, address: str | None, workers: int,
                 cache_dir: str | Path | None, say: Callable[[str], None]) -> None:
        try:
            import ray
        except ImportError as e:
            raise RecipeError(f"--executor ray needs Ray ({e}); pip install 'compress-pipeline[ray]'") from None
        self.ray, self.say, self.cache_dir, self.target = ray, say, cache_dir, target
        self.key = measure_resource()
        if address:
            _check_answers(address)
        try:
            if address:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            else:
                # A local cluster: `workers` CPUs, and this machine declared as one measuring node.
                ray.init(num_cpus=workers, resources={self.key: 1}, include_dashboard=False,
                         logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RecipeError(f"--address {address}: the Ray cluster does not answer ({str(e).splitlines()[0]}); "
                              "start it with `ray start --head` or drop --address for a local cluster") from None
        if ray.cluster_resources().get(self.key, 0) < 1:
            self.close()
            raise RecipeError(f"no node of the Ray cluster at {address} can measure for this machine kind "
                              f"(resource {self.key}); start the measuring node with "
                              f"ray start --resources='{{\"{self.key}\": 1}}'")
        # A build holds one Ray CPU and trains with that CPU's share of its node's cores (task_threads).
        self.build = ray.remote(num_cpus=1)(build_trial)
        # A timed task holds every CPU of its node, so no build of this search trains beside it: with
        # only its own thread's CPU held, a build on the other core moved two-worker timings of one
        # trial well outside a local run's interval (benchmarks/RESULTS.md, search).
        node_cpus = [int(n["Resources"].get("CPU", 1)) for n in ray.nodes()
                     if n.get("Alive") and n["Resources"].get(self.key)]
        cpus = max(1, min(node_cpus, default=1))
        self.measure = ray.remote(num_cpus=cpus, resources={self.key: 1})(evaluate_trial)
        self.probe = ray.remote(num_cpus=cpus, resources={self.key: 1})(probe_trial)
        self.cpus = cpus
        # Training the root before any trial may use a whole node (the smallest, to fit on any).
        self.prepare_cpus = max(1, min((int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")),
                                       default=1))
        kinds = sorted({t.kind for t in sp.recipe(sp.first_point()).targets})
        reasons = ray.get(ray.remote(num_cpus=0, resources={self.key: 1})(_probe_targets).remote(kinds))
        if reasons.get(target):
            self.close()
            raise RecipeError(f"target {target!r} cannot run on the measuring node: {reasons[target]}")
        self.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)))
        say(f"ray: {self.parallel} CPU(s), measuring on resource {self.key}")

    def run(self, ask: Callable[[], tuple[Any, Recipe] | None], budget: int, out: Path, spec: SearchSpec,
            needed: list[str], probe_for: Callable[[Recipe], Recipe | None],
            judge: Callable[[Any, dict[str, Any], float], bool],
            tell: Callable[[Any, dict[str, Any], float], None]) -> int:
        ray = self.ray
        pending: dict[Any, tuple[str, Any, Recipe, float]] = {}
        built: dict[int, dict[str, Any]] = {}
        started = 0
        while True:
            # While a timed task waits for its node, no new build starts (it would take the CPUs the
            # measurement waits for, and a build started later could overtake it for ever).
            while started < budget and len(pending) < self.parallel and not any(
                    v[0] in ("probe", "measure") for v in pending.values()):
                nxt = ask()
                if nxt is None:
                    budget = started  # the time budget is spent: finish what runs
                    break
                trial, rec = nxt
                started += 1
                prec = probe_for(rec)
                if prec is not None:  # timed, so on the measuring node like any measurement
                    ref0 = self.probe.remote(prec, out / "trials" / rec.name / "probe", self.cache_dir, self.target,
                                             spec.batch)
                    pending[ref0] = ("probe", trial, rec, time.monotonic())
                else:
                    pending[self.build.remote(rec, self.cache_dir, True)] = ("build", trial, rec, time.monotonic())
            if not pending:
                return started
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            stage, trial, rec, t0 = pending.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as e:  # a worker died or a task raised an unexpected error
                tell(trial, {"ok": False, "error": f"ray task failed: {str(e).splitlines()[0][:300]}"},
                     time.monotonic() - t0)
                continue
            if stage == "probe":
                if not judge(trial, res, time.monotonic() - t0):
                    pending[self.build.remote(rec, self.cache_dir, True)] = ("build", trial, rec, t0)
                continue
            if stage == "build":
                if res["error"] is not None:
                    tell(trial, {"ok": False, "error": res["error"]}, time.monotonic() - t0)
                    continue
                built[trial.number] = {"train_s": res["train_s"], "build_s": res["build_s"],
                                       "train_threads": res["threads"]}
                ref2 = self.measure.remote(rec, out / "trials" / rec.name, self.cache_dir, self.target, spec.batch,
                                           needed)
                pending[ref2] = ("measure", trial, rec, t0)
            else:
                if res.get("ok") and trial.number in built:  # the build trained; the measurement found it cached
                    res = {**res, "timing": built.pop(trial.number)}
                tell(trial, res, time.monotonic() - t0)

    def prepare(self, rec: Recipe) -> dict[str, Any]:
        """Train the root into the shared cache in one task that holds a whole node (see prepare_root)."""
        ray = self.ray
        try:
            return dict(ray.get(ray.remote(num_cpus=self.prepare_cpus)(prepare_root).remote(rec, self.cache_dir, True)))
        except ray.exceptions.RayError as e:  # a worker died or the task raised an unexpected error
            return {"error": f"ray task failed: {str(e).splitlines()[0][:300]}", "train_s": 0.0, "threads": None}

    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one timed task on the measuring node, holding it whole, and wait for it."""
        ray = self.ray
        return ray.get(ray.remote(num_cpus=self.cpus, resources={self.key: 1})(fn).remote(*args))

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def _feasible(study: Any) -> list[Any]:
    """Finished trials that meet every constraint."""
    return [t for t in study.trials if t.state.name == "COMPLETE"
            and all(v <= 0 for v in t.user_attrs.get("constraint", []))]


def _best(study: Any) -> Any:
    """The feasible trial best on the first objective (ties broken by the others)."""
    return min(_feasible(study), key=lambda t: tuple(t.values), default=None)


def _final_best(study: Any, spec: SearchSpec) -> Any:
    """The best trial; on latency, ranked by the front's re-timing in one run when there is one."""
    rt = study.user_attrs.get("retimed") or {}
    front = _front(study)
    if spec.objectives[0] == "latency_ratio" and front and all(str(t.number) in rt for t in front):
        return min(front, key=lambda t: (rt[str(t.number)]["latency_ratio"], *t.values[1:]))
    return _best(study)


def _front(study: Any) -> list[Any]:
    """Pareto-optimal feasible trials."""
    ok = _feasible(study)
    return [t for t in ok if not any(all(a <= b for a, b in zip(o.values, t.values, strict=True))
                                     and o.values != t.values for o in ok)]


def write_results(study: Any, sp: Space, out: Path, target: str) -> dict[str, Any]:
    spec = sp.search
    spread, draws = session_spread(study.trials)
    rt = study.user_attrs.get("retimed") or {}
    trials = []
    for t in study.trials:
        metrics = {k: v for k, v in t.user_attrs.items()
                   if k not in ("recipe", "error", "pruned", INTERRUPTED, "retry_of")}
        if "latency_ratio_ci" in metrics:  # the run's own interval stays beside the pooled one
            metrics["latency_ratio_ci_own"] = metrics["latency_ratio_ci"]
            metrics["latency_ratio_ci"] = pooled_ci(t.user_attrs, spread)
        metrics.update({f"retimed_{k}": v for k, v in rt.get(str(t.number), {}).items()})
        trials.append({"number": t.number, "state": "INTERRUPTED" if INTERRUPTED in t.user_attrs else t.state.name,
                       "retry_of": t.user_attrs.get("retry_of"), "params": t.params,
                       "recipe": t.user_attrs.get("recipe"), "error": t.user_attrs.get("error"),
                       "pruned": t.user_attrs.get("pruned"), "metrics": metrics, "values": t.values})
    front = sorted(_front(study), key=lambda t: tuple(t.values))
    best = _final_best(study, spec)
    result = {"schema": "compress.search/v1", "space": sp.source, "target": target, "batch": spec.batch,
              "objectives": spec.objectives, "constraints": spec.constraints, "sampler": spec.sampler,
              "trials": trials, "front": [t.number for t in front],
              "best": None if best is None else best.number, "storage": str(out / "search.db"),
              "session_spread": {"log_rms": round(spread, 6), "draws": draws,
                                 "note": "latency_ratio_ci is widened by this pooled between-session spread "
                                         "(latency_ratio_ci_own: by the trial's own one-draw A/A offset)"},
              "retimed": {"trials": sorted(int(n) for n in rt), "run": str(out / "front-retimed")} if rt else None}
    if best is not None:
        rec = sp.recipe(_values(sp, best)).model_copy(update={"name": f"{Path(sp.source).stem}-best"})
        (out / "best.toml").write_text(f"# best feasible trial ({best.number}) of {sp.source}; "
                                       f"objectives {', '.join(spec.objectives)}\n" + recipe_to_toml(rec))
        result["best_recipe"] = str(out / "best.toml")
    (out / "search.json").write_text(json.dumps(result, indent=1, default=str))
    lines = [f"# Search: {sp.source}", "", f"Target {target}, batch {spec.batch}; objectives "
             f"{', '.join(spec.objectives)} (minimized); constraints "
             f"{', '.join(f'{k} {v}' for k, v in spec.constraints.items()) or 'none'}.", "",
             "| trial | " + " | ".join(spec.objectives)
             + " | latency ratio 95% CI | re-timed together [95%] | recipe |",
             "|---|" + "---|" * len(spec.objectives) + "---|---|---|"]
    for t in front:
        ci = pooled_ci(t.user_attrs, spread)
        again = rt.get(str(t.number)) or {}
        ci2 = again.get("latency_ratio_ci")
        lines.append(f"| {t.number}{' (best)' if best is not None and t.number == best.number else ''} | "
                     + " | ".join(f"{v:.4g}" for v in t.values)
                     + f" | {'-' if not ci else f'[{ci[0]:.3f}, {ci[1]:.3f}]'} | "
                     + (f"{again['latency_ratio']:.4g} [{ci2[0]:.3f}, {ci2[1]:.3f}]" if again and ci2 else "-")
                     + f" | `{t.user_attrs.get('recipe')}` |")
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    if pruned:
        lines += ["", "Pruned trials (ruled out by their untrained probe, never trained):"] + [
            f"- trial {t['number']}: {t['pruned']}" for t in pruned]
    failed = [t for t in trials if t["state"] in ("FAIL", "INTERRUPTED")]
    if failed:
        lines += ["", "Failed trials:"] + [f"- trial {t['number']}: {t['error']}" for t in failed]
    (out / "front.md").write_text("\n".join(lines) + "\n")
    _plot(study, spec, front, out / "front.png")
    return result


def _plot(study: Any, spec: SearchSpec, front: list[Any], path: Path) -> None:
    if len(spec.objectives) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [t.values[0] for t in done]
    ys = [t.values[1] for t in done]
    ax.scatter(xs, ys, c="#bbbbbb", label="trials")
    f = sorted(front, key=lambda t: t.values[0])
    ax.plot([t.values[0] for t in f], [t.values[1] for t in f], "o-", c="#d62728", label="Pareto front")
    for t in f:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(spec.objectives[0])
    ax.set_ylabel(spec.objectives[1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
