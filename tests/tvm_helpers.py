"""Checks the TVM tests make on an exported library: its ELF architecture, and a run in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def check_library_elf(path: Path) -> dict[str, str]:
    """Architecture of an ELF shared library (for cross builds we cannot run here), via ``file``-free parsing."""
    data = Path(path).read_bytes()[:20]
    if data[:4] != b"\x7fELF":
        raise AssertionError(f"{path} is not an ELF file")
    machine = int.from_bytes(data[18:20], "little")
    names = {0x3E: "x86-64", 0xB7: "aarch64", 0x28: "arm", 0xF3: "riscv"}
    return {"class": "64-bit" if data[4] == 2 else "32-bit", "machine": names.get(machine, hex(machine))}


def run_in_fresh_process(folder: Path, inputs: dict[str, np.ndarray], python: str | None = None) -> list[np.ndarray]:
    """Load an exported library in a new Python process and run it once (the deployment check)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "in.npz", **inputs)  # type: ignore[arg-type]  # numpy stubs type **kwds as bool
        code = ("import sys, numpy as np; from compress.targets._tvm_runner import load_exported; "
                "r = load_exported(sys.argv[1]); x = dict(np.load(sys.argv[2])); "
                "np.savez(sys.argv[3], *r.infer(x))")
        proc = subprocess.run([python or sys.executable, "-c", code, str(folder), str(Path(tmp) / "in.npz"),
                               str(Path(tmp) / "out.npz")], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        if proc.returncode != 0:
            raise AssertionError(f"exported library {folder} failed in a fresh process: {proc.stderr.strip()[-800:]}")
        with np.load(Path(tmp) / "out.npz") as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]
