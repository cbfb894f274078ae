"""Latency measurement: warm-up, then interleaved timed rounds until both a
minimum count and a minimum time are reached.

Candidates are interleaved (one call of each per round) because shared machines
drift: a slow minute then hits every candidate alike, and ratios stay honest.
The clock is injectable so tests can drive verdicts with controlled timings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    throughput: float  # samples per second at p50

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_ms: list[float], batch: int) -> LatencyStats:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return LatencyStats(batch, int(a.size), p50, p90, p99, mean, std, std / mean if mean > 0 else math.inf,
                        batch * 1000.0 / p50 if p50 > 0 else math.inf)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 5,
    min_runs: int = 20,
    min_time_s: float = 1.0,
    max_time_s: float = 30.0,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = False,
    desc: str = "latency",
) -> dict[str, list[float]]:
    """Time each callable in interleaved rounds; return milliseconds per call per name.

    Stops when every candidate has ``min_runs`` samples and ``min_time_s`` of
    timed calls, or when ``max_time_s`` of wall time has passed (after at
    least 3 rounds), whichever comes first.
    """
    from tqdm import tqdm

    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    start = clock()
    bar = tqdm(total=min_runs, desc=desc, disable=not progress, leave=False)
    rounds = 0
    while True:
        for n in names:
            t0 = clock()
            fns[n]()
            dt = clock() - t0
            samples[n].append(dt * 1000.0)
            spent[n] += dt
        rounds += 1
        if rounds <= min_runs:
            bar.update(1)
        enough = rounds >= min_runs and all(spent[n] >= min_time_s for n in names)
        if enough or (clock() - start > max_time_s and rounds >= 3):
            break
    bar.close()
    return samples
