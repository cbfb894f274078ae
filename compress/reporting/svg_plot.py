"""Small plots drawn as inline SVG text: scatter with interval bars, box plots, trend lines.

report.html must open without a network and without a plotting library's JavaScript, so its figures
are drawn here as SVG elements (well-formed XML: the tests parse each figure). Each element a reader
may want to inspect carries a ``<title>`` (a browser shows it on hover) and a class the tests look
for: ``point``, ``ci`` (an interval bar), ``flag`` (a marked verdict), ``front`` (the Pareto front).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
FLAG = "#d62728"
_CHAR_W = 6.1  # px per character at font-size 11 (sans-serif), for label placement


def _e(s: object) -> str:
    return escape(str(s), quote=True)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.4g}"
    return f"{v:.3g}"


def _size(v: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
        v /= 1024
    return str(v)


@dataclass(frozen=True)
class Axis:
    lo: float
    hi: float
    log: bool = False
    label: str = ""
    bytes: bool = False  # tick labels as sizes

    def norm(self, v: float) -> float:
        """0..1 along the axis."""
        if self.log:
            lo, hi, v = math.log10(self.lo), math.log10(self.hi), math.log10(max(v, self.lo * 1e-3))
        else:
            lo, hi = self.lo, self.hi
        return (v - lo) / (hi - lo) if hi > lo else 0.5

    def ticks(self) -> list[float]:
        if self.log:
            out = []
            for k in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1):
                out += [m * 10.0**k for m in (1, 2, 5) if self.lo <= m * 10.0**k <= self.hi]
            if len(out) >= 2:
                return out
            return Axis(self.lo, self.hi).ticks()
        span = self.hi - self.lo
        raw = span / 5
        mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]

    def tick_labels(self) -> list[tuple[float, str]]:
        """Ticks with labels that tell them apart (as few decimals as that takes)."""
        ts = self.ticks()
        if self.bytes:
            return [(t, _size(t)) for t in ts]
        if self.log or max((abs(t) for t in ts), default=0) >= 1000:
            return [(t, _fmt(t)) for t in ts]
        for n in range(7):
            labels = [f"{t:.{n}f}" for t in ts]
            if len(set(labels)) == len(labels):
                return list(zip(ts, labels, strict=True))
        return [(t, _fmt(t)) for t in ts]


def padded(lo: float, hi: float, log: bool, pad: float = 0.08) -> tuple[float, float]:
    """An axis range around [lo, hi] with a margin (multiplicative on a log axis); never zero-width."""
    if log:
        lo, hi = max(lo, 1e-12), max(hi, 1e-12)
        f = (hi / lo) ** pad if hi > lo else 1.5
        return lo / f, hi * f
    span = hi - lo or abs(hi) * 0.1 or 1.0
    return lo - pad * span, hi + pad * span


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    x_low: float | None = None
    x_high: float | None = None
    label: str = ""
    series: str = ""  # colour group (the target)
    square: bool = False  # the original model
    flag: str | None = None  # a verdict to mark (e.g. "0.79x SLOWER")
    title: str = ""  # shown on hover


class _Canvas:
    def __init__(self, width: int, height: int, title: str, left: int = 64, right: int = 16, top: int = 44,
                 bottom: int = 46) -> None:
        self.w, self.h = width, height
        self.x0, self.x1, self.y0, self.y1 = left, width - right, height - bottom, top
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
                      'font-family="sans-serif" font-size="11">',
                      f"<title>{_e(title)}</title>",
                      f'<rect x="{self.x0}" y="{self.y1}" width="{self.x1 - self.x0}" height="{self.y0 - self.y1}" '
                      'fill="#fcfcfc" stroke="#999"/>',
                      f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13">{_e(title)}</text>']

    def px(self, ax: Axis, v: float) -> float:
        return self.x0 + ax.norm(v) * (self.x1 - self.x0)

    def py(self, ay: Axis, v: float) -> float:
        return self.y0 - ay.norm(v) * (self.y0 - self.y1)

    def axes(self, ax: Axis | None, ay: Axis | None) -> None:
        p = self.parts
        if ax is not None:
            for t, text in ax.tick_labels():
                x = self.px(ax, t)
                p.append(f'<line x1="{x:.1f}" y1="{self.y1}" x2="{x:.1f}" y2="{self.y0}" stroke="#e4e4e4"/>')
                p.append(f'<text x="{x:.1f}" y="{self.y0 + 14}" text-anchor="middle">{_e(text)}</text>')
            p.append(f'<text x="{(self.x0 + self.x1) / 2:.0f}" y="{self.h - 8}" text-anchor="middle">'
                     f'{_e(ax.label)}{" (log scale)" if ax.log else ""}</text>')
        if ay is not None:
            for t, text in ay.tick_labels():
                y = self.py(ay, t)
                p.append(f'<line x1="{self.x0}" y1="{y:.1f}" x2="{self.x1}" y2="{y:.1f}" stroke="#e4e4e4"/>')
                p.append(f'<text x="{self.x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{_e(text)}</text>')
            p.append(f'<text transform="translate(13 {(self.y0 + self.y1) / 2:.0f}) rotate(-90)" '
                     f'text-anchor="middle">{_e(ay.label)}</text>')

    def legend(self, colors: dict[str, str], extra: Sequence[tuple[str, str]] = ()) -> None:
        x: float = self.x0 + 2
        y = self.y1 - 8  # above the plot area, below the title: never over a point or a label
        for name, c in colors.items():
            self.parts.append(f'<circle cx="{x + 4}" cy="{y - 4}" r="4" fill="{c}"/>'
                              f'<text x="{x + 12}" y="{y}">{_e(name)}</text>')
            x += 22 + _CHAR_W * len(name)
        for text, c in extra:
            self.parts.append(f'<text x="{x}" y="{y}" fill="{c}">{_e(text)}</text>')
            x += 12 + _CHAR_W * len(text)

    def done(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def colors_for(series: Sequence[str]) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(dict.fromkeys(series))}


def scatter(points: Sequence[Point], ax: Axis, ay: Axis, title: str, front: Sequence[int] = (),
            width: int = 860, height: int = 460) -> str:
    """Points with horizontal interval bars (drawn over the marker, with caps, so a narrow one still shows),
    squares for the originals, flagged verdicts ringed in red and named in the label, the front dashed."""
    c = _Canvas(width, height, title)
    c.axes(ax, ay)
    colors = colors_for([p.series for p in points])
    if len(front) > 1:
        xy = " ".join(f"{c.px(ax, points[i].x):.1f},{c.py(ay, points[i].y):.1f}" for i in front)
        c.parts.append(f'<polyline class="front" points="{xy}" fill="none" stroke="#ff7f0e" stroke-width="1.5" '
                       'stroke-dasharray="6 4"><title>Pareto front: no other point is both faster and better'
                       '</title></polyline>')
    boxes: list[tuple[float, float, float, float]] = []
    marks = [(c.px(ax, p.x), c.py(ay, p.y)) for p in points]
    for p, (x, y) in zip(points, marks, strict=True):
        col = colors[p.series]
        g = [f'<g class="point"><title>{_e(p.title or p.label)}</title>']
        shape = (f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="{col}" fill-opacity="0.55" '
                 f'stroke="#222"/>' if p.square else
                 f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{col}" stroke="#222"/>')
        g.append(shape)
        if p.x_low is not None and p.x_high is not None and p.x_high > p.x_low:
            a, b = c.px(ax, p.x_low), c.px(ax, p.x_high)
            g.append(f'<g class="ci" stroke="#111" stroke-width="1.6"><line x1="{a:.1f}" y1="{y:.1f}" x2="{b:.1f}" '
                     f'y2="{y:.1f}"/><line x1="{a:.1f}" y1="{y - 5:.1f}" x2="{a:.1f}" y2="{y + 5:.1f}"/>'
                     f'<line x1="{b:.1f}" y1="{y - 5:.1f}" x2="{b:.1f}" y2="{y + 5:.1f}"/></g>')
        if p.flag:
            g.append(f'<circle class="flag" cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="{FLAG}" '
                     'stroke-width="2.5"/>')
        g.append("</g>")
        c.parts.append("".join(g))
        text = p.label + (f" ({p.flag})" if p.flag else "")
        bx, by, anchor = _place(text, x, y, boxes, marks, c)
        fill = FLAG if p.flag else "#222"
        c.parts.append(f'<text class="label" x="{bx:.1f}" y="{by:.1f}" text-anchor="{anchor}" fill="{fill}">'
                       f"{_e(text)}</text>")
    c.legend(colors, [("squares: original", "#444"), ("bars: 95% interval", "#444")]
             + ([("red ring: slower than original", FLAG)] if any(p.flag for p in points) else []))
    if not points:
        c.parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">nothing measured</text>')
    return c.done()


def _place(text: str, x: float, y: float, boxes: list[tuple[float, float, float, float]],
           marks: list[tuple[float, float]], c: _Canvas) -> tuple[float, float, str]:
    """A label position beside (x, y) overlapping no placed label and no marker, as far as one exists."""
    w, h = _CHAR_W * len(text), 12.0
    best: tuple[float, tuple[float, float, float, float], tuple[float, float, str]] | None = None
    for dx, dy in ((10, -8), (10, 14), (-10, -8), (-10, 14), (10, -22), (-10, 28), (10, 28), (-10, -22),
                   (10, -36), (10, 42), (-10, 42), (-10, -36)):
        anchor = "start" if dx > 0 else "end"
        x0 = x + dx if dx > 0 else x + dx - w
        box = (x0, y + dy - h + 2, x0 + w, y + dy + 2)
        cost = sum(max(0.0, min(box[2], o[2]) - max(box[0], o[0])) * max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
                   for o in boxes)
        cost += sum(60.0 for mx, my in marks if box[0] - 6 <= mx <= box[2] + 6 and box[1] - 6 <= my <= box[3] + 6)
        cost += 200.0 * (box[0] < c.x0 or box[2] > c.x1 or box[1] < c.y1 or box[3] > c.y0)
        if best is None or cost < best[0]:
            best = (cost, box, (x + dx, y + dy, anchor))
        if cost == 0:
            break
    assert best is not None
    boxes.append(best[1])
    return best[2]


@dataclass(frozen=True)
class BoxRow:
    """One cell's latency samples: drawn as a box (quartiles), whiskers (p5..p95), median and a strip of samples."""

    label: str
    samples: Sequence[float]
    series: str = ""
    flag: str | None = None


