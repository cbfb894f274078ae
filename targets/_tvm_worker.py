"""A long-lived worker process that builds and times MetaSchedule candidates, killed past a hard timeout.

Why not MetaSchedule's LocalBuilder/LocalRunner: both run on TVM's PopenPool, whose workers are
long-lived processes (``tvm.support.popen_pool.PopenWorker``) that can be killed and restarted, but
(1) LocalBuilder makes a new pool for every batch (a memory-leak workaround in TVM 0.27), so every
batch pays ``import tvm`` (~4-5 s here) and the tensor-intrinsics import that ``default_build``
does (~41 s with the GPU ones; PLATFORM.md) and was killed by its own 30 s timeout on every
candidate; and (2) the timeout is enforced *inside* the worker, by a Python timer thread that
answers "timeout" on the pipe: a worker stopped or stuck holding the GIL never answers, and the
parent then waits on the pipe forever.

Why not in-process (what this target did before): LLVM code generation of one candidate once ran
for more than ten minutes in-process here, and nothing can interrupt a C++ call in the calling
process; a CI job would have hung with it.

So: TVM's ``PopenWorker`` (one process, reused for every candidate of every tuning run in this
Python process), started once with TVM and the CPU tensor intrinsics imported (see
``import_cpu_tensor_intrinsics`` below: ~10 s instead of ~41 s), with the timeout enforced in
*this* process: we wait on the worker's pipe with ``select`` and, past the deadline, kill the worker
(and its children) and start a fresh one for the next candidate. One bad candidate costs its
timeout plus one worker start; a good one costs one pipe round trip (build and timing happen in the
same call, so no library is exported to disk and loaded back).

Tuning for a device (the target's ``rpc``): the same call builds the candidate for the device's target,
exports it (with the cross compiler for a foreign CPU), uploads it through the worker's RPC session and
times it with the device's own ``time_evaluator``, all under the same hard timeout. The session is opened
once per worker process (at its first candidate) and closed when the tuning run ends
(:func:`close_remote_sessions`): a plain TVM RPC server serves one session at a time.
"""

from __future__ import annotations

import atexit
import functools
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Test hook: a comma-separated list of candidate numbers (1-based, counted within one tuning run)
# whose worker freezes itself with SIGSTOP, as a native call that never returns would.
HANG_ENV = "COMPRESS_TVM_TEST_HANG"


def hang_candidates() -> set[int]:
    return {int(x) for x in os.environ.get(HANG_ENV, "").split(",") if x.strip().isdigit()}
START_TIMEOUT_S = 600.0


@dataclass
class CallResult:
    status: str  # ok | error | timeout | crashed
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


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


def _init_worker(threads: int) -> int:
    """Runs once in each fresh worker: the imports every candidate needs, paid once."""
    # This process is ours: TVM's pool must not pin it to one core (see tvm_compiler.unbound_threads).
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    import tvm

    import_cpu_tensor_intrinsics()
    if threads:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return os.getpid()


def build_and_time(mod: Any, target: Any, args_info: list[Any], evaluator: dict[str, Any],
                   hang: bool = False, remote: dict[str, Any] | None = None) -> dict[str, Any]:
    """In the worker: compile one candidate (MetaSchedule's default_build) and time it (its runner's way),
    here or, with ``remote`` ({"rpc": address, "cc": compiler or None}), on the device through RPC."""
    if hang:
        os.kill(os.getpid(), signal.SIGSTOP)
    import tvm
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

    t0 = time.perf_counter()
    try:
        rt_mod = default_build(mod, target, None)
    except Exception as e:  # how TVM FFI surfaces C++ errors: RuntimeError, ValueError, TVMError subclasses
        return {"ok": False, "phase": "build", "error": _last_line(e), "build_s": time.perf_counter() - t0}
    build_s = time.perf_counter() - t0
    if remote is not None:
        return _time_on_device(rt_mod, args_info, evaluator, remote, build_s)
    t1 = time.perf_counter()
    try:
        dev = tvm.cpu(0)
        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
        args = alloc_argument_common(fill, dev, args_info, 1)
        costs = run_evaluator_common(rt_mod, dev, EvaluatorConfig(**evaluator), args)
    except Exception as e:  # a candidate that fails at run time is a measured outcome
        return {"ok": False, "phase": "run", "error": _last_line(e), "build_s": build_s,
                "run_s": time.perf_counter() - t1}
    return {"ok": True, "costs": [float(c) for c in costs], "build_s": build_s, "run_s": time.perf_counter() - t1}


