#!/usr/bin/env python3
"""Run the model in this folder: the runner of a bundle written by ``compress export``.

Needs only NumPy and the runtime named in manifest.json (onnxruntime, or apache-tvm for a TVM
library); not the package that built it. Only files listed in manifest.json's "files", inside this
folder, are loaded, and only after their SHA-256 matches (a TVM library is native code: a swapped
one is refused, not run).

What the digests protect against, and what not: they catch a file damaged or replaced after
export (a bad copy, a swapped model.so) as long as manifest.json itself is the one compress export
wrote. manifest.json is not a signature: whoever can edit the files here can edit it too. Pin it:
compress export prints the manifest's SHA-256; give it here through a channel you trust, and
nothing runs unless manifest.json still has that digest:
    python run.py --expect-manifest-sha256 HEX

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


def load_manifest(folder: Path = HERE, expect_sha256: str | None = None) -> dict[str, Any]:
    """manifest.json, checked: its own digest when pinned, its shape, and every listed file's SHA-256. The
    model it names must be one of those files (``manifest["model"]`` is then safe to load from ``folder``)."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{folder} has no manifest.json: not a bundle written by compress export")
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is unreadable ({e}); export the bundle again") from None
    if expect_sha256 is not None and hashlib.sha256(raw).hexdigest() != expect_sha256.strip().lower():
        raise BundleError(f"{path}: its SHA-256 is {hashlib.sha256(raw).hexdigest()}, not the "
                          f"{expect_sha256.strip()} given with --expect-manifest-sha256; refusing to run")
    _check_manifest_shape(manifest, path)
    root = folder.resolve()
    for rel, digest in manifest["files"].items():
        f = _inside(root, rel, path)
        if not f.is_file() or _sha256(f) != digest:
            raise BundleError(f"{folder / rel} is missing or differs from the SHA-256 in manifest.json; refusing "
                              "to run a changed bundle (export it again)")
    model = manifest["model"]
    _inside(root, model, path)
    if model not in manifest["files"]:
        raise BundleError(f"{path}: the model {model!r} is not listed in its 'files' (so its SHA-256 is not "
                          "checked); refusing to load it (export the bundle again)")
    return manifest


def _inside(root: Path, rel: str, manifest: Path) -> Path:
    """``root/rel`` when it is a file name inside the bundle folder (links resolved); a one-line refusal else."""
    f = (root / rel).resolve()
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not f.is_relative_to(root):
        raise BundleError(f"{manifest}: {rel!r} is outside the bundle folder {root}; a bundle loads only its "
                          "own files (export it again)")
    return f


def _check_manifest_shape(m: Any, path: Path) -> None:
    """The keys run.py reads, with the types it needs, so a damaged manifest is one line, not a KeyError."""
    def bad(what: str) -> BundleError:
        return BundleError(f"{path}: {what}; not a manifest written by compress export (export the bundle again)")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if not isinstance(m.get("files"), dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in m["files"].items()):
        raise bad("no 'files' table of file name -> SHA-256")
    if not isinstance(m.get("model"), str):
        raise bad("no 'model' file name")
    ins = m.get("inputs")
    if not isinstance(ins, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                            and isinstance(s.get("shape"), list) and isinstance(s.get("dtype"), str)
                                            for s in ins):
        raise bad("no 'inputs' list of {name, shape, dtype}")
    rt = m.get("runtime")
    if not isinstance(rt, dict) or not isinstance(rt.get("package"), str) or not isinstance(rt.get("version"), str):
        raise bad("no 'runtime' {package, version}")


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
        try:
            x = np.ascontiguousarray(arrays[s["name"]], dtype=s["dtype"])
        except (TypeError, ValueError) as e:
            raise BundleError(f"--input {path}: {s['name']!r} cannot be read as {s['dtype']} ({e})") from None
        if manifest.get("static_shapes", True) and list(x.shape) != list(s["shape"]):
            raise BundleError(f"--input {path}: {s['name']!r} has shape {list(x.shape)}; this model was compiled "
                              f"for {s['shape']}")
        # A dynamic batch: the other dimensions are still fixed (a named or unknown one takes any size).
        fixed = ["N" if i == 0 else d if isinstance(d, int) else "any" for i, d in enumerate(s["shape"])]
        if x.ndim != len(fixed) or any(isinstance(d, int) and d != x.shape[i] for i, d in enumerate(fixed)):
            raise BundleError(f"--input {path}: {s['name']!r} has shape {list(x.shape)}; this model takes "
                              f"[{', '.join(str(d) for d in fixed)}] (N: any batch)")
        feeds[s["name"]] = x
    return feeds


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # a usage error is one line (the usage block stays in --help)
        self.exit(2, f"error: {message} (see run.py --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__.split("This file is copied")[0].strip(),
                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", help=".npz with one array per model input (default: seeded random input)")
    p.add_argument("--output", help="write the outputs to this .npz (output_0, output_1, ...)")
    p.add_argument("--repeat", type=int, default=0, help="time this many calls after one warm-up call")
    p.add_argument("--threads", type=int, default=0, help="runtime threads (default: the runtime's choice)")
    p.add_argument("--allow-version-mismatch", action="store_true",
                   help="run even if the installed runtime's version differs from the build's")
    p.add_argument("--expect-manifest-sha256", metavar="HEX",
                   help="refuse to run unless manifest.json has this SHA-256 (compress export prints it); the\n"
                   "file digests inside manifest.json protect only as far as manifest.json is trusted")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # a usage error: one line, exit 2; --help: exit 0
        return int(e.code or 0)
    try:
        manifest = load_manifest(expect_sha256=a.expect_manifest_sha256)
        check_runtime(manifest, a.allow_version_mismatch)
        feeds = make_inputs(manifest, a.input)
        run = make_session(manifest, threads=a.threads)
        try:
            outs = run(feeds)
        except Exception as e:  # the runtime's own refusal of this input, said in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BundleError(f"the runtime refused the input: {type(e).__name__}: {first[:300]}") from None
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
