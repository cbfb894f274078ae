"""The report's figures: pareto.png (quality against latency, or a causal LM's perplexity against decode
speed) and latency.png (p50 per backend, fastest first), with labels that never overlap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..measuring.compare import CellRef
from .report_schema import Report


def _place_labels(fig: Any, ax: Any, pts: list[tuple[float, float, str]]) -> list[tuple[float, float, float, float]]:
    """Annotate each point where its label overlaps no other label (nor marker), trying offsets in
    turn; returns the labels' boxes in display pixels (x0, y0, x1, y1)."""
    renderer = fig.canvas.get_renderer()
    offsets = [(7, 5), (7, -13), (-7, 5), (-7, -13), (7, 17), (-7, 17), (7, -25), (-7, -25), (0, 29), (0, -37),
               (7, 41), (-7, -49), (7, -61), (-7, 53)]
    placed: list[Any] = []
    markers = [ax.transData.transform((x, y)) for x, y, _ in pts]
    frame = ax.get_window_extent(renderer)
    boxes = []

    def hits(bb: Any) -> float:
        over = sum(max(0.0, min(bb.x1, o.x1) - max(bb.x0, o.x0)) * max(0.0, min(bb.y1, o.y1) - max(bb.y0, o.y0))
                   for o in placed)
        over += sum(1.0 for mx, my in markers if bb.x0 - 3 <= mx <= bb.x1 + 3 and bb.y0 - 3 <= my <= bb.y1 + 3)
        # A label cut off by the axes' edge (a point near the right end) is as bad as one on another label.
        over += 1e4 * (bb.x0 < frame.x0 or bb.x1 > frame.x1 or bb.y0 < frame.y0 or bb.y1 > frame.y1)
        return over

    for x, y, text in pts:
        best: tuple[float, Any] | None = None
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                              ha="left" if dx >= 0 else "right",
                              arrowprops=None if abs(dy) < 20 else {"arrowstyle": "-", "lw": 0.5, "color": "gray"})
            bb = ann.get_window_extent(renderer)
            cost = hits(bb)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        bb = best[1].get_window_extent(renderer)
        placed.append(bb)
        boxes.append((float(bb.x0), float(bb.y0), float(bb.x1), float(bb.y1)))
    return boxes