# This worker process's RPC sessions, by address: opened at the first remote candidate, reused by the next ones.
_REMOTE_SESSIONS: dict[str, Any] = {}
_REMOTE_COUNT = iter(range(1 << 62))


def _remote_session(rpc: str) -> Any:
    sess = _REMOTE_SESSIONS.get(rpc)
    if sess is None:
        from compress.targets._tvm_rpc import open_session, parse_rpc

        # No session timeout: the tuning run's length is bounded by its budgets, each candidate by the
        # worker's hard timeout (killing the worker closes the session).
        sess = _REMOTE_SESSIONS[rpc] = open_session(parse_rpc(rpc), session_timeout=0)
    return sess


def close_remote_sessions() -> int:
    """In the worker, when a tuning run ends: close its RPC sessions, so the device serves the next one
    (the measurement's, in the parent). Returns how many were open."""
    import gc

    n = len(_REMOTE_SESSIONS)
    _REMOTE_SESSIONS.clear()
    gc.collect()  # the session's socket closes with its last reference
    return n


def _time_on_device(rt_mod: Any, args_info: list[Any], evaluator: dict[str, Any], remote: dict[str, Any],
                    build_s: float) -> dict[str, Any]:
    """Export the built candidate, upload it through this worker's session and time it on the device."""
    import tempfile

    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compress-candidate-") as tmp:
        local = Path(tmp) / "candidate.so"
        try:
            if remote.get("cc"):
                from tvm.support import cc as tvm_cc

                rt_mod.export_library(str(local), fcompile=tvm_cc.cross_compiler(remote["cc"]))
            else:
                rt_mod.export_library(str(local))
        except Exception as e:  # the compiler driver raises RuntimeError with its stderr
            return {"ok": False, "phase": "build", "error": f"export: {_last_line(e)}",
                    "build_s": build_s + time.perf_counter() - t0}
        build_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        # A fresh name per candidate: uploading over a library the device has loaded can kill its server.
        name = f"compress-candidate-{os.getpid()}-{next(_REMOTE_COUNT)}.so"
        try:
            sess = _remote_session(remote["rpc"])
            sess.upload(str(local), target=name)
            rmod = sess.load_module(name)
            dev = sess.cpu(0)
            fill = sess.get_function("tvm.contrib.random.random_fill_for_measure")
            args = alloc_argument_common(fill, dev, args_info, 1)
            costs = run_evaluator_common(rmod, dev, EvaluatorConfig(**evaluator), args)
            sess.remove(name)
        except Exception as e:  # a candidate failing on the device, or the device gone: a fresh session next time
            _REMOTE_SESSIONS.pop(remote["rpc"], None)
            return {"ok": False, "phase": "run", "error": f"on the device: {_last_line(e)}", "build_s": build_s,
                    "run_s": time.perf_counter() - t1}
    return {"ok": True, "costs": [float(c) for c in costs], "build_s": build_s, "run_s": time.perf_counter() - t1,
            "remote": True}


def answer_pipe(worker: Any) -> Any:
    """The pipe a ``PopenWorker`` answers on, to wait on it with our own timeout. TVM keeps it private
    (``_reader``; checked on apache-tvm 0.27): a TVM that renames it is refused in one line naming the pin,
    not left to hang the tuning run."""
    reader = getattr(worker, "_reader", None)
    if reader is None:
        from compress.errors import BuildError

        raise BuildError("target 'tvm': this TVM's PopenWorker has no answer pipe (_reader) to wait on with a "
                         "timeout; install the apache-tvm version pyproject.toml pins (the 'tvm' extra)")
    return reader


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:400]


