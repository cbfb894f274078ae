"""MetaSchedule plumbing for the TVM target: the tuning database on disk and a cheap in-process tuner.

Kept apart from ``tvm_compiler.py`` so the target file reads as the user sees it (config, compile,
run) and this file holds the parts that only matter while tuning. Everything here imports TVM
lazily: ``targets/`` is imported by the registry on machines without TVM.

Why the builder and runner run inside this process: MetaSchedule's default LocalBuilder and
LocalRunner start fresh worker processes, and every worker pays ``import tvm`` (about 4 s here)
before it compiles or times anything; the builder pool is even restarted for every batch. On two
cores that startup cost dominated tuning (see benchmarks/results/tvm.md for the measurement). A
candidate is a schedule of an already-verified TIR function, compiled by LLVM and timed with
``time_evaluator`` exactly as the workers would do it, so doing it here gives the same
measurements without the process churn. The price: a candidate that crashed natively would take
this process with it; MetaSchedule's postprocessors verify every candidate before it is built, and
none crashed in the runs recorded in the results file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import sys
import threading
import time
import warnings
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


def database_identity(target: Any) -> dict[str, Any]:
    """What a tuning record depends on besides the workload: TVM (and its FFI) version and the target."""
    import tvm

    from .base import module_version

    return {
        "format": DB_FORMAT,
        "tvm": tvm.__version__,
        "tvm_ffi": module_version("apache-tvm-ffi"),
        "target": canonical_target(target),
    }


def _identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _describe(identity: dict[str, Any]) -> str:
    t = identity.get("target", {})
    return f"TVM {identity.get('tvm', '?')}, target kind={t.get('kind', '?')} mcpu={t.get('mcpu', '-')}"


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
    def open(cls, root: Path, target: Any, log: Callable[[str], None]) -> TuningDatabase:
        identity = database_identity(target)
        key = _identity_key(identity)
        t = identity["target"]
        name = f"{t.get('kind', 'target')}-{t.get('mcpu', 'generic')}-tvm{identity['tvm']}-{key[:16]}"
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
                       f"another TVM version or target are ignored, never used: {', '.join(others[:3])}"
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


@dataclass
class TuneStats:
    trials: int = 0
    build_errors: int = 0
    run_errors: int = 0
    build_s: float = 0.0
    run_s: float = 0.0
    stopped_by_time: bool = False
    best_s: dict[int, float] = field(default_factory=dict)


class StallWatch:
    """Tells the user when one in-process candidate takes far longer than candidates do.

    The in-process builder and runner cannot interrupt TVM's C++ code: LLVM compiling a badly
    unrolled candidate (the JIT runs when the runner first looks the kernel up) once ran for over
    ten minutes here. TVM's FFI releases the GIL during such calls, so a thread can at least say
    what is going on instead of leaving the console silent.
    """

    def __init__(self, say: Callable[[str], None], after_s: float = 120.0, poll_s: float = 5.0) -> None:
        self._say, self._after, self._poll = say, after_s, poll_s
        self._current: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tvm-stall-watch", daemon=True)
            self._thread.start()
        self._current = (what, time.perf_counter())
        try:
            yield
        finally:
            self._current = None

    def _loop(self) -> None:
        warned: tuple[str, float] | None = None
        while not self._stop.wait(self._poll):
            cur = self._current
            if cur is None or cur is warned:
                continue
            waited = time.perf_counter() - cur[1]
            if waited >= self._after:
                warned = cur
                self._say(f"tvm tuning: {cur[0]} has taken {waited:.0f} s so far (candidates usually take seconds); "
                          "TVM cannot interrupt it in-process, so tuning waits for it. If it never ends, stop the "
                          "run: the tuning database keeps every record measured so far, and a rerun starts its "
                          "search from them")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


_GPU_INTRINSICS = ("cuda", "rocm", "hexagon", "metal")


def import_cpu_tensor_intrinsics() -> None:
    """Register TVM's tensor intrinsics without parsing the GPU ones.

    MetaSchedule's build step imports ``tvm.s_tir.tensor_intrin``, which parses hundreds of
    TVMScript intrinsics: 41.5 s here, 30 s of it CUDA's. That import is also why the default
    LocalBuilder failed every candidate on this machine: each fresh worker pays it and is killed by
    the builder's 30 s timeout. CPU targets never use the GPU intrinsics, so their modules are
    held out while the package imports, then released so a later GPU build imports them for real.
    """
    import importlib
    import types

    pkg = "tvm.s_tir.tensor_intrin"
    if pkg in sys.modules:
        return
    held = []
    for name in _GPU_INTRINSICS:
        full = f"{pkg}.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)
            held.append(full)
    try:
        importlib.import_module(pkg)
    finally:
        for full in held:
            del sys.modules[full]


@contextlib.contextmanager
def quiet_metaschedule_logging() -> Iterator[None]:
    """MetaSchedule prints a table per batch; our progress lines replace it on the console.

    MetaSchedule re-runs ``logging.config.dictConfig`` on every tuning call, listing the handlers
    already on its logger by name; an unnamed one (pytest's, a user's) makes that call crash on the
    second tuning in a process. Such handlers are detached for the call and put back afterwards.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    level = logger.level
    # The console handler MetaSchedule creates takes the logger's level at creation.
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level if level != logging.NOTSET else logging.WARNING)
        for h in unnamed:
            logger.addHandler(h)


