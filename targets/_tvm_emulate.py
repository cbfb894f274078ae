"""Check a cross-compiled TVM library's outputs under qemu user-mode emulation.

A library built for another CPU (e.g. ``mtriple = "aarch64-linux-gnu"``) cannot be loaded by
this machine's TVM. It can still be run: a small C++ driver (``tvm_vm_run.cc``) is built with
the same cross compiler against the target architecture's TVM runtime (``libtvm_runtime.so`` and
``libtvm_ffi.so`` from the apache-tvm / apache-tvm-ffi wheels for that architecture, same
versions as installed here), and qemu runs it on a seeded input. Its output is compared with
ONNX Runtime on this machine.

The runtime folder is fetched once with :func:`fetch_runtime` (``compress tvm-runtime aarch64``)
and recorded in ``runtime.json`` with the versions and SHA-256 of both libraries; a folder whose
versions differ from the installed TVM, or whose libraries changed since, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.artifact import sha256_file
from compress.errors import BuildError, InputError

from .base import module_version

DRIVER = Path(__file__).with_name("tvm_vm_run.cc")
RUNTIME_JSON = "runtime.json"
LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}
# Debian's packages: qemu-user for the emulator, g++-<triple> (libc6-<arch>-cross) for the sysroot.
ARCHES = {
    "aarch64": {"qemu": "qemu-aarch64", "sysroot": "/usr/aarch64-linux-gnu", "wheel": "manylinux_2_28_aarch64"},
}
ENV_VAR = "COMPRESS_TVM_CROSS_RUNTIME"


def arch_of(triple: str) -> str | None:
    return next((a for a in ARCHES if triple.startswith(a)), None)


def default_runtime_dir(arch: str, cache_root: Path | None) -> Path:
    """``$COMPRESS_TVM_CROSS_RUNTIME``, else ``<cache>/tvm-runtime/<arch>-tvm<version>``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if cache_root is None:
        from compress.core.cache import default_cache_dir

        cache_root = default_cache_dir()
    root = cache_root
    return root / "tvm-runtime" / f"{arch}-tvm{module_version('apache-tvm')}"


