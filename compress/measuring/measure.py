"""Latency measurement: warm-up, then interleaved timed rounds until every candidate has a
minimum count and a minimum time, or the time cap is reached.

Candidates are interleaved (one call of each per round) because shared machines drift: a slow
minute then hits every candidate alike and ratios stay honest. The order inside a round changes
every round: each block of n rounds uses the n rotations of a permutation drawn with the run's
seed, so every candidate runs in every position equally often (a fixed order biased the first
candidate: a byte-identical model once read as "1.69x faster"). The orders are recorded.

``max_time_s`` is a cap, not a hint: warm-up stops after a quarter of it, a candidate that has
spent its share (cap / candidates) of timed calls stops being timed (it gets fewer rounds, and
``Timing.capped`` says so), and the loop ends once the cap has passed. A single call cannot be
interrupted in-process, so a run can overshoot by at most one call per candidate.

A candidate that stops early keeps the first k rounds, so every pair of candidates is paired on
the rounds both ran (a prefix); :mod:`compress.measuring.stats` pairs on that prefix.

The clock is injectable so tests drive verdicts with controlled timings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..reporting.report_schema import LatencyStats  # one definition: summarize returns the report's record


def summarize(samples_ms: list[float], batch: int) -> LatencyStats:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return LatencyStats(batch=batch, runs=int(a.size), p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=mean, std_ms=std,
                        cv=std / mean if mean > 0 else math.inf,
                        throughput=batch * 1000.0 / p50 if p50 > 0 else math.inf)


@dataclass
class Timing:
    """What one interleaved measurement produced."""

    samples: dict[str, list[float]]  # ms per call; each list covers rounds 0..len-1
    order: dict[str, Any]  # method, seed, candidates and the order of every round (indices)
    warmup: dict[str, int]  # warm-up calls each candidate got
    capped: dict[str, str] = field(default_factory=dict)  # candidate -> why it got fewer rounds
    stopped: str = ""  # why the loop ended
    seconds: float = 0.0

    def rounds(self) -> int:
        return max((len(s) for s in self.samples.values()), default=0)

    def meta(self) -> dict[str, Any]:
        """The JSON the report keeps (everything but the samples)."""
        return {"order": self.order, "warmup": self.warmup, "capped": self.capped, "stopped": self.stopped,
                "seconds": round(self.seconds, 3), "rounds": self.rounds()}


def round_orders(n: int, rounds: int, seed: int) -> list[list[int]]:
    """Balanced random orders: each block of n rounds holds the n rotations of a seeded permutation."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    perm: list[int] = []
    for r in range(rounds):
        if r % n == 0:
            perm = [int(i) for i in rng.permutation(n)]
        k = r % n
        out.append(perm[k:] + perm[:k])
    return out


def _warm_up(fns: dict[str, Callable[[], object]], warmup: int, clock: Callable[[], float], start: float,
             cap_s: float) -> dict[str, int]:
    """Untimed calls, each round in a rotated order, until ``warmup`` rounds or ``cap_s`` has passed; the count
    each candidate got."""
    names = list(fns)
    n = len(names)
    warm = dict.fromkeys(names, 0)
    for i in range(warmup):
        for k in (names[i % n:] + names[:i % n]) if n else []:
            fns[k]()
            warm[k] += 1
        if clock() - start > cap_s:
            break
    return warm


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 5,
    min_runs: int = 20,
    min_time_s: float = 1.0,
    max_time_s: float = 30.0,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = False,
    desc: str = "latency",
    seed: int = 0,
) -> Timing:
    """Time each callable in interleaved rounds of changing order; milliseconds per call per name.

    Stops when every candidate still timed has ``min_runs`` samples and ``min_time_s`` of timed
    calls, or when ``max_time_s`` has passed, whichever comes first (see the module doc).
    """
    from tqdm import tqdm

    names = list(fns)
    n = len(names)
    start = clock()
    warm = _warm_up(fns, warmup, clock, start, 0.25 * max_time_s)
    samples: dict[str, list[float]] = {k: [] for k in names}
    spent = dict.fromkeys(names, 0.0)
    active = set(names)
    capped: dict[str, str] = {}
    share = max_time_s / max(n, 1)
    rng = np.random.default_rng(seed)
    orders: list[list[int]] = []
    perm: list[int] = []
    bar = tqdm(total=min_runs, desc=desc, disable=not progress, leave=False)
    stopped = "no candidates"
    rounds = 0

    def enough(k: str) -> bool:
        return len(samples[k]) >= min_runs and spent[k] >= min_time_s

    while active:
        if rounds % n == 0:
            perm = [int(i) for i in rng.permutation(n)]
        r = rounds % n
        order = perm[r:] + perm[:r]
        orders.append(order)
        for i in order:
            k = names[i]
            if k not in active:
                continue
            t0 = clock()
            fns[k]()
            dt = clock() - t0
            samples[k].append(dt * 1000.0)
            spent[k] += dt
        rounds += 1
        if rounds <= min_runs:
            bar.update(1)
        elapsed = clock() - start
        if all(enough(k) for k in active):
            stopped = "every candidate reached min_runs and min_time_s"
            break
        if elapsed >= max_time_s:
            stopped = f"max_time_s cap ({max_time_s:g} s) reached after {rounds} rounds"
            for k in sorted(active):
                if not enough(k):
                    capped[k] = (f"{len(samples[k])} rounds (wanted {min_runs}): stopped at the "
                                 f"{max_time_s:g} s cap")
            break
        for k in sorted(active):
            if spent[k] > share and not enough(k):  # this one alone would blow the cap: the others finish
                capped[k] = (f"{len(samples[k])} rounds (wanted {min_runs}): its share of max_time_s "
                             f"({share:.3g} s of timed calls) was spent")
        active -= set(capped)
        if not active:
            stopped = "every candidate spent its share of max_time_s"
    bar.close()
    return Timing(samples, {"method": "balanced-shuffle", "seed": seed, "candidates": names, "rounds": orders},
                  warm, capped, stopped, clock() - start)