def make_tuner_parts(stats: TuneStats, tasks: list[Any], deadline: float | None, progress: Callable[[str], None],
                     evaluator: dict[str, Any], budget: int, watch: StallWatch) -> tuple[Any, Any, Any, Any]:
    """An in-process builder and runner, a measure callback and a task scheduler sharing ``stats``.

    With a time budget the scheduler is round-robin, not MetaSchedule's default gradient one: the
    gradient scheduler sends its whole first round (one batch per task) before joining any result,
    and refuses to have a task terminated during that round, so its time budget could only be
    checked after every task had been searched once (on ResNet-18 a 180 s budget ran 316 s).
    Round-robin joins each batch right away (our runner is synchronous), so the budget is checked
    after every batch. Progress is printed by the runner for the same reason.
    """
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

    scheduler = ms.TaskScheduler.create("gradient" if deadline is None else "round-robin")
    built: dict[str, Any] = {}
    counter = iter(range(1 << 62))
    t_start = time.perf_counter()
    measured = [0]

    def stop_if_over_time(task_scheduler: Any) -> None:
        if deadline is None or stats.stopped_by_time or time.perf_counter() < deadline:
            return
        stats.stopped_by_time = True
        progress(f"tvm tuning: time budget reached after {time.perf_counter() - t_start:.0f} s; stopping")
        for i, rec in enumerate(task_scheduler.tasks_):
            if not rec.is_terminated:
                task_scheduler.terminate_task(i)

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            out = []
            for bi in build_inputs:
                t0 = time.perf_counter()
                try:
                    with watch.phase("building one candidate"):
                        rt_mod = default_build(bi.mod, bi.target, None)
                except (RuntimeError, ValueError, TypeError) as e:  # how TVM FFI surfaces C++ errors
                    # A failed candidate is a measured outcome, counted in the stats and the report.
                    stats.build_errors += 1
                    out.append(BuilderResult(None, f"in-process build failed: {e}"))
                    continue
                finally:
                    stats.build_s += time.perf_counter() - t0
                key = f"inproc:{next(counter)}"
                built[key] = rt_mod
                out.append(BuilderResult(key, None))
            return out

    @derived_object
    class InProcessRunner(PyRunner):
        def __init__(self) -> None:
            super().__init__()
            self.config = EvaluatorConfig(**evaluator)
            self.fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            dev = tvm.cpu(0)
            out = []
            batch_best = None
            for ri in runner_inputs:
                t0 = time.perf_counter()
                rt_mod = built.pop(ri.artifact_path)
                try:
                    with watch.phase("compiling and timing one candidate"):
                        args = alloc_argument_common(self.fill, dev, [a.as_json() for a in ri.args_info], 1)
                        costs = run_evaluator_common(rt_mod, dev, self.config, args)
                    out.append(LocalRunnerFuture(costs, None))
                    mean = sum(costs) / len(costs)
                    batch_best = mean if batch_best is None else min(batch_best, mean)
                except (RuntimeError, ValueError, TypeError) as e:  # how TVM FFI surfaces C++ errors
                    stats.run_errors += 1
                    out.append(LocalRunnerFuture(None, f"in-process run failed: {e}"))
                finally:
                    stats.run_s += time.perf_counter() - t0
            measured[0] += len(runner_inputs)
            best = "no valid candidate" if batch_best is None else f"best kernel in batch {batch_best * 1e3:.4f} ms"
            progress(f"tvm tuning: {measured[0]}/{budget} trials measured, {best}; "
                     f"{time.perf_counter() - t_start:.0f} s elapsed")
            return out

    names = [t.task_name for t in tasks]
    weights = [t.weight for t in tasks]

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: list[Any],
                  builder_results: list[Any], runner_results: list[Any]) -> None:
            stats.trials += len(measure_candidates)
            for rr in runner_results:
                if rr.error_msg is None and rr.run_secs:
                    lat = sum(float(s) for s in rr.run_secs) / len(rr.run_secs)
                    stats.best_s[task_id] = min(stats.best_s.get(task_id, lat), lat)
            best = stats.best_s.get(task_id)
            est = sum(weights[i] * s for i, s in stats.best_s.items())
            task_best = "no valid candidate yet" if best is None else f"best {best * 1e3:.4f} ms"
            progress(f"tvm tuning: task {task_id + 1}/{len(names)} {names[task_id]!r} {task_best}; "
                     f"{len(stats.best_s)}/{len(names)} tasks measured, weighted sum of best kernels "
                     f"{est * 1e3:.3f} ms")
            stop_if_over_time(task_scheduler)

    return InProcessBuilder(), InProcessRunner(), Progress(), scheduler


