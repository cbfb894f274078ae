"""Is the machine busy? Other processes' CPU use and steal time, from /proc, around a measurement.

On a shared 2-core machine a process that holds a core makes an OpenMP/ORT thread pool wait for it
(PyTorch at 2 threads once took 15x longer than at 1), and the timings say nothing of it. A probe
samples /proc/stat (all CPUs) and /proc/self/stat (this process, every thread) before and while
measuring; "others" is the busy time of the CPUs minus our own. Linux only: elsewhere the probe
records that it could not look.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Snap:
    total: int  # jiffies of all CPUs, steal included
    busy: int  # total minus idle and iowait
    steal: int
    own: int  # this process's user + system jiffies
    cpus: int
    wall: float


def _snap() -> _Snap | None:
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        with open("/proc/self/stat") as f:
            own_fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    vals = [int(x) for x in lines[0].split()[1:]]
    vals += [0] * (8 - len(vals))
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    total = sum(vals[:8])
    idle = vals[3] + vals[4]
    cpus = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    own = int(own_fields[11]) + int(own_fields[12])  # utime, stime (fields 14, 15 of proc(5))
    return _Snap(total, total - idle, vals[7], own, max(cpus, 1), time.monotonic())


def _between(a: _Snap, b: _Snap, threads: int) -> dict[str, Any]:
    total = max(b.total - a.total, 1)
    per_cpu = total / a.cpus
    others = max(0, (b.busy - a.busy) - (b.own - a.own))
    return {"seconds": round(b.wall - a.wall, 2), "cpus": a.cpus, "threads": threads,
            "others_cores": round(others / per_cpu, 2), "own_cores": round((b.own - a.own) / per_cpu, 2),
            "steal_pct": round(100 * (b.steal - a.steal) / total, 2)}


def warnings(sample: dict[str, Any], when: str) -> list[str]:
    """Plain-language warnings for one probe reading (empty when the machine looked quiet)."""
    out = []
    free = sample["cpus"] - sample["others_cores"]
    if sample["others_cores"] >= 0.3 and sample["threads"] > free - 0.2:
        fewer = max(1, int(free))
        hint = (f"quiet the machine or set measure.threads = {fewer}" if fewer < sample["threads"]
                else "quiet the machine")
        out.append(f"busy machine {when}: other processes used {sample['others_cores']:.1f} of {sample['cpus']} "
                   f"cores while timing with {sample['threads']} thread(s); timings are inflated and noisier, "
                   f"verdicts may be inconclusive ({hint})")
    if sample["steal_pct"] >= 5:
        out.append(f"steal time {sample['steal_pct']:.0f}% {when}: the hypervisor gave this VM's CPUs to "
                   "others; timings are unreliable")
    return out


class ContentionProbe:
    """``before()`` once (a short idle look), then ``start()`` / ``stop()`` around each measurement."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.readings: dict[str, Any] = {}
        self._t0: _Snap | None = None

    def before(self, seconds: float = 0.3) -> dict[str, Any] | None:
        a = _snap()
        if a is None:
            self.readings["unavailable"] = "no /proc/stat on this system: contention not checked"
            return None
        time.sleep(seconds)
        b = _snap()
        assert b is not None
        self.readings["before"] = _between(a, b, self.threads)
        return self.readings["before"]

    def start(self) -> None:
        self._t0 = _snap()

    def stop(self, label: str) -> dict[str, Any] | None:
        b = _snap()
        if self._t0 is None or b is None:
            return None
        r = _between(self._t0, b, self.threads)
        self.readings.setdefault("during", {})[label] = r
        self._t0 = None
        return r

    def report(self) -> dict[str, Any]:
        warn: list[str] = []
        if "before" in self.readings:
            warn += warnings(self.readings["before"], "before measuring")
        for label, r in self.readings.get("during", {}).items():
            warn += warnings(r, f"while measuring {label}")
        return {**self.readings, "cpus_online": os.cpu_count(), "warnings": warn}


def pick_threads(setting: int, cpus: int, before: dict[str, Any] | None) -> tuple[int, str | None]:
    """The thread count to measure with: the setting when given; for 0 (auto) the cores other
    processes left free (at least 1), with a note saying why when that is fewer than all."""
    if setting:
        return setting, None
    if before is None:
        return cpus, None
    free = cpus - before["others_cores"]
    n = max(1, min(cpus, int(free + 0.5)))
    if n < cpus:
        return n, (f"threads: {n} of {cpus} cores (auto): other processes held {before['others_cores']:.1f} "
                   "cores before measuring, and a thread pool larger than the free cores waits on them")
    return cpus, None
