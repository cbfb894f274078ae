"""Machine fingerprint: CPU model, ISA flags, cores, library versions, GPU where present."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from .cache import library_versions

_ISA = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "neon", "asimd", "sve", "f16c")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set[str]()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "Model") and model in ("unknown", ""):
                model = v.strip()
            elif k in ("flags", "Features") and not flags:
                flags = set(v.split())
            elif k == "model name":
                model = v.strip()
    return {
        "model": model,
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": sorted(f for f in _ISA if f in flags),
    }


def machine_fingerprint() -> dict[str, Any]:
    return {
        "cpu": cpu_info(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": {k: v for k, v in library_versions().items() if v != "absent"},
        "gpu": gpu_info(),
    }


def gpu_info() -> str | None:
    """A short GPU description from torch when it sees one; None on CPU-only machines."""
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory // 2**20} MiB)"
    return None
