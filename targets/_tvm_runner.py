"""Running a library the TVM target exported: the Relax VM in this process, and TVM's thread pool kept unpinned.

TVM's thread pool pins the calling thread to one core when it starts (its threading backend binds
threads unless TVM_BIND_THREADS=0), and every thread the process starts later inherits that mask.
Measured here: after a TVM build or run in the process, os.sched_getaffinity(0) went from {0, 1} to
{0}, so ONNX Runtime's and PyTorch's pools created afterwards, and the main thread that takes part in
their work, shared one core: every later figure in the run was wrong. The pool reads the variable when
it starts (once per thread) and when it is reconfigured, so ``unbound_threads`` sets it for exactly
those calls, and for a build (whose worker processes inherit it), and puts the environment back.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.artifact import InputSpec, sha256_file
from compress.errors import InputError, TargetUnavailable

from .base import DeviceClockRunner, static_feeds

LIBRARY = "model.so"
MANIFEST = "tvm.json"
BIND_ENV = "TVM_BIND_THREADS"


class _EnvUse:
    lock = threading.Lock()
    blocks = 0  # inside unbound_threads now
    ours = False  # whether the variable was set here (and so is removed by the last block out)


@contextlib.contextmanager
def unbound_threads() -> Iterator[None]:
    """TVM_BIND_THREADS=0 for the block, unless the user set it (then theirs stands); restored after.

    Nested and concurrent blocks share one setting: the last one out removes the variable."""
    with _EnvUse.lock:
        if _EnvUse.blocks == 0:
            _EnvUse.ours = BIND_ENV not in os.environ
            if _EnvUse.ours:
                os.environ[BIND_ENV] = "0"
        _EnvUse.blocks += 1
    try:
        yield
    finally:
        with _EnvUse.lock:
            _EnvUse.blocks -= 1
            if _EnvUse.blocks == 0 and _EnvUse.ours:
                os.environ.pop(BIND_ENV, None)
                _EnvUse.ours = False


class TvmRunner(DeviceClockRunner):
    """Runs an exported TVM library with the Relax VM; NumPy in, NumPy out."""

    def __init__(self, lib_path: Path, inputs: tuple[InputSpec, ...], threads: int = 0) -> None:
        import tvm
        from tvm import relax

        if threads:
            # TVM thread pool: (affinity mode 1 = "big" cores, which on a homogeneous CPU is all of them, threads).
            with unbound_threads():
                tvm.get_global_func("runtime.config_threadpool")(1, threads)
        self.inputs = inputs
        self.input_names = [s.name for s in inputs]
        self.device_ms: list[float] = []  # stays empty: a local build is timed by the host only
        self._lib = tvm.runtime.load_module(str(lib_path))
        self._dev = tvm.cpu(0)
        self._vm = relax.VirtualMachine(self._lib, self._dev)
        self._tensor = tvm.runtime.tensor
        self._pool_threads: set[int] = set()  # the threads whose TVM pool has started (see unbound_threads)

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [self._tensor(x, self._dev) for x in static_feeds(self.inputs, feeds, "tvm runner")]
        if threading.get_ident() in self._pool_threads:
            out = self._vm["main"](*args)
        else:  # this thread's first call starts its TVM pool
            with unbound_threads():
                out = self._vm["main"](*args)
            self._pool_threads.add(threading.get_ident())
        return [np.asarray(o.numpy()) for o in _flatten(out)]

    def close(self) -> None:
        self._vm = None
        self._lib = None


def _flatten(out: Any) -> list[Any]:
    if hasattr(out, "numpy"):
        return [out]
    flat: list[Any] = []
    for o in out:
        flat.extend(_flatten(o))
    return flat


def verified_library(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The library in ``folder`` and its manifest, after checking its SHA-256 against the manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"{folder} holds no {MANIFEST}: not a library exported by the tvm target; refusing to load "
                         "a shared library this tool did not build")
    manifest = json.loads(manifest_path.read_text())
    lib = folder / manifest["library"]
    if not lib.exists() or sha256_file(lib) != manifest["library_sha256"]:
        raise InputError(f"{lib} does not match the SHA-256 recorded in {manifest_path} when it was built; "
                         "refusing to load it (rebuild with the tvm target)")
    return lib, manifest


def load_exported(folder: Path, threads: int = 0) -> TvmRunner:
    """Load a library this target exported (``folder`` holds ``model.so`` and ``tvm.json``).

    The library's SHA-256 must match the one recorded when it was built: loading a shared library
    runs its code, so a swapped or foreign ``.so`` is refused rather than executed.
    """
    lib, manifest = verified_library(folder)
    if manifest.get("foreign"):
        # Its outputs may have been checked under qemu at build time; latency under emulation means nothing.
        built_for = manifest["target"].get("mtriple") or manifest["target"].get("kind")
        raise TargetUnavailable(f"cross-compiled for {built_for}: cannot run on this "
                                f"{platform.machine()} machine; measure it on the device (its outputs are checked "
                                "under emulation at build time when qemu is present)")
    return TvmRunner(lib, tuple(InputSpec.from_json(s) for s in manifest["inputs"]), threads)