def prepare_passes(target: Any, prepack: bool) -> list[Any]:
    """The passes run before tasks are extracted and, identically, before the database is applied.

    Tasks must be extracted from the same lowered form, or their workloads (structural hashes)
    would not match what ``compile_tuned`` looks up. With ``prepack`` the weights (bound constants)
    are marked layout-free, so MetaSchedule's RewriteLayout may choose a blocked weight layout per
    kernel instead of reading OIHW in place.
    """
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    return [
        *relax_pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
    ]


def compile_tuned(database: Any, mod: Any, target: Any, prepack: bool) -> tuple[Any, int]:
    """``meta_schedule.relax_integration.compile_relax`` for CPU targets, plus weight prepacking.

    ``mod`` has its weights bound as constants. With ``prepack`` the layout rewrites chosen while
    tuning are split out of each kernel (SplitLayoutRewritePreproc) and folded into the constants
    at compile time, so the deployed library takes the same inputs and does no repacking per call.
    Returns the executable and how many kernels run on prepacked weights.
    """
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    # DeadCodeElimination drops the repacking functions once their calls are folded away.
    after = ([relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant(),
              relax.transform.DeadCodeElimination()] if prepack else [])
    try:
        lower = [*relax_pipeline.dataflow_lower_passes(target), *relax_pipeline.finalize_passes(target)]
    except (ValueError, AttributeError):
        # TVM 0.27's cpu_generic backend has no such lists; these are compile_relax's own fallback.
        lower = [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
                 relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
                 relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor(),
                 relax.transform.KillAfterLastUse(), relax.transform.LowerRuntimeBuiltin(),
                 relax.transform.ComputePrimValue(), relax.transform.VMShapeLower(),
                 relax.transform.AttachGlobalSymbol()]

    prepacked = [0]

    @tvm.transform.module_pass(opt_level=3)
    def _pipeline(m: Any, _ctx: Any) -> Any:
        m = tvm.transform.Sequential(prepare_passes(target, prepack))(m)
        m = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(m)
        m = tvm.transform.Sequential(after)(m)
        prepacked[0] = sum(1 for g in m.functions if g.name_hint.endswith("_prepacked"))
        return tvm.transform.Sequential(lower)(m)

    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=_pipeline), prepacked[0]


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
