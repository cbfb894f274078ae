"""TVM's RPC server for the device, plus one function that reports the device's TVM runtime version.

Run it on the device (it needs only apache-tvm there, not compress-pipeline):

    python tvm_rpc_server.py --host 0.0.0.0 --port 9090                  # rpc = "DEVICE:9090"
    python tvm_rpc_server.py --tracker HOST:9190 --key rpi5 --port 9090  # rpc = "tracker:HOST:9190/rpi5"

It is ``python -m tvm.exec.rpc_server`` with one addition made through TVM's own ``server_init_callback``
hook: the global function ``compress.rpc.runtime_versions``, which answers the device's TVM and TVM FFI
versions. Stock TVM RPC servers (0.27) expose no call that reports a version; with this one, the build
machine compares the device's versions with its own before anything is tuned or built, and refuses a
device whose runtime differs in one line. A stock server still works: only the probe library (a
one-function build run there) checks it then, and the report says the version was not reported.

Never imported by compress: this file is copied to (or run on) the device as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

VERSION_FUNCTION = "compress.rpc.runtime_versions"


def register_version_function() -> None:
    """Runs in the server's process before it serves: registers ``compress.rpc.runtime_versions``."""
    import tvm
    import tvm_ffi

    versions = json.dumps({"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__})

    @tvm_ffi.register_global_func(VERSION_FUNCTION, override=True)
    def runtime_versions() -> str:
        return versions


def main(argv: list[str] | None = None) -> None:
    from tvm import rpc

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--port", type=int, default=9090, help="first port to try")
    p.add_argument("--port-end", type=int, default=9199, help="last port to try")
    p.add_argument("--tracker", help="HOST:PORT of a TVM RPC tracker to register with")
    p.add_argument("--key", default="", help="the device key under the tracker (e.g. rpi5)")
    p.add_argument("--custom-addr", help="the address to report to the tracker")
    p.add_argument("--silent", action="store_true")
    a = p.parse_args(argv)
    tracker = None
    if a.tracker:
        host, _, port = a.tracker.rpartition(":")
        tracker = (host, int(port))
    logging.basicConfig(level=logging.WARNING if a.silent else logging.INFO)
    server = rpc.Server(a.host, a.port, a.port_end, key=a.key, tracker_addr=tracker, custom_addr=a.custom_addr,
                        silent=a.silent, server_init_callback=register_version_function)
    # The server runs in a child process (TVM's PopenWorker) that outlives this one unless stopped here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"TVM RPC server on {a.host}:{server.port}", flush=True)
    try:
        server.proc.join()
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