def _plot_generation(report: Report, path: Path) -> list[tuple[float, float, float, float]]:
    """A causal LM: perplexity on held-out text against decode tokens/s, with the speed's interval as bars."""
    import matplotlib.pyplot as plt

    rows = [r for r in report.results if r.generation is not None and r.generation.perplexity is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = {t: plt.cm.tab10(i) for i, t in enumerate(dict.fromkeys(r.target for r in rows))}  # type: ignore[attr-defined]
    pts = []
    for r in rows:
        g = r.generation
        assert g is not None and g.perplexity is not None
        x = g.decode_tokens_per_s or 0.0
        lo, hi = g.decode_tokens_per_s_low or x, g.decode_tokens_per_s_high or x
        ax.scatter(x, g.perplexity, marker="s" if r.variant == "baseline" else "o", s=55, edgecolors="black",
                   color=colors[r.target], zorder=2)
        ax.errorbar(x, g.perplexity, xerr=[[x - lo], [hi - x]], fmt="none", ecolor="black", capsize=5, zorder=3)
        pts.append((x, g.perplexity, f"{CellRef.of(r)}"))
    ys = [p[1] for p in pts]
    span = max(ys) - min(ys)
    ax.set_ylim(min(ys) - max(span * 0.15, 0.01 * max(ys)), max(ys) + max(span * 0.15, 0.01 * max(ys)))
    ax.set_xlabel("decode tokens/s, batch 1 (bars: 95% interval; higher is better)")
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    ax.set_title(f"{report.recipe.name}: perplexity vs decode speed (squares: original model)")
    ax.grid(alpha=0.3)
    boxes = _place_labels(fig, ax, pts)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return boxes


def plot_pareto(report: Report, path: Path) -> list[tuple[float, float, float, float]]:
    """Quality (top-1, or the fidelity headline) against p50 latency at the first batch size, with the p50's 95%
    interval as bars drawn over the markers, axes fitted to the points (a log latency axis when they span more
    than 8x; a quality axis that never collapses onto one line) and cells slower than their original ringed in
    red and labelled. The points, axes and verdicts come from ``compress.reporting.report_view``, as report.html's do.
    Returns the label boxes (tests check that none overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(r.generation is not None and r.generation.perplexity is not None for r in report.results):
        return _plot_generation(report, path)
    from .report_view import cell_points, fit_limits, pareto_front, quality_axis, use_log

    b0 = report.batches[0]
    q = quality_axis(report)
    pts = [p for p in cell_points(report, b0, q) if p.quality is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = {t: plt.cm.tab10(i) for i, t in enumerate(dict.fromkeys(p.target for p in pts))}  # type: ignore[attr-defined]
    for p in pts:
        assert p.quality is not None
        ax.scatter(p.p50, p.quality, marker="s" if p.baseline else "o", s=55, edgecolors="black",
                   color=colors[p.target], zorder=2, alpha=0.55 if p.baseline else 0.9)
        # Over the marker, black, with caps: a narrow interval still shows beside the marker's edge.
        ax.errorbar(p.p50, p.quality, xerr=[[p.p50 - p.low], [p.high - p.p50]], fmt="none", ecolor="black",
                    elinewidth=1.4, capsize=5, capthick=1.4, zorder=3)
        if p.slower:
            ax.scatter(p.p50, p.quality, marker="o", s=260, facecolors="none", edgecolors="tab:red", linewidths=2,
                       zorder=4)
    xs = [x for p in pts for x in (p.low, p.high)]
    if use_log(xs):
        ax.set_xscale("log")
        lo, hi = min(xs), max(xs)
        f = (hi / lo) ** 0.1
        ax.set_xlim(lo / f, hi * f)
    elif xs:
        lo, hi = min(xs), max(xs)
        pad = 0.12 * ((hi - lo) or hi or 1.0)
        ax.set_xlim(max(0.0, lo - pad), hi + pad)
    if pts:
        ax.set_ylim(*fit_limits([p.quality for p in pts if p.quality is not None], q.percent, pad=0.15))
    front = [pts[i] for i in pareto_front([(p.p50, p.quality or 0.0) for p in pts])]
    if len(front) > 1:
        ax.plot([p.p50 for p in front], [p.quality or 0.0 for p in front], "--", color="tab:orange", zorder=1,
                label="Pareto front")
    if any(p.slower for p in pts):
        ax.scatter([], [], marker="o", s=120, facecolors="none", edgecolors="tab:red", linewidths=2,
                   label="slower than the original (paired 95% interval)")
    if len(front) > 1 or any(p.slower for p in pts):
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(f"p50 latency, batch {b0} (ms; bars: 95% interval{'; log scale' if use_log(xs) else ''})")
    ax.set_ylabel(q.label)
    ax.set_title(f"{report.recipe.name}: {q.kind} vs latency (squares: original model)")
    ax.grid(alpha=0.3, which="both")
    if not pts:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    boxes = _place_labels(fig, ax, [(p.p50, p.quality or 0.0, p.label + (f" ({p.flag})" if p.flag else ""))
                                    for p in pts])
    fig.savefig(path, format="png")
    plt.close(fig)
    return boxes


def plot_latency(report: Report, path: Path) -> None:
    """p50 latency per backend (and variant) at each batch size, fastest first, with the p50's 95% interval
    as error bars: which backend is fastest here, and how sure the run is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .ranking import ranking

    per_batch = {b: ranking(report, b) for b in report.batches}
    per_batch = {b: r for b, r in per_batch.items() if r}
    fig, axes = plt.subplots(1, max(1, len(per_batch)), figsize=(5 + 3 * max(0, len(per_batch) - 1), 4.5), dpi=110,
                             squeeze=False)
    for ax, (b, rows) in zip(axes[0], per_batch.items(), strict=False):
        names = [f"{CellRef.of(r)}" for r in rows]
        p50 = [r.p50_ms for r in rows]
        lo = [max(0.0, r.p50_ms - (r.p50_ci or (r.p50_ms, r.p50_ms))[0]) for r in rows]
        hi = [max(0.0, (r.p50_ci or (r.p50_ms, r.p50_ms))[1] - r.p50_ms) for r in rows]
        ax.barh(range(len(rows)), p50, xerr=[lo, hi], capsize=3, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()  # fastest on top
        ax.set_xlabel(f"p50 latency, batch {b} (ms; bars: 95% interval)")
        ax.grid(axis="x", alpha=0.3)
    if not per_batch:
        axes[0][0].text(0.5, 0.5, "nothing measured", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"{report.recipe.name}: latency per backend, fastest first")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
