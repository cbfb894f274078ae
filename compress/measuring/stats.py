"""Bootstrap confidence intervals for latency statistics and ratios.

Samples from interleaved rounds are paired (round i of every candidate ran close together), and
rounds depend on their neighbours (a busy minute slows several rounds in a row). Ratios therefore
use a *circular block bootstrap over rounds*: blocks of consecutive rounds are resampled jointly
for both candidates, so the noise they share cancels and the autocorrelation of rounds widens the
interval as it should, instead of being treated as independent draws (which made two sessions of
one file look different). The block length is chosen from the data (Politis & White's automatic
rule on the per-round log-ratio, at least ``ceil(n ** (1/3))`` rounds); ``block=1`` gives the
plain paired bootstrap.

A candidate that was capped has fewer rounds; two candidates are paired on the rounds both ran
(the shorter prefix, see :mod:`compress.measuring.measure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "p50": lambda a: np.median(a, axis=-1),
    "p90": lambda a: np.percentile(a, 90, axis=-1),
    "p99": lambda a: np.percentile(a, 99, axis=-1),
    "mean": lambda a: a.mean(axis=-1),
}
# z for 80% power, used for the smallest detectable difference.
_Z_POWER = 0.8416
# Resampled values per bootstrap at most: a 30 us model timed for a few seconds has ~10^4-10^5
# rounds, and 2000 full resamples of those took seconds per interval (a check spent 30 s on
# bootstrapping). Above this, fewer resamples are drawn (never under 400).
_MAX_CELLS = 2_000_000


def _resamples(n: int, wanted: int) -> int:
    return max(min(wanted, 400), min(wanted, _MAX_CELLS // max(n, 1)))


def _idx(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def block_length(n: int) -> int:
    """The floor of the block length: the usual n^(1/3) rate."""
    return max(1, math.ceil(n ** (1 / 3)))


def auto_block_length(series: np.ndarray) -> int:
    """Politis & White (2004, with Patton et al.'s 2009 correction) block length for the circular
    bootstrap, from the autocorrelation of the per-round series (here the per-round log-ratio):
    strongly dependent rounds get long blocks. Never below the n^(1/3) rule, never above n/3."""
    x = np.asarray(series, dtype=np.float64)
    n = len(x)
    floor = block_length(n)
    if n < 8 or not np.isfinite(x).all():
        return floor
    x = x - x.mean()
    var = float(x @ x) / n
    if var <= 0:
        return floor
    max_lag = min(n - 1, max(2 * int(math.sqrt(n)), 10))
    acov = np.array([float(x[: n - k] @ x[k:]) / n for k in range(max_lag + 1)])
    rho = acov / acov[0]
    kn = max(5, int(math.sqrt(math.log10(n))))
    crit = 2.0 * math.sqrt(math.log10(n) / n)
    m = max_lag // 2
    for lag in range(1, max_lag - kn + 1):
        if np.all(np.abs(rho[lag:lag + kn]) < crit):
            m = lag - 1
            break
    big_m = min(2 * max(m, 1), max_lag)
    k = np.arange(-big_m, big_m + 1)
    t = np.abs(k) / big_m
    lam = np.where(t <= 0.5, 1.0, np.where(t <= 1.0, 2 * (1 - t), 0.0))
    r = acov[np.abs(k)]
    g = float(np.sum(lam * np.abs(k) * r))
    d = (4 / 3) * float(np.sum(lam * r)) ** 2
    if d <= 0:
        return floor
    b = (2 * g * g / d) ** (1 / 3) * n ** (1 / 3)
    return int(min(max(floor, math.ceil(b)), max(floor, n // 3)))


def _block_idx(n: int, resamples: int, seed: int, block: int) -> np.ndarray:
    """Circular block bootstrap indices: ceil(n/block) blocks of consecutive rounds, wrapped."""
    if block <= 1:
        return _idx(n, resamples, seed)
    k = math.ceil(n / block)
    starts = np.random.default_rng(seed).integers(0, n, size=(resamples, k), dtype=np.int32)
    idx = (starts[:, :, None] + np.arange(block, dtype=np.int32)[None, None, :]).reshape(resamples, k * block)[:, :n]
    idx[idx >= n] -= n  # wrap around (cheaper than a modulo over the whole array)
    return idx


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def bootstrap_stat(samples: list[float], stat: str, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0, block: int | None = None) -> tuple[float, float, float]:
    """(point estimate, low, high) of a statistic of one sample set (block bootstrap over rounds)."""
    a = np.asarray(samples, dtype=np.float64)
    f = STATS[stat]
    with np.errstate(divide="ignore", invalid="ignore"):
        blk = auto_block_length(np.log(a)) if block is None else block
    boot = f(a[_block_idx(len(a), _resamples(len(a), resamples), seed, blk)])
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(f(a)), float(lo), float(hi)


@dataclass(frozen=True)
class RatioCI:
    """stat(num) / stat(den) with its interval, and what the measurement could have resolved."""

    ratio: float
    low: float
    high: float
    rounds: int  # paired rounds used
    block: int  # block length of the bootstrap (rounds)
    mde: float  # smallest difference detectable with 80% power at this confidence, as a fraction
    paired: bool = True
    session: float = 0.0  # between-session spread added to the interval (log scale), see widen()

    def to_json(self) -> dict[str, float | int | bool]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def ratio_ci(num: list[float], den: list[float], stat: str = "p50", confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0, paired: bool = True, block: int | None = None) -> RatioCI:
    """Interval of stat(num) / stat(den). Paired: rounds resampled jointly, in blocks of consecutive
    rounds, over the rounds both ran. Unpaired (numbers from another run): each side on its own."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    f = STATS[stat]
    if paired:
        n = min(len(a), len(b))
        if n < 2:
            raise ValueError(f"a paired ratio needs at least 2 common rounds, got {n}")
        a, b = a[:n], b[:n]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.log(a) - np.log(b)
        blk = auto_block_length(d) if block is None else block
        idx = _block_idx(n, _resamples(n, resamples), seed, blk)
        boot = f(a[idx]) / f(b[idx])
    else:
        if min(len(a), len(b)) < 2:
            raise ValueError("a ratio needs at least 2 samples on each side")
        n = min(len(a), len(b))
        with np.errstate(divide="ignore", invalid="ignore"):
            blk = max(auto_block_length(np.log(a)), auto_block_length(np.log(b))) if block is None else block
        k = _resamples(max(len(a), len(b)), resamples)
        boot = f(a[_block_idx(len(a), k, seed, blk)]) / f(b[_block_idx(len(b), k, seed + 1, blk)])
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    logs = np.log(boot[np.isfinite(boot) & (boot > 0)])
    sd = float(logs.std(ddof=1)) if logs.size > 1 else math.inf
    mde = math.expm1((_z(confidence) + _Z_POWER) * sd) if math.isfinite(sd) else math.inf
    return RatioCI(float(f(a) / f(b)), float(lo), float(hi), n, blk, mde, paired)


def widen(r: RatioCI, aa_session: dict[str, float] | None, confidence: float = 0.95) -> RatioCI:
    """Add the between-session spread to a ratio's interval.

    Two sessions of one model can differ by a percent or so for the whole run (memory placement,
    thread placement): no resampling of rounds within the run can see that, so intervals of two
    sessions were overconfident. ``aa_session`` is the baseline timed in a second session
    alongside the first; its log offset d is one draw of that between-session difference. The
    interval's log half-widths are combined in quadrature with z * |d| (a one-draw estimate:
    rough, and conservative only on average)."""
    if not aa_session or not aa_session.get("ratio"):
        return r
    d = abs(math.log(aa_session["ratio"]))
    if d == 0:
        return r
    zd = _z(confidence) * d
    lo = r.ratio * math.exp(-math.hypot(math.log(r.ratio / r.low), zd))
    hi = r.ratio * math.exp(math.hypot(math.log(r.high / r.ratio), zd))
    from dataclasses import replace

    return replace(r, low=lo, high=hi, session=d)


def bootstrap_ratio(num: list[float], den: list[float], stat: str, confidence: float = 0.95,
                    resamples: int = 2000, seed: int = 0, paired: bool = True) -> tuple[float, float, float]:
    """(point, low, high) of stat(num) / stat(den); see :func:`ratio_ci`."""
    r = ratio_ci(num, den, stat, confidence, resamples, seed, paired)
    return r.ratio, r.low, r.high


def split_half_aa(samples: list[float], stat: str = "p50", confidence: float = 0.95, resamples: int = 2000,
                  seed: int = 0) -> RatioCI | None:
    """The machine's noise as an A/A comparison: a candidate's odd rounds against its even rounds
    (pairs of neighbouring rounds). Its interval should hold 1; its width is the noise floor.
    Same session on both sides, so it misses between-session differences (memory placement)."""
    a = np.asarray(samples, dtype=np.float64)
    n = len(a) // 2
    if n < 4:
        return None
    return ratio_ci(list(a[1:2 * n:2]), list(a[0:2 * n:2]), stat, confidence, resamples, seed)


def describe_ratio(r: RatioCI | None, identical: bool = False) -> str:
    """How a latency ratio (candidate / reference) reads to a user, as a speed-up with its interval."""
    if identical or r is None:
        return "identical build (same digest)"
    up, lo, hi = 1 / r.ratio, 1 / r.high, 1 / r.low
    if r.low <= 1.0 <= r.high:
        return f"no measurable difference [{lo:.2f}x, {hi:.2f}x]"
    if r.low > 1.0:
        return f"{up:.2f}x SLOWER [{lo:.2f}x, {hi:.2f}x]"
    return f"{up:.2f}x faster [{lo:.2f}x, {hi:.2f}x]"


def ratio_verdict(r: RatioCI) -> str:
    if r.low <= 1.0 <= r.high:
        return "no measurable difference"
    return "slower" if r.low > 1.0 else "faster"


def verdict(lo: float, hi: float, limit: float) -> str:
    """pass when the whole interval is within the limit, fail when all of it is beyond, else inconclusive."""
    if hi <= limit:
        return "pass"
    if lo > limit:
        return "fail"
    return "inconclusive"