def _q(s: Sequence[float], q: float) -> float:
    a = sorted(s)
    i = q * (len(a) - 1)
    lo = math.floor(i)
    hi = min(lo + 1, len(a) - 1)
    return a[lo] + (a[hi] - a[lo]) * (i - lo)


def boxes(rows: Sequence[BoxRow], x_label: str, title: str, width: int = 860, max_dots: int = 200) -> str:
    rows = [r for r in rows if len(r.samples) > 0]
    longest = max((len(r.label) + (len(r.flag) + 3 if r.flag else 0) for r in rows), default=8)
    left = int(min(340, max(90, 12 + _CHAR_W * longest)))
    height = 76 + 30 * max(len(rows), 1)
    c = _Canvas(width, height, title, left=left)
    vals = [v for r in rows for v in r.samples if v > 0]
    log = bool(vals) and max(vals) / min(vals) > 8
    lo, hi = padded(min(vals, default=0.0), max(vals, default=1.0), log, 0.04)
    ax = Axis(lo, hi, log, x_label)
    c.axes(ax, None)
    colors = colors_for([r.series for r in rows])
    for i, r in enumerate(rows):
        y = c.y1 + 15 + 30 * i
        col = colors[r.series]
        q05, q25, q50, q75, q95 = (_q(r.samples, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95))
        step = max(1, len(r.samples) // max_dots)
        dots = "".join(f'<circle cx="{c.px(ax, v):.1f}" cy="{y + 8 + 5 * ((k * 7919) % 5 - 2) / 2:.1f}" r="1.3"/>'
                       for k, v in enumerate(r.samples[::step]))
        fill = FLAG if r.flag else "#222"
        c.parts.append(
            f'<g class="box"><title>{_e(r.label)}: p5 {q05:.4g}, p25 {q25:.4g}, p50 {q50:.4g}, p75 {q75:.4g}, '
            f'p95 {q95:.4g} ms; {len(r.samples)} samples</title>'
            f'<line x1="{c.px(ax, q05):.1f}" y1="{y}" x2="{c.px(ax, q95):.1f}" y2="{y}" stroke="#444"/>'
            f'<rect x="{c.px(ax, q25):.1f}" y="{y - 6}" width="{max(1.0, c.px(ax, q75) - c.px(ax, q25)):.1f}" '
            f'height="12" fill="{col}" fill-opacity="0.5" stroke="#222"/>'
            f'<line x1="{c.px(ax, q50):.1f}" y1="{y - 7}" x2="{c.px(ax, q50):.1f}" y2="{y + 7}" stroke="#000" '
            f'stroke-width="2"/><g fill="{col}" fill-opacity="0.6">{dots}</g></g>'
            f'<text x="{c.x0 - 6}" y="{y + 4}" text-anchor="end" fill="{fill}">{_e(r.label)}'
            f'{_e(" (" + r.flag + ")") if r.flag else ""}</text>')
    return c.done()


@dataclass(frozen=True)
class Series:
    """One figure over time: values with optional intervals, and the indices of marked change points."""

    name: str
    values: Sequence[float]
    lows: Sequence[float | None] = ()
    highs: Sequence[float | None] = ()
    ticks: Sequence[str] = ()  # one x label per value (a commit)
    changes: Sequence[int] = ()


def trend(s: Series, y_label: str, title: str, width: int = 680, height: int = 260) -> str:
    """A figure across commits: a line, interval bars, change points as red dashed verticals."""
    c = _Canvas(width, height, title)
    n = len(s.values)
    ax = Axis(-0.5, max(n - 0.5, 0.5), False, "record (oldest left)")
    ys = [v for v in (*s.values, *(x for x in s.lows if x is not None), *(x for x in s.highs if x is not None))]
    lo, hi = padded(min(ys, default=0.0), max(ys, default=1.0), False)
    ay = Axis(lo, hi, False, y_label)
    c.axes(None, ay)
    every = max(1, n // 10)
    for i, t in enumerate(s.ticks):
        if i % every == 0:
            c.parts.append(f'<text x="{c.px(ax, i):.1f}" y="{c.y0 + 14}" text-anchor="middle">{_e(t)}</text>')
    for i in s.changes:
        x = (c.px(ax, i - 1) + c.px(ax, i)) / 2
        c.parts.append(f'<line class="flag" x1="{x:.1f}" y1="{c.y1}" x2="{x:.1f}" y2="{c.y0}" stroke="{FLAG}" '
                       f'stroke-dasharray="4 3" stroke-width="1.5"><title>change point before record {i + 1}'
                       '</title></line>')
    pts = " ".join(f"{c.px(ax, i):.1f},{c.py(ay, v):.1f}" for i, v in enumerate(s.values))
    c.parts.append(f'<polyline points="{pts}" fill="none" stroke="{PALETTE[0]}" stroke-width="1.5"/>')
    for i, v in enumerate(s.values):
        lo_i = s.lows[i] if i < len(s.lows) else None
        hi_i = s.highs[i] if i < len(s.highs) else None
        x = c.px(ax, i)
        if lo_i is not None and hi_i is not None:
            c.parts.append(f'<line class="ci" x1="{x:.1f}" y1="{c.py(ay, lo_i):.1f}" x2="{x:.1f}" '
                           f'y2="{c.py(ay, hi_i):.1f}" stroke="#111"/>')
        c.parts.append(f'<circle class="point" cx="{x:.1f}" cy="{c.py(ay, v):.1f}" r="3" fill="{PALETTE[0]}">'
                       f"<title>{_e(s.ticks[i] if i < len(s.ticks) else i)}: {_fmt(v)}</title></circle>")
    return c.done()
