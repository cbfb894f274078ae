"""Where a search's trials run: the thread budget of building (training) and of timing, the model trained
once before the trials, and the Ray pool that builds on any worker and times on one node at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CompressError, RecipeError
from ..stages.recipe import Recipe
from .search_space import SearchSpec, Space
from .search_trials import evaluate_trial, probe_trial


def measure_resource() -> str:
    """The Ray resource that stands for "may time latency on a machine like this one" (one per node)."""
    from ..core.artifact import sha256_json
    from ..core.fingerprint import cpu_info

    c = cpu_info()
    return "measure-" + sha256_json({"cpu": c["model"], "isa": c["isa"], "cores": c["affinity_cores"]})[:16]


def training_kinds(rec: Recipe) -> set[str]:
    """Kinds of the recipe's passes that train (``PassCaps.trains_only``, or a training setting above 0):
    their steps' time is the trial's training time."""
    from ..core.registry import get_pass

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
    from ..measuring.contention import ContentionProbe, pick_threads

    n, _ = pick_threads(0, share, ContentionProbe(share).before(0.3)) if share > 1 else (1, None)
    return n


def _task_share() -> int:
    """In a Ray task: its share of its node's cores (task_threads)."""
    import ray

    from ..core.fingerprint import cpu_info

    ctx = ray.get_runtime_context()
    cpus = float(ctx.get_assigned_resources().get("CPU", 1.0))
    node = next((n for n in ray.nodes() if n.get("NodeID") == ctx.get_node_id()), None)
    node_cpus = float(node["Resources"].get("CPU", cpus)) if node is not None else cpus
    return task_threads(cpus, node_cpus, int(cpu_info()["affinity_cores"] or 1))


def _root(rec: Recipe, cache: Any) -> tuple[Any, Any, float]:
    """The recipe's root model trained as the recipe asks (from the cache when it is there), its data,
    and the seconds training took here (0 on a cache hit)."""
    from ..core.manager import PassContext
    from ..inputs.data import load_data
    from ..inputs.models import load_model
    from ..stages.execute import train_root
    from ..stages.plan import _lm_text

    root = load_model(rec.model, cache)
    said: list[str] = []
    # A causal LM's passes read token windows of its text (ctx.text), as in a run's plan; other models read data.
    text = _lm_text(rec, root, said.append)
    data = None if text is not None else load_data(rec.data, root.inputs[0].shape, root.inputs,
                                                   model_source=rec.model.source)
    ctx = PassContext(cache=cache, data=data, seed=rec.seed, progress=False, log=said.append, text=text)
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
    from ..core.cache import Cache

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

    from ..core.fingerprint import cpu_info

    threads = training_threads(_task_share() if ray_task else int(cpu_info()["affinity_cores"] or 1))
    torch.set_num_threads(threads)
    return threads


def build_trial(rec: Recipe, cache_dir: str | Path | None, ray_task: bool = False) -> dict[str, Any]:
    """Run a trial's passes into the (shared) cache without measuring. ``error`` (the line, or None),
    ``build_s`` and ``train_s`` (its training passes' seconds, and the root's if it trained here),
    ``threads`` torch trained with (see _pin_threads_for_training)."""
    from ..core.artifact import ONNX
    from ..core.cache import Cache
    from ..core.manager import PassManager
    from ..core.registry import make_target
    from ..stages.plan import with_lowering

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
    from ..core.registry import get_target_config, make_target

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

    def run(self, ask: Callable[[], tuple[Any, Recipe | None] | None], budget: int, out: Path, spec: SearchSpec,
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
                if rec is None:  # a repeated point, told already (search._Search.ask)
                    continue
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