def fetch_runtime(arch: str, dest: Path, log: Any = print) -> Path:
    """Download the ``arch`` wheels of the installed apache-tvm / apache-tvm-ffi versions from the
    package index and keep their two runtime libraries in ``dest`` (written atomically)."""
    if arch not in ARCHES:
        raise InputError(f"tvm runtime: no emulation support for {arch!r}; supported: {', '.join(ARCHES)}")
    versions = {pkg: module_version(pkg) for pkg in LIBS}
    if "absent" in versions.values():
        raise InputError("tvm runtime: apache-tvm and apache-tvm-ffi must be installed here first "
                         "(pip install '.[tvm]')")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheels, stage = Path(tmp) / "wheels", Path(tmp) / "stage"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--platform", ARCHES[arch]["wheel"], "--python-version", f"{sys.version_info[0]}{sys.version_info[1]}",
               "-d", str(wheels), *(f"{p}=={v}" for p, v in versions.items())]
        log(f"tvm runtime: downloading the {arch} wheels of " + ", ".join(f"{p} {v}" for p, v in versions.items()))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BuildError(f"tvm runtime: pip could not download the {arch} wheels: {tail}")
        stage.mkdir()
        record: dict[str, Any] = {"arch": arch, "versions": versions, "libraries": {}}
        for pkg, member in LIBS.items():
            wheel = next(iter(sorted(wheels.glob(pkg.replace("-", "_") + "-*.whl"))), None)
            if wheel is None:
                raise BuildError(f"tvm runtime: pip returned no {pkg} wheel for {arch}")
            with zipfile.ZipFile(wheel) as z:
                target = stage / Path(member).name
                with z.open(member) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
            record["libraries"][target.name] = sha256_file(target)
        (stage / RUNTIME_JSON).write_text(json.dumps(record, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(stage, dest)
    log(f"tvm runtime: {arch} runtime in {dest}")
    return dest


def check_runtime(folder: Path, arch: str) -> str | None:
    """Why ``folder`` cannot be used as the ``arch`` runtime, or None when it can."""
    meta = folder / RUNTIME_JSON
    if not meta.exists():
        return f"no {arch} TVM runtime in {folder} (fetch it once with: compress tvm-runtime {arch})"
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        return f"{meta} is unreadable ({e}); fetch the runtime again (compress tvm-runtime {arch})"
    if record.get("arch") != arch:
        return f"{folder} holds a runtime for {record.get('arch')}, not {arch}"
    for pkg in LIBS:
        if record.get("versions", {}).get(pkg) != module_version(pkg):
            return (f"{folder} holds {pkg} {record.get('versions', {}).get(pkg)}, but {module_version(pkg)} is "
                    f"installed here; fetch the matching runtime (compress tvm-runtime {arch})")
    for name, digest in record.get("libraries", {}).items():
        lib = folder / name
        if not lib.exists() or sha256_file(lib) != digest:
            return f"{lib} is missing or changed since it was fetched; fetch the runtime again"
    return None


def _driver(folder: Path, cc: str) -> Path:
    """The driver built for this runtime with ``cc``, cached next to the runtime by source digest."""
    import tvm_ffi

    exe = folder / f"vm_run-{sha256_file(DRIVER)[:12]}"
    if exe.exists():
        return exe
    include = Path(tvm_ffi.__file__).parent / "include"
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    cmd = [cc, "-std=c++17", "-O1", str(DRIVER), f"-I{include}", f"-L{folder}", "-Wl,--no-as-needed",
           "-ltvm_runtime", "-ltvm_ffi", "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"tvm emulation: building the VM driver with {cc} failed: "
                         f"{(r.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    os.replace(tmp, exe)
    return exe


def emulated_check(library: Path, onnx_path: Path, inputs: list[Any], triple: str, cc: str,
                   runtime: Path, seed: int = 0, min_cosine: float = 0.9999,
                   timeout_s: float = 300.0) -> dict[str, Any]:
    """Run ``library`` under qemu on a seeded input and compare with ONNX Runtime here.

    Returns ``{"status": "not run", "reason": ...}`` when something needed is missing, else the
    comparison with max abs diff and cosine: ``status`` ``ok`` when the cosine is at least
    ``min_cosine`` and the max abs diff within 1e-3 of the largest reference output (at least
    1e-4), ``mismatch`` otherwise.
    """
    arch = arch_of(triple)
    if arch is None:
        return {"status": "not run", "reason": f"no emulation support for the triple {triple!r}"}
    qemu, sysroot = ARCHES[arch]["qemu"], Path(ARCHES[arch]["sysroot"])
    if shutil.which(qemu) is None:
        return {"status": "not run", "reason": f"{qemu} not found (Debian: apt-get install qemu-user)"}
    if not sysroot.is_dir():
        return {"status": "not run", "reason": f"no {arch} sysroot at {sysroot} (Debian: apt-get install {cc})"}
    if len(inputs) != 1 or inputs[0].dtype != "float32":
        return {"status": "not run", "reason": "the emulated check supports models with one float32 input"}
    why = check_runtime(runtime, arch)
    if why:
        return {"status": "not run", "reason": why}
    exe = _driver(runtime, cc)
    spec = inputs[0]
    x = np.random.default_rng(seed).standard_normal(spec.shape).astype(np.float32)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {spec.name: x})[0]
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        x.tofile(fin)
        env = {**os.environ, "LD_LIBRARY_PATH": str(runtime)}
        cmd = [qemu, "-L", str(sysroot), str(exe), str(library.resolve()), str(fin),
               ",".join(str(d) for d in spec.shape), str(fout)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "mismatch", "reason": f"the library did not finish under {qemu} in {timeout_s:.0f} s"}
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            return {"status": "mismatch", "reason": f"the library failed under {qemu} (exit {r.returncode}): {tail}"}
        got = np.fromfile(fout, dtype=np.float32)
    ref_flat = ref.astype(np.float32).ravel()
    if got.size != ref_flat.size:
        return {"status": "mismatch", "reason": f"output has {got.size} values under {qemu}, "
                                                f"ONNX Runtime gives {ref_flat.size}"}
    diff = float(np.abs(got - ref_flat).max(initial=0.0))
    denom = float(np.linalg.norm(got) * np.linalg.norm(ref_flat))
    cosine = float(got @ ref_flat / denom) if denom > 0 else float(np.array_equal(got, ref_flat))
    atol = max(1e-4, 1e-3 * float(np.abs(ref_flat).max(initial=0.0)))
    ok = diff <= atol and cosine >= min_cosine
    out = {"status": "ok" if ok else "mismatch", "emulator": qemu, "qemu_version": _qemu_version(qemu),
           "max_abs_diff": diff, "atol": atol, "cosine": cosine, "min_cosine": min_cosine, "input_seed": seed,
           "runtime": str(runtime)}
    if not ok:
        out["reason"] = (f"outputs under {qemu} differ from ONNX Runtime: max abs diff {diff:.3g} (allowed "
                         f"{atol:.3g}), cosine {cosine:.6f} (min {min_cosine})")
    return out


def _qemu_version(qemu: str) -> str:
    r = subprocess.run([qemu, "--version"], capture_output=True, text=True)
    return (r.stdout.strip().splitlines() or ["?"])[0]
