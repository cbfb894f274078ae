"""Which backend (and precision) is fastest here: every measured cell at one batch size in one table,
ordered by p50, each with its p50 as a ratio to the fastest's and that ratio's 95% interval.

The ratios come from the same interleaved rounds (every candidate was timed in each round, in a shuffled
order), paired round by round with a block bootstrap (``compress.measuring.stats.ratio_ci``), so a slow minute
shared by all candidates cancels out instead of reordering them. Two runs minutes apart can still
disagree by more than one run's noise; the interval says how sure this run is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..measuring.stats import ratio_ci
from .report_schema import Report


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
             and batch in r.latency and len(r.latency[batch].samples_ms) >= 2]
    if not cells:
        return []
    cells.sort(key=lambda r: r.latency[batch].p50_ms)
    best = cells[0].latency[batch].samples_ms
    out = []
    for r in cells:
        lat = r.latency[batch]
        if r is cells[0]:
            ratio, low, high = 1.0, 1.0, 1.0
        else:
            ci = ratio_ci(lat.samples_ms, best, "p50")
            ratio, low, high = ci.ratio, ci.low, ci.high
        out.append(Ranked(r.variant, r.target, lat.p50_ms, ratio, low, high, lat.p50_ci))
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
