"""The TVM target's tuned build: extract MetaSchedule tasks, tune what the database lacks, compile over it.

``tune_and_compile`` is what ``TvmTarget.compile`` calls when ``tuning_trials > 0``; the database, the
tuner's parts and its logs are in ``_tvm_tuning``, the worker that builds and times each candidate in
``_tvm_worker``, the graph rewrites that run before all of this in ``_tvm_rewrites``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compress.errors import BuildError

from ._tvm_tuning import TuneStats, TuningDatabase, make_tuner_parts, model_key, tvm_logs_to
from ._tvm_worker import import_cpu_tensor_intrinsics, shared_worker

EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 20, "enable_cpu_cache_flush": False}


class TunedBuild:
    """One tuned build of a bound Relax module: its tasks, the database, this run's tuning and its figures.

    ``cfg`` is the target's TvmConfig; ``remote`` ({"rpc": address, "cc": compiler or None}) times candidates
    on the RPC device instead of here.
    """

    def __init__(self, bound: Any, target: Any, cfg: Any, ctx: Any, log: Callable[[str], None],
                 remote: dict[str, Any] | None) -> None:
        self.bound, self.target, self.cfg, self.ctx, self.log, self.remote = bound, target, cfg, ctx, log, remote
        self.prepack = bool(cfg.weight_prepack and target.kind.name == "llvm")
        self.stats = TuneStats()
        self.tune_s = 0.0
        self.worker_info: dict[str, Any] = {}
        self.reused: list[int] = []
        self.to_tune: list[Any] = []

    def tasks(self) -> list[Any]:
        """MetaSchedule's tasks, extracted from the module lowered as ``compile_tuned`` will lower it."""
        import tvm
        from tvm.s_tir import meta_schedule as ms

        with self.target:
            prepared = tvm.transform.Sequential(prepare_passes(self.target, self.prepack))(self.bound)
        tasks = ms.relax_integration.extract_tasks(prepared, self.target)
        if not tasks:
            raise BuildError("target 'tvm': MetaSchedule found no tunable task in this model")
        return list(tasks)

    def database(self) -> TuningDatabase:
        root = Path(self.cfg.database) if self.cfg.database else Path(self.ctx.cache.root) / "tvm-db"
        # Records timed on a device are another database than records timed here (same target JSON or not).
        timed_on = "local"
        if self.cfg.rpc is not None:
            from ._tvm_rpc import parse_rpc

            a = parse_rpc(self.cfg.rpc)
            timed_on = f"rpc:{a.key}" if a.key is not None else f"rpc:{a.host}:{a.port}"
        return TuningDatabase.open(root, self.target, self.log, timed_on)

    def plan(self, db: TuningDatabase, tasks: list[Any], spent: dict[str, Any]) -> tuple[int, float | None, bool]:
        """Trials and seconds left for this model, and whether anything is left to tune."""
        cfg, log = self.cfg, self.log
        left_trials = cfg.tuning_trials - int(spent["trials"])
        left_time = None if cfg.tuning_time_s is None else cfg.tuning_time_s - float(spent["seconds"])
        self.reused = _kernels_tuned_elsewhere(db.ms_database(), tasks, left_trials) \
            if cfg.reuse_kernels and not spent["trials"] else []
        self.to_tune = [t for i, t in enumerate(tasks) if i not in self.reused]
        if self.reused:
            log(f"tvm: {len(self.reused)} of {len(tasks)} tasks already tuned in the shared database (same kernel "
                f"shape, by another model or recipe): not tuned again")
        if not self.to_tune:
            log(f"tvm: all {len(tasks)} tasks already tuned in the shared database: no tuning needed")
            return left_trials, left_time, False
        if left_trials <= 0 or (left_time is not None and left_time <= 0):
            log(f"tvm: {len(tasks)} tasks; the tuning database already holds {spent['trials']} trials "
                f"({spent['seconds']:.0f} s) for this model and target: no tuning needed")
            return left_trials, left_time, False
        log(f"tvm: tuning {len(self.to_tune)} tasks for {left_trials} trials"
            + (f" or {left_time:.0f} s" if left_time is not None else "")
            + (f" (continuing: {spent['trials']} trials already in the database)" if spent["trials"] else ""))
        return left_trials, left_time, True

    def tune(self, db: TuningDatabase, key: str, left_trials: int, left_time: float | None) -> None:
        """Tune ``to_tune`` within the budget left, every candidate built and timed in the worker process."""
        from tvm.s_tir import meta_schedule as ms

        cfg, log, stats, to_tune = self.cfg, self.log, self.stats, self.to_tune
        deadline = None if left_time is None else time.perf_counter() + left_time
        logs = db.path / "logs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{key[:12]}"
        debug = logging.getLogger("compress").isEnabledFor(logging.DEBUG)
        log(f"tvm: each candidate is built and timed in a worker process, killed after "
            f"{cfg.candidate_timeout_s:g} s; TVM's log: {logs}")
        t_tune = time.perf_counter()
        worker = shared_worker(cfg.threads, db.path / "tuning-worker.log")
        starts_before, kills_before = worker.starts, worker.kills
        worker.prestart()  # its imports overlap the first search step
        builder, runner, callback, scheduler = make_tuner_parts(
            stats, to_tune, deadline, log, EVALUATOR, left_trials, worker, cfg.candidate_timeout_s,
            cfg.scheduler, self.remote)
        with tvm_logs_to(logs / "console.log", debug), _remote_sessions_closed(worker, self.remote):
            # An int, not MetaSchedule's default "physical": that probes the CPU count in a fresh
            # worker process per task (import tvm each time), which cost ~5 s per task here.
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                to_tune, str(logs), strategy=_strategy(left_trials, len(to_tune)),
                seed=getattr(self.ctx, "seed", 0), num_threads=_search_threads(self.target))
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(logs),
                max_trials_global=left_trials, num_trials_per_iter=_per_iter(left_trials, len(to_tune)),
                builder=builder, runner=runner, database=db.ms_database(),
                measure_callbacks=[callback, ms.measure_callback.UpdateCostModel()],
                task_scheduler=scheduler,
            )
        self.worker_info = {"worker_starts": worker.starts - starts_before,
                            "worker_kills": worker.kills - kills_before,
                            "worker_start_s": [round(x, 2) for x in worker.start_s[starts_before:]],
                            "log_dir": str(logs)}
        self.tune_s = time.perf_counter() - t_tune
        db.record_spent(key, stats.trials, self.tune_s, len(to_tune))
        failed = stats.build_errors + stats.run_errors + stats.timeouts + stats.crashes
        if stats.candidates and failed >= stats.candidates:
            raise BuildError(f"target 'tvm': every one of {stats.candidates} tuning candidates failed to "
                             f"build or run; see the logs in {logs} or set tuning_trials = 0")

    def figures(self, status: str, db: TuningDatabase, tasks: list[Any], covered: int, key: str,
                prepacked: int, t0: float) -> dict[str, Any]:
        """The build's ``tuning`` metadata."""
        cfg, stats, to_tune, tune_s = self.cfg, self.stats, self.to_tune, self.tune_s
        total = db.spent(key)
        return {
            "status": status, "database": str(db.path), "tasks": len(tasks), "tasks_with_records": covered,
            # Fused kernels run per inference (a task's weight is how often its kernel is called).
            "kernel_calls": int(sum(t.weight for t in tasks)),
            "tasks_reused_from_database": len(self.reused),
            "trials_this_run": stats.trials, "trials_in_database": int(total["trials"]),
            "tuning_s_this_run": round(tune_s, 2), "build_errors": stats.build_errors, "run_errors": stats.run_errors,
            "builder_s": round(stats.build_s, 2), "runner_s": round(stats.run_s, 2),
            "worker_s": round(stats.worker_s, 2),
            "search_s": round(max(0.0, tune_s - stats.worker_s - sum(self.worker_info.get("worker_start_s", []))), 2),
            "candidates_measured": stats.candidates, "candidates_skipped": stats.skipped,
            "candidate_timeouts": stats.timeouts, "worker_crashes": stats.crashes,
            "candidate_timeout_s": cfg.candidate_timeout_s, "slowest_candidate_s": round(stats.slowest_candidate_s, 2),
            "candidates_timed_on": _timed_on(cfg.rpc) if stats.candidates else None,
            "candidates_timed_remotely": stats.remote_timed,
            **self.worker_info,
            "stopped_by_time": stats.stopped_by_time, "model_key": key, "scheduler": cfg.scheduler,
            "batches_per_task": {to_tune[i].task_name: stats.visits.count(i) for i in sorted(set(stats.visits))},
            "weight_prepack": self.prepack, "prepacked_kernels": prepacked,
            "best_kernels_ms": round(sum(to_tune[i].weight * s for i, s in stats.best_s.items()) * 1e3, 4),
            "prepare_s": round(time.perf_counter() - t0 - tune_s, 2),
        }


