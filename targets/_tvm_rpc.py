"""Timing a TVM build on the device itself, through TVM's RPC.

On the device: ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (a server), optionally
registered with a tracker (``--tracker HOST:PORT --key rpi5``). The tvm target's ``rpc`` setting names
it: ``"HOST:PORT"`` for a server, ``"tracker:HOST:PORT/KEY"`` for a tracker. The compiled library is
uploaded, loaded by the device's TVM runtime and run there; each call's device time comes from the
device's own clock (``time_evaluator`` on the remote VM), so the report's ``device`` figures are the
device's, named as such, and the host's wall-clock figures (which include the network round trip)
are labelled as what they are.

Before anything is tuned or built (:func:`check_device`), the device is checked twice, each failure one
line: (1) its TVM runtime version, when its server reports one: stock TVM 0.27 servers have no call for
that, so ``compress/templates/tvm_rpc_server.py`` (TVM's server plus the global function
``compress.rpc.runtime_versions``, added through TVM's ``server_init_callback``) is what a device should
run; a device whose TVM or TVM FFI version differs from this build's is refused; (2) a one-function
library compiled for the target here is uploaded, loaded and run there, so a device whose runtime cannot
load this TVM's libraries (another architecture or ABI) fails even when its server reports no version.
"""

from __future__ import annotations

import json
import re
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.artifact import InputSpec
from compress.core.protocols import DeviceClockRunner
from compress.errors import TargetUnavailable

_SERVER = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
_TRACKER = re.compile(r"^tracker:(?P<host>[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})/(?P<key>[\w.\-]+)$")
CONNECT_TIMEOUT_S = 10.0
SESSION_TIMEOUT_S = 600
# Registered on the device by compress/templates/tvm_rpc_server.py (which compress never imports).
VERSION_FUNCTION = "compress.rpc.runtime_versions"


@dataclass(frozen=True)
class RpcAddress:
    host: str
    port: int
    key: str | None = None  # set: a tracker, which hands out a server registered under this key

    def describe(self) -> str:
        return (f"TVM RPC server {self.host}:{self.port}" if self.key is None
                else f"TVM RPC tracker {self.host}:{self.port}, device key '{self.key}'")


def parse_rpc(text: str) -> RpcAddress:
    """``HOST:PORT`` or ``tracker:HOST:PORT/KEY``; ValueError naming the expected forms."""
    m = _TRACKER.match(text) or _SERVER.match(text)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"rpc = {text!r}: expected 'HOST:PORT' (a TVM RPC server on the device) or "
                         "'tracker:HOST:PORT/KEY' (a TVM RPC tracker and the device's key)")
    return RpcAddress(m["host"].strip("[]"), int(m["port"]), m.groupdict().get("key"))


_SESSIONS: dict[RpcAddress, Any] = {}


def connect(addr: RpcAddress) -> Any:
    """The RPC session to the device (one per address and process), or TargetUnavailable in one line.

    One session serves every library this process runs there: a plain RPC server serves one session at
    a time, so a second connection (the baseline's A/A runner, say) would wait for the first to close.
    """
    sess = _SESSIONS.get(addr)
    if sess is not None:
        try:
            sess.cpu(0).exist  # noqa: B018  # a round trip: is the session still alive?
            return sess
        except Exception:  # the device went away; open a new session below
            _SESSIONS.pop(addr, None)
            for key in [k for k in _LOADED if k[0] == addr]:
                del _LOADED[key]
    sess = _open(addr)
    _SESSIONS[addr] = sess
    return sess


def _open(addr: RpcAddress) -> Any:
    return open_session(addr, SESSION_TIMEOUT_S)


