"""What a report's figures and summary show, decided once for every renderer (pareto.png, report.html).

A renderer asks here for the points of a plot (one per measured cell: its p50 with the p50's 95%
interval, its quality, its size, its verdict against the baseline), for the quality axis (top-1 when
the data has labels, else the fidelity headline), for axis limits that never collapse onto one line,
for the Pareto front, and for the summary verdict (the fastest cell that keeps quality within the
user's constraint). Only the drawing differs between the PNG and the HTML.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field

from ..measuring.compare import clock, compare
from .report_schema import IdenticalRatio, MeasuredRatio, NoRatio, Report, ResultCell, parse_latency_key

# The variant `compress check` re-times from a stored baseline, and the A/A copy of the baseline: neither
# is a candidate the summary can recommend.
_NOT_CANDIDATES = ("recorded", "baseline~aa")


@dataclass(frozen=True)
class Quality:
    """The y axis: top-1 accuracy when measured, else the fidelity headline figure."""

    label: str
    unit: str  # "%" or "dB"
    percent: bool  # values are percentages (never above 100)
    kind: str  # "top-1" | "agreement" | "cosine_mean" | "snr_db" | "none"

    def of(self, cell: ResultCell) -> float | None:
        if self.kind == "top-1":
            return None if cell.accuracy_top1 is None else 100 * cell.accuracy_top1
        fid = cell.fidelity
        if fid is None or self.kind == "none":
            return None
        v = getattr(fid, self.kind, None)
        if v is None:
            return None
        return float(v) if self.kind == "snr_db" else 100 * float(v)


def quality_axis(report: Report) -> Quality:
    if any(r.accuracy_top1 is not None for r in report.results):
        return Quality("top-1 accuracy (%)", "%", True, "top-1")
    heads = [r.fidelity.headline for r in report.results if r.fidelity is not None]
    if not heads:
        return Quality("quality not measured", "", False, "none")
    head = max(set(heads), key=heads.count)
    if head == "snr_db":
        return Quality("fidelity to the original: SNR (dB)", "dB", False, "snr_db")
    what = "top-1 agreement" if head == "agreement" else "per-sample cosine x 100"
    return Quality(f"fidelity to the original: {what} (%)", "%", True, head)


@dataclass(frozen=True)
class CellPoint:
    """One measured cell at one latency key (batch, or batch/sequence length)."""

    variant: str
    target: str
    p50: float
    low: float  # the p50's 95% interval (equal to p50 where the report has none)
    high: float
    quality: float | None
    size: int | None
    baseline: bool
    ratio: MeasuredRatio | IdenticalRatio | NoRatio | None
    on_device: str | None = None

    @property
    def label(self) -> str:
        return f"{self.variant} / {self.target}"

    @property
    def slower(self) -> bool:
        """The paired ratio to the baseline says slower (its whole interval above 1)."""
        return isinstance(self.ratio, MeasuredRatio) and self.ratio.verdict == "slower"

    @property
    def flag(self) -> str | None:
        if not self.slower:
            return None
        assert isinstance(self.ratio, MeasuredRatio)
        return f"{1 / self.ratio.ratio:.2f}x SLOWER"  # as the tables say it: speed-up < 1


def key_text(key: str) -> str:
    """How a latency key reads: "batch 1", "batch 1, seq 128"."""
    b, s = parse_latency_key(key)
    return f"batch {b}" + (f", seq {s}" if s is not None else "")


def latency_keys(report: Report) -> list[str]:
    """Every latency key measured (the recipe's batch sizes first, then other sequence lengths), in order."""
    keys = list(report.batches)
    for r in report.results:
        keys += [k for k in r.latency if k not in keys]
    return [k for k in keys if any(k in r.latency for r in report.results)]


def p50_with_interval(cell: ResultCell, key: str) -> tuple[float, float, float] | None:
    """p50 and its 95% interval, on the clock the cell's figures use (a remote device's own clock)."""
    ck = clock(cell, key)
    if ck is None:
        return None
    p = float(ck.stats.p50_ms)
    if ck.device is not None:
        return p, p, p
    ci = cell.latency[key].p50_ci
    lo, hi = ci if ci is not None else (p, p)
    return p, min(lo, p), max(hi, p)


def cell_points(report: Report, key: str, quality: Quality | None = None) -> list[CellPoint]:
    q = quality or quality_axis(report)
    out = []
    for r in report.results:
        if r.status != "ok" or r.variant == "baseline~aa":
            continue
        p = p50_with_interval(r, key)
        if p is None:
            continue
        out.append(CellPoint(r.variant, r.target, p[0], p[1], p[2], q.of(r), r.size_bytes, r.variant == "baseline",
                             r.ratio_to_baseline.get(key), r.device))
    return out


def fit_limits(values: list[float], percent: bool = False, pad: float = 0.08,
               min_span: float | None = None) -> tuple[float, float]:
    """Axis limits around ``values`` with a margin; never a zero span (all values equal gets a span of its
    own: 1 point for percentages, 10% of the value otherwise), and percentages never above 100.5."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    span = hi - lo
    floor = min_span if min_span is not None else (1.0 if percent else max(abs(hi) * 0.1, 1e-9))
    if span < floor:
        mid = (lo + hi) / 2
        lo, hi, span = mid - floor / 2, mid + floor / 2, floor
    lo, hi = lo - pad * span, hi + pad * span
    if percent and hi > 100.5:
        lo, hi = lo - (hi - 100.5), 100.5
    return lo, hi


def use_log(values: list[float], spread: float = 8.0) -> bool:
    """A log axis when the positive values span more than ``spread`` times (torch vs a compiled target)."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return len(pos) >= 2 and max(pos) / min(pos) > spread


def pareto_front(xy: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), by ascending x."""
    order = sorted(range(len(xy)), key=lambda i: (xy[i][0], -xy[i][1]))
    front: list[int] = []
    for i in order:
        if not front or xy[i][1] > xy[front[-1]][1]:
            front.append(i)
    return front


# ----------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Constraints:
    """What the user asks of a recommended cell: top-1 within ``max_accuracy_drop`` points of the original on
    the same target; without labels, fidelity at least ``min_fidelity`` (agreement or cosine) or ``min_snr_db``."""

    max_accuracy_drop: float = 1.0
    min_fidelity: float = 0.99
    min_snr_db: float = 30.0
    source: str = "default"

    @classmethod
    def from_report(cls, report: Report) -> Constraints:
        """The recipe's own limit where a pass sets one (quantize.int8's max_accuracy_drop), else the defaults."""
        try:
            rec = tomllib.loads(report.recipe.toml) if report.recipe.toml else {}
        except tomllib.TOMLDecodeError:
            rec = {}
        drops = [p["max_accuracy_drop"] for p in rec.get("passes", []) if isinstance(p, dict)
                 and isinstance(p.get("max_accuracy_drop"), (int, float))]
        if drops:
            return cls(max_accuracy_drop=100 * min(drops), source="the recipe's max_accuracy_drop")
        return cls()

    def text(self, q: Quality) -> str:
        if q.kind == "top-1":
            pts = "point" if self.max_accuracy_drop == 1 else "points"
            return f"top-1 within {self.max_accuracy_drop:g} {pts} of the original on the same target"
        if q.kind == "snr_db":
            return f"fidelity SNR at least {self.min_snr_db:g} dB"
        if q.kind == "none":
            return "no quality measured: latency alone"
        return f"fidelity ({q.kind.replace('_', ' ')}) at least {100 * self.min_fidelity:g}%"


@dataclass
class Summary:
    key: str
    constraint: str
    best: CellPoint | None
    same_target: str | None  # the best cell's ratio to the original on its own target, as the report states it
    vs_reference: str | None  # the best cell against the original on each other target (paired here)
    quality_text: str | None
    excluded: list[str] = field(default_factory=list)  # cells ruled out by the constraint, with why
    slower: list[str] = field(default_factory=list)

    def sentence(self) -> str:
        where = key_text(self.key)
        if self.best is None:
            return f"Nothing measured meets the constraint ({self.constraint}) at {where}."
        b = self.best
        if b.baseline:
            s = (f"At {where} no compressed model beats the original: the fastest that meets the constraint is the "
                 f"original on {b.target}, p50 {b.p50:.4g} ms")
        else:
            s = f"At {where}, {b.label} is the fastest that meets the constraint: p50 {b.p50:.4g} ms"
        if b.low != b.high:
            s += f" [{b.low:.4g}, {b.high:.4g}]"
        if self.same_target and not b.baseline:
            s += f"; against the original on {b.target}: {self.same_target}"
        if self.vs_reference:
            s += f"; {self.vs_reference}"
        if self.quality_text:
            s += f"; {self.quality_text}"
        return s + "."


def _meets(c: CellPoint, base: CellPoint | None, q: Quality, con: Constraints) -> str | None:
    """None when the cell meets the constraint, else why not."""
    if q.kind == "none":
        return None
    if c.quality is None:
        return "quality not measured"
    if q.kind == "top-1":
        if base is None or base.quality is None:
            return "no original to compare top-1 with"
        drop = base.quality - c.quality
        return None if drop <= con.max_accuracy_drop + 1e-9 else f"top-1 drop {drop:.2f} points"
    if q.kind == "snr_db":
        return None if c.quality >= con.min_snr_db else f"SNR {c.quality:.1f} dB"
    return None if c.quality >= 100 * con.min_fidelity - 1e-9 else f"{q.kind} {c.quality:.2f}%"


def summarize(report: Report, key: str, constraints: Constraints | None = None) -> Summary:
    """The fastest compressed cell (or original, if none is faster) meeting the constraints at one latency key."""
    q = quality_axis(report)
    con = constraints or Constraints.from_report(report)
    pts = cell_points(report, key, q)
    bases = {p.target: p for p in pts if p.baseline}
    fallback = next(iter(bases.values()), None)
    ok: list[CellPoint] = []
    out = Summary(key, con.text(q), None, None, None, None)
    for p in pts:
        if p.variant in _NOT_CANDIDATES:
            continue
        why = None if p.baseline else _meets(p, bases.get(p.target, fallback), q, con)
        if why is not None:
            out.excluded.append(f"{p.label}: {why}")
            continue
        if p.slower:
            out.slower.append(f"{p.label}: {p.flag}")
        ok.append(p)
    if not ok:
        return out
    # Remote cells run on another device's clock: recommend among this machine's cells when there are any.
    local = [p for p in ok if p.on_device is None] or ok
    best = min(local, key=lambda p: p.p50)
    out.best = best
    if isinstance(best.ratio, (MeasuredRatio, IdenticalRatio, NoRatio)):
        out.same_target = best.ratio.text
    # The original as the user may run it now, on every other target (eager PyTorch among them), paired here.
    others = [t for p in bases.values() if p.target != best.target and (t := _paired(report, best, p, key))]
    out.vs_reference = "; ".join(others) or None
    base = bases.get(best.target, fallback)
    if best.quality is not None and base is not None and base.quality is not None and not best.baseline:
        out.quality_text = (f"{q.kind} {best.quality:.2f}{q.unit} vs {base.quality:.2f}{q.unit} for the original on "
                            f"{base.target}")
    return out


def _paired(report: Report, a: CellPoint, b: CellPoint, key: str) -> str | None:
    """a against b from the run's own samples (timed interleaved in the same rounds), with its interval."""
    ca, cb = report.cell(a.variant, a.target), report.cell(b.variant, b.target)
    if ca is None or cb is None or a.on_device is not None or b.on_device is not None:
        return None
    if key not in ca.latency or key not in cb.latency:
        return None
    r = compare(ca, cb, key, widen_by=None, what="the original")
    if isinstance(r, NoRatio):
        return None
    return f"against the original on {b.target}: {r.text}"