def tune_and_compile(bound: Any, target: Any, cfg: Any, ctx: Any, log: Callable[[str], None], notes: list[str],
                     tuning: dict[str, Any], remote: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """Tune ``bound`` (weights bound as constants) within the budget the database has not spent on this model
    yet, then compile it over the database; returns the executable and ``tuning`` updated with the figures."""
    build = TunedBuild(bound, target, cfg, ctx, log, remote)
    if target.kind.name == "llvm":
        import_cpu_tensor_intrinsics()
    t0 = time.perf_counter()
    tasks = build.tasks()
    db = build.database()
    notes.extend(db.notes)
    key = model_key(tasks)
    with db.locked():
        db.verify_records(target, log)
        notes.extend(n for n in db.notes if n not in notes)
        left_trials, left_time, tune = build.plan(db, tasks, db.spent(key))
        if tune:
            build.tune(db, key, left_trials, left_time)
        covered = sum(1 for t in tasks if _has_record(db.ms_database(), t.dispatched[0]))
        ex, prepacked = compile_tuned(db.ms_database(), bound, target, build.prepack)
    if covered < len(tasks):
        notes.append(f"{len(tasks) - covered} of {len(tasks)} TVM tasks have no tuning record (budget too small "
                     "to reach them) and run untuned code; raise tuning_trials")
    tuning.update(build.figures("tuned" if tune else "reused", db, tasks, covered, key, prepacked, t0))
    return ex, tuning


@contextlib.contextmanager
def _remote_sessions_closed(worker: Any, remote: dict[str, Any] | None) -> Iterator[None]:
    """After tuning, the worker closes its device session, so the measurement can open one."""
    try:
        yield
    finally:
        if remote is not None:
            from ._tvm_worker import close_remote_sessions

            worker.call(close_remote_sessions, (), 60.0)  # past it, the worker is killed: closed too


def _timed_on(rpc: str | None) -> str:
    if rpc is None:
        return "this machine"
    from ._tvm_rpc import parse_rpc

    return parse_rpc(rpc).describe()


def _search_threads(target: Any) -> int:
    cores = target.attrs.get("num-cores")
    return int(cores) if cores else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _per_iter(trials: int, n_tasks: int) -> int:
    """Candidates per batch: small enough that the first round reaches every task within the budget."""
    return max(4, min(64, trials // max(1, n_tasks)))


def _strategy(trials: int, n_tasks: int) -> Any:
    """Evolutionary search sized to the batch: the default population of 512 costs ~10 s of search per
    batch on two cores, which is wasted when a small budget measures a handful of candidates per task."""
    from tvm.s_tir import meta_schedule as ms

    population = min(512, max(128, 16 * _per_iter(trials, n_tasks)))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2))


def _kernels_tuned_elsewhere(database: Any, tasks: list[Any], trials: int) -> list[int]:
    """Tasks whose kernel the shared database already holds at least this run's per-task share of trials for.

    Asked only for a model the database has not tuned before (no ledger entry): its kernels of the same
    shape as another model's (ResNet blocks, a recipe's pruned and unpruned layers alike) are tuned once.
    A model tuned again with a larger budget continues on all its tasks instead.
    """
    share = max(1, trials // max(1, len(tasks)))
    return [i for i, t in enumerate(tasks) if _has_record(database, t.dispatched[0], share)]


def _has_record(database: Any, mod: Any, at_least: int = 1) -> bool:
    """Whether the database holds at least ``at_least`` valid records for ``mod``'s workload."""
    return bool(database.has_workload(mod)
                and len(database.get_top_k(database.commit_workload(mod), at_least)) >= at_least)


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