class CandidateWorker:
    """One killable worker process; ``call`` never waits longer than its timeout."""

    def __init__(self, threads: int = 0, log_path: Path | None = None, init: Any = None) -> None:
        self.threads = threads
        # Called with no arguments in each fresh worker; returns its pid. Tests give a cheaper one (os.getpid).
        self.init = init or functools.partial(_init_worker, threads)
        self.log_path = log_path
        self.starts = 0
        self.start_s: list[float] = []
        self.kills = 0
        self.calls = 0
        self.pid: int | None = None
        self.killed_pids: list[int] = []
        self._worker: Any = None
        self._log: Any = None
        self._init_pending = False
        self._init_t0 = 0.0

    def prestart(self) -> None:
        """Start a worker now without waiting for its imports (they overlap the first search step)."""
        from tvm.support.popen_pool import PopenWorker

        if self._worker is not None and self._worker.is_alive():
            return
        self._drop()
        if self.log_path is not None and self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        self._init_t0 = time.perf_counter()
        # No initializer through PopenWorker: it would wait for it without a timeout.
        self._worker = PopenWorker(stdout=self._log, stderr=self._log)
        self._worker.send(self.init, (), None, None)
        self._init_pending = True

    def _ensure(self) -> None:
        self.prestart()
        if not self._init_pending:
            return
        self._init_pending = False
        t_wait = time.perf_counter()
        res = self._receive(START_TIMEOUT_S, self._init_t0)
        if res.status != "ok":
            self._drop()
            from compress.errors import BuildError

            raise BuildError(f"target 'tvm': the tuning worker process did not start ({res.status}: {res.error}); "
                             f"see {self.log_path}")
        self.pid = int(res.value)
        self.starts += 1
        # What the start cost the caller: the time it waited, not the imports overlapped with its search.
        self.start_s.append(time.perf_counter() - t_wait)

    def _roundtrip(self, fn: Any, args: tuple[Any, ...], timeout: float) -> CallResult:
        # timeout=None: the worker's own timer cannot be trusted to answer (see the module doc).
        t0 = time.perf_counter()
        self._worker.send(fn, args, None, None)
        return self._receive(timeout, t0)

    def _receive(self, timeout: float, t0: float) -> CallResult:
        w = self._worker
        left = max(0.0, timeout - (time.perf_counter() - t0))
        ready, _, _ = select.select([answer_pipe(w)], [], [], left)
        if not ready:
            self._kill()
            self.prestart()  # the replacement imports TVM while the search picks the next candidates
            return CallResult("timeout", error=f"no answer within {timeout:g} s; worker killed",
                              seconds=time.perf_counter() - t0)
        try:
            value = w.recv()
        except ChildProcessError as e:  # the worker died (a crash in native code)
            self._worker = None
            return CallResult("crashed", error=f"the worker process died ({e})", seconds=time.perf_counter() - t0)
        except Exception as e:  # the function raised in the worker; the worker lives on
            return CallResult("error", error=_last_line(e), seconds=time.perf_counter() - t0)
        return CallResult("ok", value=value, seconds=time.perf_counter() - t0)

    def call(self, fn: Any, args: tuple[Any, ...], timeout: float) -> CallResult:
        """Run ``fn(*args)`` in the worker, starting one if needed; kill it past ``timeout``."""
        self._ensure()
        self.calls += 1
        return self._roundtrip(fn, args, timeout)

    def _kill(self) -> None:
        self.kills += 1
        if self.pid is not None:
            self.killed_pids.append(self.pid)
        self._drop()

    def _drop(self) -> None:
        if self._worker is not None:
            self._worker.kill()  # kills the process and its children, and reaps it
            self._worker = None
        self.pid = None
        self._init_pending = False

    def close(self) -> None:
        self._drop()
        if self._log is not None:
            self._log.close()
            self._log = None


_SHARED: dict[int, CandidateWorker] = {}
_LOCK = threading.Lock()


def shared_worker(threads: int, log_path: Path) -> CandidateWorker:
    """The process-wide worker for ``threads``: one start serves every tuning run in this process. Its own
    output (C++ warnings, crashes) goes to ``log_path`` of the run that started it."""
    with _LOCK:
        w = _SHARED.get(threads)
        if w is None:
            w = _SHARED[threads] = CandidateWorker(threads, log_path)
        return w


@atexit.register
def _close_all() -> None:
    for w in _SHARED.values():
        w.close()
    _SHARED.clear()
