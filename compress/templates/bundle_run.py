#!/usr/bin/env python3
"""Run the model in this folder: the runner of a bundle written by ``compress export``.

Needs only NumPy and the runtime named in manifest.json (onnxruntime, or apache-tvm for a TVM
library); not the package that built it. Every file's SHA-256 is checked against manifest.json
before anything is loaded (a TVM library is native code: a swapped one is refused, not run).

    python run.py                       # seeded random input, prints a summary line
    python run.py --input x.npz         # arrays named as manifest.json's inputs
    python run.py --output y.npz        # outputs saved as output_0, output_1, ...
    python run.py --repeat 50           # also times 50 calls (median and p90 in ms, on this device)

Exit codes: 0 ok; 2 a problem with this folder, the input or the installed runtime (one line).

This file is copied verbatim into each bundle (compress/templates/bundle_run.py in the source tree): it
must import nothing from the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class BundleError(Exception):
    """Something about this folder, its input or the runtime installed here; said in one line."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(folder: Path = HERE) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.exists():
        raise BundleError(f"{folder} has no manifest.json: not a bundle written by compress export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is unreadable ({e}); export the bundle again") from None
    for rel, digest in manifest["files"].items():
        f = folder / rel
        if not f.is_file() or _sha256(f) != digest:
            raise BundleError(f"{f} is missing or differs from the SHA-256 in manifest.json; refusing to run a "
                              "changed bundle (export it again)")
    return manifest


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_runtime(manifest: dict[str, Any], allow_mismatch: bool = False) -> None:
    rt = manifest["runtime"]
    have = _installed(rt["package"])
    if have is None:
        raise BundleError(f"this bundle needs {rt['package']} {rt['version']}, which is not installed here: "
                          f"pip install '{rt['package']}=={rt['version']}'")
    if have != rt["version"] and not allow_mismatch:
        raise BundleError(f"this bundle was built with {rt['package']} {rt['version']}, but {have} is installed "
                          f"here ({rt['why_exact']}); pip install '{rt['package']}=={rt['version']}', or pass "
                          "--allow-version-mismatch to try anyway")
    arch = manifest.get("arch")
    if arch and arch != _norm_arch(platform.machine()):
        raise BundleError(f"this bundle was built for {arch}; this machine is {platform.machine()}")


def _norm_arch(arch: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch.lower())


def make_session(manifest: dict[str, Any], folder: Path = HERE, threads: int = 0) -> Callable[..., list[Any]]:
    """A function feeds -> list of output arrays, on the runtime the manifest names."""
    import numpy as np

    model = folder / manifest["model"]
    names = [s["name"] for s in manifest["inputs"]]
    if manifest["runtime"]["package"] == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        return lambda feeds: [np.asarray(o) for o in sess.run(None, {n: feeds[n] for n in names})]
    import tvm
    from tvm import relax

    if threads:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(model)), dev)

    def flatten(out: Any) -> list[Any]:
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [x for o in out for x in flatten(o)]

    return lambda feeds: flatten(vm["main"](*[tvm.runtime.tensor(feeds[n], dev) for n in names]))


def make_inputs(manifest: dict[str, Any], path: str | None, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    specs = manifest["inputs"]
    if path is None:
        rng = np.random.default_rng(seed)
        return {s["name"]: (rng.standard_normal(s["shape"]).astype(s["dtype"]) if s["dtype"].startswith("float")
                            else np.zeros(s["shape"], dtype=s["dtype"])) for s in specs}
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BundleError(f"--input {path}: not a readable .npz file ({e})") from None
    feeds = {}
    for s in specs:
        if s["name"] not in arrays:
            raise BundleError(f"--input {path}: no array named {s['name']!r} (the model's inputs: "
                              f"{', '.join(x['name'] for x in specs)})")
        x = np.ascontiguousarray(arrays[s["name"]], dtype=s["dtype"])
        if manifest["static_shapes"] and list(x.shape) != list(s["shape"]):
            raise BundleError(f"--input {path}: {s['name']!r} has shape {list(x.shape)}; this model was compiled "
                              f"for {s['shape']}")
        feeds[s["name"]] = x
    return feeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", help=".npz with one array per model input (default: seeded random input)")
    p.add_argument("--output", help="write the outputs to this .npz (output_0, output_1, ...)")
    p.add_argument("--repeat", type=int, default=0, help="time this many calls after one warm-up call")
    p.add_argument("--threads", type=int, default=0, help="runtime threads (default: the runtime's choice)")
    p.add_argument("--allow-version-mismatch", action="store_true",
                   help="run even if the installed runtime's version differs from the build's")
    a = p.parse_args(argv)
    try:
        manifest = load_manifest()
        check_runtime(manifest, a.allow_version_mismatch)
        feeds = make_inputs(manifest, a.input)
        run = make_session(manifest, threads=a.threads)
        outs = run(feeds)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {"model": manifest["model"], "runtime": manifest["runtime"]["package"],
                               "outputs": [list(o.shape) for o in outs]}
    if a.repeat > 0:
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            run(feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        summary["latency_ms"] = {"p50": times[len(times) // 2], "p90": times[min(len(times) - 1,
                                                                                 int(len(times) * 0.9))],
                                 "runs": len(times), "device": platform.node() or "this machine"}
    if a.output:
        import numpy as np

        np.savez(a.output, **{f"output_{i}": o for i, o in enumerate(outs)})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
