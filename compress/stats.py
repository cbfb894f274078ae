"""Bootstrap confidence intervals for latency statistics and ratios.

Samples from interleaved rounds are paired (round i of every candidate ran back
to back), so a ratio between two candidates resamples whole rounds: the noise
they share cancels instead of widening the interval.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "p50": lambda a: np.percentile(a, 50, axis=-1),
    "p90": lambda a: np.percentile(a, 90, axis=-1),
    "p99": lambda a: np.percentile(a, 99, axis=-1),
    "mean": lambda a: a.mean(axis=-1),
}


def _idx(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_stat(samples: list[float], stat: str, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high) of a statistic of one sample set."""
    a = np.asarray(samples, dtype=np.float64)
    f = STATS[stat]
    boot = f(a[_idx(len(a), resamples, seed)])
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(f(a)), float(lo), float(hi)


def bootstrap_ratio(num: list[float], den: list[float], stat: str, confidence: float = 0.95,
                    resamples: int = 2000, seed: int = 0, paired: bool = True) -> tuple[float, float, float]:
    """(point, low, high) of stat(num) / stat(den); rounds resampled jointly when paired."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    f = STATS[stat]
    if paired:
        if len(a) != len(b):
            raise ValueError("paired samples must have the same length")
        idx = _idx(len(a), resamples, seed)
        boot = f(a[idx]) / f(b[idx])
    else:
        boot = f(a[_idx(len(a), resamples, seed)]) / f(b[_idx(len(b), resamples, seed + 1)])
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(f(a) / f(b)), float(lo), float(hi)


def verdict(lo: float, hi: float, limit: float) -> str:
    """pass when the whole interval is within the limit, fail when all of it is beyond, else inconclusive."""
    if hi <= limit:
        return "pass"
    if lo > limit:
        return "fail"
    return "inconclusive"
