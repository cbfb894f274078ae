"""MetaSchedule plumbing for the TVM target: the tuning database on disk and a tuner that cannot hang.

Kept apart from ``tvm_compiler.py`` so the target file reads as the user sees it (config, compile,
run) and this file holds the parts that only matter while tuning. Everything here imports TVM
lazily: ``targets/`` is imported by the registry on machines without TVM.

Candidates are built and timed in one long-lived worker process under a hard timeout
(``_tvm_worker``: why neither MetaSchedule's LocalBuilder/LocalRunner nor the in-process builder this
target used before). The search itself (MetaSchedule's evolutionary search and cost model) runs here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DB_FORMAT = 1
META = "meta.json"
LEDGER = "ledger.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


class TvmDatabaseWarning(UserWarning):
    """A tuning database was found but not used (another TVM version or target, or unreadable)."""


def canonical_target(target: Any) -> dict[str, Any]:
    """The target as plain JSON with sorted keys: what a database is keyed by."""
    # str(Target) is its JSON form; export() returns FFI containers that json cannot dump.
    return json.loads(str(target))


def database_identity(target: Any, timed_on: str = "local") -> dict[str, Any]:
    """What a tuning record depends on besides the workload: TVM (and its FFI) version, the target, and
    where its candidates were timed ("local", or the RPC device: records timed on this machine must not
    stand for a device's, even when the target JSON is the same)."""
    import tvm

    from .base import module_version

    out = {
        "format": DB_FORMAT,
        "tvm": tvm.__version__,
        "tvm_ffi": module_version("apache-tvm-ffi"),
        "target": canonical_target(target),
    }
    if timed_on != "local":  # kept out of local identities, so existing local databases keep their key
        out["timed_on"] = timed_on
    return out


def _identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _describe(identity: dict[str, Any]) -> str:
    t = identity.get("target", {})
    where = identity.get("timed_on")
    return (f"TVM {identity.get('tvm', '?')}, target kind={t.get('kind', '?')} mcpu={t.get('mcpu', '-')}"
            + (f", timed on {where}" if where else ""))


@dataclass
class TuningDatabase:
    """One directory of MetaSchedule records for one (TVM version, target) pair, plus a ledger.

    Layout: ``<root>/<kind>-<mcpu>-tvm<version>-<key16>/`` holding ``meta.json`` (the full
    identity, checked on every open: the directory name is only a readable hint), MetaSchedule's
    two JSON files, and ``ledger.json`` (trials and seconds already spent per model, so a later run
    with the same or a smaller budget does no tuning). Records for other versions or targets live in
    sibling directories and are never opened; finding only those is reported as a warning.
    """

    root: Path
    path: Path
    identity: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    _db: Any = None

    @classmethod
    def open(cls, root: Path, target: Any, log: Callable[[str], None], timed_on: str = "local") -> TuningDatabase:
        identity = database_identity(target, timed_on)
        key = _identity_key(identity)
        t = identity["target"]
        name = (f"{t.get('kind', 'target')}-{t.get('mcpu', 'generic')}-tvm{identity['tvm']}"
                + ("" if timed_on == "local" else "-rpc") + f"-{key[:16]}")
        root.mkdir(parents=True, exist_ok=True)
        db = cls(root=root, path=root / name, identity=identity)
        db._check_foreign(log)
        db.path.mkdir(exist_ok=True)
        meta = db.path / META
        if not meta.exists():
            meta.write_text(json.dumps(identity, indent=2, sort_keys=True))
        return db

    def _warn(self, msg: str, log: Callable[[str], None]) -> None:
        self.notes.append(msg)
        log(f"warning: {msg}")
        warnings.warn(msg, TvmDatabaseWarning, stacklevel=3)

    def _check_foreign(self, log: Callable[[str], None]) -> None:
        # A bare MetaSchedule work_dir says nothing about the TVM version or target it came from.
        if (self.root / WORKLOADS).exists() or (self.root / RECORDS).exists():
            self._warn(f"tuning database files at {self.root} carry no {META} (unknown TVM version and "
                       f"target); ignored, never used. Tuning records go to {self.path}", log)
        if self.path.exists():
            problem = self._own_dir_problem()
            if problem is not None:
                aside = self.path.with_name(f"{self.path.name}.foreign-{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
                self.path.rename(aside)
                self._warn(f"tuning database {self.path} {problem}; ignored, never used, moved aside to "
                           f"{aside.name}; tuning from scratch", log)
            return
        others = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and (p / META).exists()):
            try:
                other = json.loads((d / META).read_text())
            except (OSError, ValueError):
                continue
            if other != self.identity:
                others.append(f"{d.name} ({_describe(other)})")
        if others:
            self._warn(f"no tuning records for {_describe(self.identity)} in {self.root}; records there for "
                       f"another TVM version, target or timing device are ignored, never used: {', '.join(others[:3])}"
                       + (f" and {len(others) - 3} more" if len(others) > 3 else ""), log)

    def _own_dir_problem(self) -> str | None:
        meta = self.path / META
        if not meta.exists():
            return f"has no {META}"
        try:
            found = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            return f"has an unreadable {META} ({e})"
        if found != self.identity:
            return (f"was written by {_describe(found)} (TVM FFI {found.get('tvm_ffi', '?')}), "
                    f"not {_describe(self.identity)} (TVM FFI {self.identity['tvm_ffi']})")
        return None

    def ms_database(self) -> Any:
        """The MetaSchedule JSONDatabase; every record in it must carry our target."""
        if self._db is None:
            from tvm.s_tir import meta_schedule as ms

            self._db = ms.database.JSONDatabase(str(self.path / WORKLOADS), str(self.path / RECORDS))
        return self._db

    def verify_records(self, target: Any, log: Callable[[str], None]) -> None:
        """Records name their target; one for another target means the directory was tampered with."""
        want = canonical_target(target)
        for rec in self.ms_database().get_all_tuning_records():
            if rec.target is not None and canonical_target(rec.target) != want:
                self._db = None
                aside = self.path.with_name(f"{self.path.name}.foreign-{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
                self.path.rename(aside)
                self._warn(f"tuning database {self.path} holds records for target {rec.target}, not {want}; "
                           f"ignored, never used, moved aside to {aside.name}; tuning from scratch", log)
                self.path.mkdir()
                (self.path / META).write_text(json.dumps(self.identity, indent=2, sort_keys=True))
                return

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise tuning runs on one database (two processes appending records would interleave)."""
        with (self.path / ".lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ledger(self) -> dict[str, Any]:
        p = self.path / LEDGER
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            # A torn ledger only costs re-tuning; the records themselves are untouched.
            return {}

    def spent(self, model_key: str) -> dict[str, Any]:
        return self.ledger().get(model_key, {"trials": 0, "seconds": 0.0})

    def record_spent(self, model_key: str, trials: int, seconds: float, tasks: int) -> None:
        led = self.ledger()
        prev = led.get(model_key, {"trials": 0, "seconds": 0.0})
        led[model_key] = {"trials": int(prev["trials"]) + trials, "seconds": round(float(prev["seconds"]) + seconds, 3),
                          "tasks": tasks, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = self.path / (LEDGER + ".tmp")
        tmp.write_text(json.dumps(led, indent=2, sort_keys=True))
        tmp.replace(self.path / LEDGER)


def model_key(tasks: list[Any]) -> str:
    """A model's tuning identity: the structural hashes and weights of its tasks (weights excluded)."""
    from tvm_ffi import structural_hash

    items = sorted(f"{structural_hash(t.dispatched[0])}:{t.weight}" for t in tasks)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


SKIPPED = "not measured: the tuning time budget was spent"


@dataclass
class TuneStats:
    trials: int = 0
    candidates: int = 0  # sent to the worker
    skipped: int = 0  # left unmeasured when the time budget ran out
    build_errors: int = 0
    run_errors: int = 0
    timeouts: int = 0  # killed at the candidate timeout
    crashes: int = 0  # the worker died under the candidate
    build_s: float = 0.0
    run_s: float = 0.0
    worker_s: float = 0.0  # round trips to the worker, build and timing included
    slowest_candidate_s: float = 0.0
    remote_timed: int = 0  # candidates timed on the RPC device (the target's rpc), not here
    stopped_by_time: bool = False
    best_s: dict[int, float] = field(default_factory=dict)
    visits: list[int] = field(default_factory=list)  # task ids in the order batches went to them (dominant)


class _Tuner:
    """What the builder, runner and measure callback of ``make_tuner_parts`` share: the candidates in flight,
    the worker, the budgets and the progress lines. Plain Python; MetaSchedule's classes delegate to it."""

    def __init__(self, stats: TuneStats, tasks: list[Any], deadline: float | None, progress: Callable[[str], None],
                 evaluator: dict[str, Any], budget: int, worker: Any, timeout_s: float,
                 remote: dict[str, Any] | None) -> None:
        from ._tvm_worker import hang_candidates

        self.stats, self.deadline, self.progress, self.evaluator = stats, deadline, progress, evaluator
        self.budget, self.worker, self.timeout_s, self.remote = budget, worker, timeout_s, remote
        self.pending: dict[str, tuple[Any, Any]] = {}
        self.counter = iter(range(1 << 62))
        self.t_start = time.perf_counter()
        self.hang = hang_candidates()
        self.names = [t.task_name for t in tasks]
        self.weights = [t.weight for t in tasks]

    def over_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def stop_if_over_time(self, task_scheduler: Any) -> None:
        stats = self.stats
        if not self.over_time() or stats.stopped_by_time:
            return
        if stats.trials >= self.budget:
            # The trial budget is spent too: the scheduler is joining its last batches and terminates the
            # tasks itself (terminating one here first fails its check that a task ends only once).
            return
        stats.stopped_by_time = True
        self.progress(f"tvm tuning: time budget reached after {time.perf_counter() - self.t_start:.0f} s; stopping")
        for i, rec in enumerate(task_scheduler.tasks_):
            if not rec.is_terminated:
                task_scheduler.terminate_task(i)

    def hand_over(self, mod: Any, target: Any) -> str:
        """The builder's part: keep the candidate's module for the runner; its key stands for the artifact."""
        key = f"candidate:{next(self.counter)}"
        self.pending[key] = (mod, target)
        return key

    def measure(self, key: str, args_info: list[Any]) -> tuple[list[float] | None, str | None]:
        """The runner's part: build and time one candidate in the worker; its costs, or why there are none."""
        from ._tvm_worker import build_and_time

        stats = self.stats
        mod, target = self.pending.pop(key)
        if self.over_time():
            stats.skipped += 1
            return None, SKIPPED
        stats.candidates += 1
        res = self.worker.call(build_and_time, (mod, target, [a.as_json() for a in args_info], self.evaluator,
                                                stats.candidates in self.hang, self.remote), self.timeout_s)
        stats.worker_s += res.seconds
        stats.slowest_candidate_s = max(stats.slowest_candidate_s, res.seconds)
        if res.status == "ok":
            v = res.value
            stats.build_s += v.get("build_s", 0.0)
            stats.run_s += v.get("run_s", 0.0)
            if v["ok"]:
                stats.remote_timed += bool(v.get("remote"))
                return v["costs"], None
            # The worker answered: the candidate failed to build or run.
            if v["phase"] == "build":
                stats.build_errors += 1
            else:
                stats.run_errors += 1
            return None, f"{v['phase']} failed: {v['error']}"
        # Timeout or crash: the worker is gone and is replaced for the next candidate.
        if res.status == "timeout":
            stats.timeouts += 1
        else:
            stats.crashes += 1
        msg = f"candidate {stats.candidates}: {res.error}"
        self.progress(f"tvm tuning: {msg} (after {res.seconds:.1f} s); a fresh worker takes the next candidate")
        return None, msg

    def record(self, add_to_database: Any, task_scheduler: Any, task_id: int, measure_candidates: list[Any],
               builder_results: list[Any], runner_results: list[Any]) -> None:
        """The measure callback's part: record what was measured, keep each task's best, report, stop on time."""
        stats = self.stats
        # Candidates left unmeasured when the time ran out are not recorded: a record (even a failed
        # one) marks a schedule as measured, and a later run would never try it.
        keep = [i for i, rr in enumerate(runner_results) if rr.error_msg != SKIPPED]
        if keep:
            add_to_database.apply(task_scheduler, task_id, [measure_candidates[i] for i in keep],
                                  [builder_results[i] for i in keep], [runner_results[i] for i in keep])
        stats.trials += len(measure_candidates)
        for rr in runner_results:
            if rr.error_msg is None and rr.run_secs:
                lat = sum(float(s) for s in rr.run_secs) / len(rr.run_secs)
                stats.best_s[task_id] = min(stats.best_s.get(task_id, lat), lat)
        self.progress(progress_line(stats, task_id, self.names, self.weights, self.budget,
                                    time.perf_counter() - self.t_start, self.deadline))
        self.stop_if_over_time(task_scheduler)


def make_tuner_parts(stats: TuneStats, tasks: list[Any], deadline: float | None, progress: Callable[[str], None],
                     evaluator: dict[str, Any], budget: int, worker: Any,
                     timeout_s: float, scheduler_kind: str = "dominant",
                     remote: dict[str, Any] | None = None) -> tuple[Any, Any, Any, Any]:
    """A builder and runner that measure each candidate in ``worker`` (``_tvm_worker``) under a hard
    timeout, a measure callback that records results in the database and reports progress (it replaces
    MetaSchedule's AddToDatabase), and a task scheduler, all sharing ``stats``.

    The builder only hands each candidate's module through: building and timing happen in one worker
    call in the runner, under one timeout, so no library goes to disk and back. Candidates left when the
    time budget is spent are not measured (reported as skipped), so a run overshoots its time budget
    by at most the candidate in flight (its timeout at worst) and one search step.

    ``scheduler_kind`` "dominant" (the default) is ``dominant_first_scheduler``. MetaSchedule's own
    schedulers remain for A/B runs; with a time budget "gradient" falls back to round-robin: the
    gradient scheduler sends its whole first round (one batch per task) before joining any result,
    and refuses to have a task terminated during that round, so its time budget could only be
    checked after every task had been searched once (on ResNet-18 a 180 s budget ran 316 s).
    Round-robin joins each batch right away (our runner is synchronous), so the budget is checked
    after every batch.

    ``remote`` ({"rpc": address, "cc": compiler or None}): candidates are timed on that device
    (``_tvm_worker.build_and_time``), under the same timeout.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    if scheduler_kind == "dominant":
        scheduler = dominant_first_scheduler(stats)
    elif scheduler_kind == "gradient" and deadline is None:
        scheduler = ms.TaskScheduler.create("gradient")
    else:  # round-robin, or gradient under a time budget (see the docstring)
        scheduler = ms.TaskScheduler.create("round-robin")
    tuner = _Tuner(stats, tasks, deadline, progress, evaluator, budget, worker, timeout_s, remote)

    @derived_object
    class PassThroughBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            return [BuilderResult(tuner.hand_over(bi.mod, bi.target), None) for bi in build_inputs]

    @derived_object
    class WorkerRunner(PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            return [LocalRunnerFuture(*tuner.measure(ri.artifact_path, ri.args_info)) for ri in runner_inputs]

    add_to_database = ms.measure_callback.AddToDatabase()

    @derived_object
    class RecordAndReport(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: list[Any],
                  builder_results: list[Any], runner_results: list[Any]) -> None:
            tuner.record(add_to_database, task_scheduler, task_id, measure_candidates, builder_results,
                         runner_results)

    return PassThroughBuilder(), WorkerRunner(), RecordAndReport(), scheduler


def dominant_next(alive: list[int], batches: dict[int, int], weights: list[float], flops: list[float],
                  best_s: dict[int, float]) -> int:
    """The task ``dominant_first_scheduler`` gives the next batch to (see there); ties go to the lower index."""
    unvisited = [i for i in alive if i not in batches]
    if unvisited:
        return max(unvisited, key=lambda i: (weights[i] * flops[i], -i))

    def share(i: int) -> float:
        best = best_s.get(i)
        # Visited but no valid measurement yet (every candidate failed): its FLOP count stands in, at an
        # optimistic 100 GFLOP/s, so a task whose batches all fail is not starved nor favoured forever.
        est = best if best is not None else flops[i] * 1e-11
        return weights[i] * est / batches[i]

    return max(alive, key=lambda i: (share(i), -i))


def dominant_first_scheduler(stats: TuneStats) -> Any:
    """A task scheduler that spends the budget where the model's time is (issue 20: "tuning budgets spent
    first on the kernels that dominate the model's time").

    Round-robin gives every task the same number of batches, so a 1x1 convolution that is 1 % of the
    model gets as many trials as the 3x3 one that is 20 %. This scheduler:

    1. visits every task once, largest estimated share first (weight x FLOPs): an untuned kernel is
       one to two orders of magnitude slower than a tuned one, so no task may stay unvisited while the
       budget lasts, and under a tight time budget the ones left out are the cheapest;
    2. then gives the next batch to the task with the largest measured share of the model's time per
       batch already spent on it: ``weight x best latency / batches``, so batches end up roughly
       proportional to each kernel's share of the model's time.

    Every batch is joined before the next is chosen (the runner is synchronous), so the callback's time
    budget check still runs after each batch, which MetaSchedule's gradient scheduler does not allow.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class DominantFirst(PyTaskScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.last: int | None = None

        def next_task_id(self) -> int:
            outer = self._outer()  # type: ignore[attr-defined]
            tasks = list(outer.tasks_)
            if self.last is not None and not tasks[self.last].is_terminated:
                # The batch handed out last is in flight (our runner is synchronous, so it is done): join
                # it, which runs the measure callbacks and may terminate tasks over the time budget.
                self.join_running_task(self.last)
                tasks = list(outer.tasks_)
            self.last = None
            alive = [i for i, t in enumerate(tasks) if not t.is_terminated]
            if not alive:
                return -1
            pick = dominant_next(alive, Counter(stats.visits), [float(t.task_weight) for t in tasks],
                                 [float(t.flop) for t in tasks], stats.best_s)
            stats.visits.append(pick)  # batches per task are counted from it
            self.last = pick
            return pick

    return DominantFirst()


def progress_line(stats: TuneStats, task_id: int, names: list[str], weights: list[float], budget: int,
                  elapsed: float, deadline: float | None) -> str:
    """One line a user can watch: trials against the budget, this task's and the model's best, time left."""
    best = stats.best_s.get(task_id)
    est = sum(weights[i] * s for i, s in stats.best_s.items())
    if deadline is not None:
        left = f"{max(0.0, deadline - time.perf_counter()):.0f} s left of the time budget"
    elif stats.trials:
        left = f"~{elapsed / stats.trials * max(0, budget - stats.trials):.0f} s left at this rate"
    else:
        left = "time left unknown"
    failed = stats.build_errors + stats.run_errors + stats.timeouts + stats.crashes
    return (f"tvm tuning: {stats.trials}/{budget} trials, {elapsed:.0f} s elapsed, {left}; task {task_id + 1}/"
            f"{len(names)} {names[task_id]!r} best {'-' if best is None else f'{best * 1e3:.4f} ms'}; model "
            f"{est * 1e3:.3f} ms (weighted best kernels, {len(stats.best_s)}/{len(names)} tasks measured)"
            + (f"; {failed} failed candidates" if failed else ""))


@contextlib.contextmanager
def _native_stderr_to(f: Any) -> Iterator[None]:
    """TVM's C++ warnings (written to file descriptor 2) go to ``f``; Python's ``sys.stderr`` keeps the terminal.

    Our progress lines are printed to ``sys.stderr``: when that is descriptor 2 itself it is swapped for a
    copy of the original descriptor for the block, so only the C++ side is redirected.
    """
    sys.stderr.flush()
    f.flush()
    saved = os.dup(2)
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # pytest's capture and other stand-ins have no descriptor
        real = False
    old_stderr = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1) if real else None
    os.dup2(f.fileno(), 2)
    if terminal is not None:
        sys.stderr = terminal
    try:
        yield
    finally:
        if terminal is not None:
            sys.stderr = old_stderr
            terminal.close()
        f.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def tvm_logs_to(log_file: Path, debug: bool) -> Iterator[None]:
    """MetaSchedule's console lines go to ``log_file`` (beside the tuning database), not the terminal.

    MetaSchedule re-runs ``logging.config.dictConfig`` on every tuning call and gives its console handler
    the stream ``ext://sys.stdout``, resolved at that moment: while this block runs ``sys.stdout`` is the
    log file, so that handler writes there. Its per-task DEBUG logs go to ``<work_dir>/logs`` (the caller
    puts work_dir beside the database too). With ``debug`` the console lines stay on the terminal.

    An unnamed handler already on MetaSchedule's logger (pytest's, a user's) makes that dictConfig call
    crash on the second tuning in a process, so such handlers are detached for the call and put back.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    level = logger.level
    # INFO: the log file gets MetaSchedule's per-batch tables (and no "level set to WARNING" warning).
    logger.setLevel(logging.INFO)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            if not debug:
                f = stack.enter_context(log_file.open("a"))
                stack.enter_context(contextlib.redirect_stdout(f))
                stack.enter_context(_native_stderr_to(f))
            yield
    finally:
        logger.setLevel(level if level != logging.NOTSET else logging.WARNING)
        for h in unnamed:
            logger.addHandler(h)
        # The console handler dictConfig made holds the log file's stream, now closed: drop it.
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and getattr(h.stream, "closed", False):
                logger.removeHandler(h)