def open_session(addr: RpcAddress, session_timeout: float) -> Any:
    """A new RPC session (not shared: see :func:`connect`), or TargetUnavailable in one line. A server kills
    a session older than ``session_timeout`` seconds (0: never)."""
    from tvm import rpc

    try:  # TVM's own connect retries for a long time on an address that does not answer
        socket.create_connection((addr.host, addr.port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise TargetUnavailable(f"target 'tvm': the {addr.describe()} does not answer ({e.strerror or e}); start "
                                "`python -m tvm.exec.rpc_server` on the device or fix rpc") from None
    try:
        if addr.key is None:
            return rpc.connect(addr.host, addr.port, session_timeout=session_timeout)
        return rpc.connect_tracker(addr.host, addr.port).request(addr.key, session_timeout=session_timeout)
    except Exception as e:  # TVM raises InternalError/RuntimeError/TVMError with a C++ trace
        raise TargetUnavailable(f"target 'tvm': could not open a session with the {addr.describe()}: "
                                f"{_last_line(e)}") from None


def release(addr: RpcAddress) -> None:
    """Close this process's session with ``addr`` (and the modules loaded through it), so that another process
    (the tuning worker) can open one: a plain RPC server serves one session at a time."""
    import gc

    _SESSIONS.pop(addr, None)
    for key in [k for k in _LOADED if k[0] == addr]:
        del _LOADED[key]
    for runner in list(_RUNNERS):  # runners built for earlier variants hold the session too
        if runner._addr == addr:
            runner._let_go()
    gc.collect()  # the session's socket closes with its last reference


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def build_versions() -> dict[str, str]:
    """The TVM and TVM FFI versions that build here: a device must run the same ones."""
    import tvm
    import tvm_ffi

    return {"tvm": str(tvm.__version__), "tvm_ffi": str(tvm_ffi.__version__)}


def device_versions(sess: Any) -> dict[str, str] | None:
    """The device's TVM versions as its server reports them (``VERSION_FUNCTION``); None from a stock
    server, which has no such call."""
    try:
        report = sess.get_function(VERSION_FUNCTION)
    except AttributeError:  # what TVM raises for a function the remote does not have
        return None
    raw = report()
    try:
        got = json.loads(str(raw))
        return {"tvm": str(got["tvm"]), "tvm_ffi": str(got["tvm_ffi"])}
    except (ValueError, KeyError, TypeError):
        raise TargetUnavailable(f"target 'tvm': the device's {VERSION_FUNCTION} answered {str(raw)[:80]!r}, not "
                                "its TVM versions; run compress/templates/tvm_rpc_server.py there") from None


def check_versions(addr: RpcAddress, sess: Any) -> str:
    """One line for the report on the device's runtime version; TargetUnavailable when it differs from the
    build's (a library built by one TVM version is loaded by the same version's runtime only)."""
    here = build_versions()
    there = device_versions(sess)
    if there is None:
        return (f"the {addr.describe()} reports no TVM version (a stock server); only the probe library checked "
                "its runtime: run compress/templates/tvm_rpc_server.py there to have the version checked too")
    if there != here:
        raise TargetUnavailable(
            f"target 'tvm': the device behind the {addr.describe()} runs TVM {there['tvm']} (TVM FFI "
            f"{there['tvm_ffi']}), this build uses TVM {here['tvm']} (TVM FFI {here['tvm_ffi']}); install "
            f"apache-tvm=={here['tvm']} apache-tvm-ffi=={here['tvm_ffi']} on the device, or build with its versions")
    return f"the {addr.describe()} runs TVM {there['tvm']} (TVM FFI {there['tvm_ffi']}), the build's versions"


def check_device(addr: RpcAddress, target: Any, export: Any, work: Path) -> dict[str, Any]:
    """Check the device's runtime version, then compile a one-function library for ``target``, run it on the
    device and check its answer. The session is opened first: a device that does not answer fails before
    anything is compiled.

    ``export(executable, path)`` writes the library (with the cross compiler for a foreign target).
    """
    import tvm
    from onnx import TensorProto, helper
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    sess = connect(addr)
    version_note = check_versions(addr, sess)

    # Through the ONNX frontend, as every build of this target goes.
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    probe = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                      shape_dict={"x": [4]}, dtype_dict={"x": "float32"})

    t0 = time.perf_counter()
    lib = work / "rpc-probe.so"
    export(tvm.compile(probe, target=target), lib)
    try:
        dev = sess.cpu(0)
        vm = relax.VirtualMachine(remote_module(sess, addr, lib), dev)
        x = np.arange(4, dtype=np.float32)
        got = vm["main"](tvm.runtime.tensor(x, dev)).numpy()
    except TargetUnavailable:
        raise
    except Exception as e:  # the device's runtime refused the library: another TVM version or architecture
        raise TargetUnavailable(f"target 'tvm': the device behind the {addr.describe()} cannot run a library "
                                f"built by TVM {tvm.__version__} for {target.attrs.get('mtriple') or 'this CPU'}: "
                                f"{_last_line(e)}; install apache-tvm {tvm.__version__} on the device and build "
                                "for its CPU") from None
    if not np.array_equal(got, x + x):
        raise TargetUnavailable(f"target 'tvm': the device behind the {addr.describe()} computed {got} for "
                                f"{x} + {x}; its TVM runtime is not usable")
    return {"device": addr.describe(), "versions": version_note, "probe_s": round(time.perf_counter() - t0, 3)}


_LOADED: dict[tuple[RpcAddress, str], Any] = {}


def remote_module(sess: Any, addr: RpcAddress, lib_path: Path) -> Any:
    """``lib_path`` uploaded (named by its SHA-256) and loaded on the device, once per session.

    Uploading over a library the device has already loaded rewrites a mapped file under it, which
    killed the RPC server (SIGSEGV) here; each library is therefore sent once and its module reused.
    """
    from compress.core.artifact import sha256_file

    digest = sha256_file(lib_path)
    key = (addr, digest)
    mod = _LOADED.get(key)
    if mod is None or _SESSIONS.get(addr) is not sess:
        name = f"compress-{digest[:32]}.so"
        sess.upload(str(lib_path), target=name)
        mod = _LOADED[key] = sess.load_module(name)
    return mod


class RpcTvmRunner(DeviceClockRunner):
    """The exported library, run on the device through RPC. ``device_ms`` holds the device's own time per call
    (the pipeline reports it as the ``device`` figures, named by ``device_name``).

    A runner lets go of its session when :func:`release` is called for its device (a tuning worker needs the
    device while this runner waits for its turn to be timed) and reconnects at its next call."""

    def __init__(self, lib_path: Path, inputs: tuple[InputSpec, ...], addr: RpcAddress) -> None:
        self.inputs = inputs
        self.input_names = [s.name for s in inputs]
        self.device_name = addr.describe()
        self.remote = True  # the measurement judges this runner on device_ms: host times include the network
        self.device_ms: list[float] = []
        self._addr, self._lib = addr, lib_path
        self._sess: Any = None
        self._vm: Any = None
        self.device_notes: list[str] = []
        self._open()
        _RUNNERS.add(self)

    def _open(self) -> None:
        from tvm import relax

        self._sess = connect(self._addr)
        # Checked again here (one call): the report says which runtime the device ran, and a device swapped
        # since check_config is refused too.
        self.device_notes = [check_versions(self._addr, self._sess)]
        try:
            self._dev = self._sess.cpu(0)
            self._vm = relax.VirtualMachine(remote_module(self._sess, self._addr, self._lib), self._dev)
        except Exception as e:  # as in check_device
            raise TargetUnavailable(f"target 'tvm': the device behind the {self._addr.describe()} could not load "
                                    f"{self._lib}: {_last_line(e)}") from None
        self._timer = self._vm.time_evaluator("main", self._dev, number=1, repeat=1)

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        from .base import static_feeds

        if self._vm is None:
            self._open()
        args = [tvm.runtime.tensor(x, self._dev) for x in static_feeds(self.inputs, feeds, "tvm rpc runner")]
        out = self._vm["main"](*args)
        # A second run, timed by the device's clock: the host's wall time includes the network round trip.
        self.device_ms.append(float(self._timer(*args).mean) * 1e3)
        return [np.asarray(o.numpy()) for o in _flatten(out)]

    def _let_go(self) -> None:
        self._vm = self._timer = self._dev = self._sess = None

    def close(self) -> None:
        self._let_go()
        _RUNNERS.discard(self)


_RUNNERS: weakref.WeakSet[RpcTvmRunner] = weakref.WeakSet()


def _flatten(out: Any) -> list[Any]:
    if hasattr(out, "numpy"):
        return [out]
    return [x for o in out for x in _flatten(o)]
