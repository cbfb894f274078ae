"""Which backend (and precision) is fastest here: every measured cell at one batch size in one table,
ordered by p50, each with its p50 as a ratio to the fastest's and that ratio's 95% interval.

The ratios come from the same interleaved rounds (every candidate was timed in each round, in a shuffled
order), paired round by round with a block bootstrap (``compress.measuring.compare``), so a slow minute
shared by all candidates cancels out instead of reordering them. Two runs minutes apart can still
disagree by more than one run's noise; the interval says how sure this run is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..measuring.compare import clock, compare
from .report_schema import NoRatio, Report


@dataclass(frozen=True)
class Ranked:
    variant: str
    target: str
    p50_ms: float
    ratio: float  # p50 over the fastest's (1.0 for the fastest)
    low: float
    high: float
    p50_ci: tuple[float, float] | None

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.target}"


def ranking(report: Report, batch: str) -> list[Ranked]:
    """The cells timed at ``batch`` on this machine, fastest first (remote-device cells have another clock and
    stored baselines re-timed for the gate are not candidates: both are left out)."""
    cells = [r for r in report.results if r.status == "ok" and not r.reference and r.device is None
             and (ck := clock(r, batch)) is not None and len(ck.samples) >= 2]
    if not cells:
        return []
    cells.sort(key=lambda r: r.latency[batch].p50_ms)
    out = []
    for r in cells:
        # Against the fastest, paired over the rounds both ran, not widened (compress.measuring.compare decides it).
        ci = compare(r, cells[0], batch, widen_by=None, what="the fastest")
        if isinstance(ci, NoRatio):  # fewer than 2 common rounds: nothing to rank on
            continue
        out.append(Ranked(r.variant, r.target, r.latency[batch].p50_ms, ci.ratio, ci.low, ci.high,
                          r.latency[batch].p50_ci))
    return out


def ranking_lines(report: Report, name_baseline: str = "baseline") -> list[str]:
    """One ranked table per batch size, as text (the terminal and report.md share it)."""
    out: list[str] = []
    for b in report.batches:
        rows = ranking(report, b)
        if len(rows) < 2:
            continue
        out += [f"ranking at batch {b} (p50; ratio to the fastest, 95% interval from paired interleaved rounds):"]
        w = max(len(_name(r, name_baseline)) for r in rows)
        for i, r in enumerate(rows, 1):
            rel = "fastest" if i == 1 else f"{r.ratio:.2f}x [{r.low:.2f}x, {r.high:.2f}x]"
            if i > 1 and r.low <= 1.0:
                rel += " (no measurable difference from the fastest)"
            out.append(f"  {i}. {_name(r, name_baseline).ljust(w)}  {r.p50_ms:9.3f} ms  {rel}")
    return out


def _name(r: Ranked, baseline: str) -> str:
    return f"{baseline if r.variant == 'baseline' else r.variant}/{r.target}"
