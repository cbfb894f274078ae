"""Machine fingerprint: CPU model, ISA flags, cores, library versions, GPU where present.

Every ISA-dependent choice in the product (the INT8 scheme of quantize.int8 / quantize.dynamic /
quantize.qat, TVM's host ``mcpu``) reads the CPU through :func:`cpu_info`, so setting
``COMPRESS_ISA`` (a comma-separated flag list such as ``avx2,fma`` or ``avx2,fma,avx512f,avx512_vnni``)
and optionally ``COMPRESS_ARCH`` (``x86_64``, ``aarch64``) makes the whole product behave as on
that CPU. The test suite uses this to run each branch on any machine; users use it to prepare a
model for a CPU other than the build machine's. The override is recorded (``isa_forced``) and the
detected flags are kept beside it (``isa_detected``), so a report never hides it.

A hardware profile (``compress.stages.profiles``; ``profile = "rpi5"`` in a recipe) forces the ISA through
the same door while a run lasts (:func:`forced_by_profile`); it wins over the environment, because the
recipe names the device, and ``isa_forced_by`` says which of the two forced it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .versions import library_versions

# x86 flags as /proc/cpuinfo spells them, then Arm's: asimddp = dot product (SDOT/UDOT), asimdhp = FP16
# arithmetic, i8mm = int8 matrix multiply, bf16 = BF16 instructions.
_ISA = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "neon", "asimd", "sve",
        "f16c", "asimddp", "asimdhp", "i8mm", "bf16")
ISA_ENV = "COMPRESS_ISA"
ARCH_ENV = "COMPRESS_ARCH"
KNOWN_ISA_FLAGS = frozenset(_ISA)
KNOWN_ARCHS = ("x86_64", "aarch64")


def isa_override() -> tuple[list[str] | None, str | None]:
    """The ISA flags and architecture forced through the environment (None where not set).

    Unknown flags are refused (a typo such as ``avx512vnni`` would otherwise silently select the
    no-VNNI branch), naming the variable and the accepted flags.
    """
    from ..errors import InputError

    raw, arch = os.environ.get(ISA_ENV), os.environ.get(ARCH_ENV)
    flags: list[str] | None = None
    if raw is not None:
        flags = sorted({f.strip().lower() for f in raw.split(",") if f.strip()})
        bad = [f for f in flags if f not in KNOWN_ISA_FLAGS]
        if bad:
            raise InputError(f"{ISA_ENV}={raw!r}: unknown ISA flag(s) {', '.join(bad)}; use a comma-separated "
                             f"list of {', '.join(sorted(KNOWN_ISA_FLAGS))} (empty = no optional ISA extension)")
    if arch is not None and arch not in KNOWN_ARCHS:
        raise InputError(f"{ARCH_ENV}={arch!r}: use one of {', '.join(KNOWN_ARCHS)}")
    return flags, arch


@dataclass(frozen=True)
class ProfileOverride:
    """The CPU a hardware profile describes, as :func:`cpu_info` reports it while the profile is active."""

    name: str
    isa: tuple[str, ...]
    arch: str
    int8_scheme: str | None = None
    version: int = 1
    source: str = "built-in"


# A context variable, not a module global: each thread (a search's trial workers, a test runner's) and each
# asyncio task sees only the profile of the run it belongs to, and a block that fails restores its caller's.
_PROFILE: contextvars.ContextVar[ProfileOverride | None] = contextvars.ContextVar("compress_profile", default=None)


@contextlib.contextmanager
def forced_by_profile(override: ProfileOverride | None) -> Iterator[None]:
    """Make :func:`cpu_info` describe ``override``'s CPU inside the block (None: no change)."""
    if override is None:
        yield
        return
    token = _PROFILE.set(override)
    try:
        yield
    finally:
        _PROFILE.reset(token)


def active_profile() -> ProfileOverride | None:
    """The hardware profile forcing the ISA right now (in this thread or task), if any."""
    return _PROFILE.get()


def cpu_info(with_profile: bool = True) -> dict[str, Any]:
    """This CPU as the product sees it: the detected CPU, with an active profile or ``COMPRESS_ISA``/``COMPRESS_ARCH``
    applied (the profile wins). ``with_profile=False``: the machine itself (what a report records as the host)."""
    info = dict(detected_cpu())
    info["isa_detected"] = info["isa"]
    profile = _PROFILE.get()
    if profile is not None and with_profile:
        info["isa"], info["arch"] = sorted(profile.isa), profile.arch
        info["isa_forced"], info["isa_forced_by"] = True, f"profile {profile.name}"
        return info
    flags, arch = isa_override()
    info["isa_forced"] = flags is not None or arch is not None
    if info["isa_forced"]:
        info["isa_forced_by"] = f"{ISA_ENV}/{ARCH_ENV}"
    if flags is not None:
        info["isa"] = flags
    if arch is not None:
        info["arch"] = arch
    return info


@lru_cache(maxsize=1)
def detected_cpu() -> dict[str, Any]:
    """The CPU read from /proc/cpuinfo (cached: it does not change while the process runs)."""
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
    """The machine that built and measured: a hardware profile changes what is built and for which device,
    never what is recorded about this machine (the profile is recorded beside it, with the CPU it describes)."""
    out = {
        "cpu": cpu_info(with_profile=False),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": {k: v for k, v in library_versions().items() if v != "absent"},
        "gpu": gpu_info(),
    }
    profile = _PROFILE.get()
    if profile is not None:  # the run prepared the model for this device, not for the machine above
        out["profile"] = {"name": profile.name, "version": profile.version, "source": profile.source,
                          "arch": profile.arch, "isa": sorted(profile.isa), "int8_scheme": profile.int8_scheme,
                          "note": "figures measured in this process come from the machine described here, not "
                                  "from the profile's device"}
    return out


def gpu_info() -> str | None:
    """A short GPU description from torch when it sees one; None on CPU-only machines."""
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory // 2**20} MiB)"
    return None
