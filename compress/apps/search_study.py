"""The Optuna study of a search: its storage (a killed search resumes), its sampler and constraints, asking
for a point of the space and telling a trial's result, interrupted trials closed and retried."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from .search_space import TIMED, Param, SearchSpec, Space


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


def _values(sp: Space, t: Any) -> dict[str, Any]:
    """A finished trial's point of the space (choices stored by index mapped back to their values)."""
    return {p.name: t.params[p.name] if p.kind != "choice" or p.name in t.params
            else p.choices[t.params[p.name + "#"]] for p in sp.params
            if p.name in t.params or p.name + "#" in t.params}


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
        + (f"the recipe of trial {res['repeat_of']} again, its figures reused: " if "repeat_of" in res else "")
        + ", ".join(f"{o}={m[o]:.4g}" for o in spec.objectives)
        + ("" if feasible else " (violates a constraint)")
        + (f"; best so far trial {best.number}" if best is not None else "")
        + (f"; {left:.0f} s left" if math.isfinite(left) else "")
        + f"; {time.monotonic() - clock['start']:.0f} s elapsed")


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
    first = spec.objectives[0]  # a timed ratio (latency, decode time, time to first token): re-timed figures rank
    if first in TIMED and front and all(first in rt.get(str(t.number), {}) for t in front):
        return min(front, key=lambda t: (rt[str(t.number)][first], *t.values[1:]))
    return _best(study)


def _front(study: Any) -> list[Any]:
    """Pareto-optimal feasible trials (a repeated point once: its first trial)."""
    ok = [t for t in _feasible(study) if "repeat_of" not in t.user_attrs]
    return [t for t in ok if not any(all(a <= b for a, b in zip(o.values, t.values, strict=True))
                                     and o.values != t.values for o in ok)]
