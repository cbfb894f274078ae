"""report.html: the run's report as one self-contained page a person opens first.

Rendered from the typed report (``compress.reporting.report_schema.Report``) alone, so ``report.json`` of any run
can be re-rendered (``python -m compress.reporting.report_html runs/NAME/report.json``). The page needs no network
and no script: figures are inline SVG (``compress.reporting.svg_plot``), and the batch-size selectors are radio
buttons styled with CSS. Sections, in order: the summary verdict, the Pareto plot (latency per batch
size, size as a second view), extra figures (any other fidelity figure, e.g. a perplexity, against
latency), latency distributions per cell, the results, fidelity and parity tables, each variant's
lineage, then notes, noise and the machine.

A new kind of figure is one more function in :data:`SECTIONS` (``(report, view) -> html | None``);
:func:`figure_section` builds the usual "figure per latency key" body for it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from ..measuring.compare import shown_samples
from . import svg_plot as sp
from .report_schema import Fidelity, Report
from .report_view import (
    CellPoint,
    Constraints,
    Quality,
    cell_points,
    fit_limits,
    key_text,
    latency_keys,
    pareto_front,
    quality_axis,
    summarize,
    use_log,
)


def _e(s: object) -> str:
    return escape(str(s), quote=True)


@dataclass
class View:
    """What every section shares: the quality axis, the latency keys, the constraints, unique ids."""

    report: Report
    quality: Quality
    keys: list[str]
    constraints: Constraints
    _ids: dict[str, int] = field(default_factory=dict)
    css: list[str] = field(default_factory=list)

    def uid(self, stem: str) -> str:
        n = self._ids.get(stem, 0)
        self._ids[stem] = n + 1
        return f"{stem}{n}"


def tabs(view: View, stem: str, panes: Sequence[tuple[str, str]]) -> str:
    """Panes switched by radio buttons (CSS only: the page has no script); the first is shown."""
    if len(panes) == 1:
        return f'<div class="pane-one">{panes[0][1]}</div>'
    g = view.uid(stem)
    inputs, bodies = [], []
    for i, (label, body) in enumerate(panes):
        inputs.append(f'<input type="radio" name="{g}" id="{g}-{i}"{" checked" if i == 0 else ""}>'
                      f'<label for="{g}-{i}">{_e(label)}</label>')
        bodies.append(f'<div class="pane {g}-p{i}">{body}</div>')
        view.css.append(f"#{g}-{i}:checked ~ .{g}-p{i} {{ display: block; }}")
    return f'<div class="tabs">{"".join(inputs)}{"".join(bodies)}</div>'


def table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")  # cells: already-escaped html
    out.append("</tbody></table>")
    return "".join(out)


# --------------------------------------------------------------------------------------------- sections


def section_summary(report: Report, v: View) -> str | None:
    items = []
    for key in v.keys:
        s = summarize(report, key, v.constraints)
        extra = ""
        if s.slower:
            extra += '<div class="slower">Slower than the original: ' + _e("; ".join(s.slower)) + "</div>"
        if s.excluded:
            extra += '<div class="muted">Ruled out by the constraint: ' + _e("; ".join(s.excluded)) + "</div>"
        items.append(f'<li><span class="verdict">{_e(s.sentence())}</span>{extra}</li>')
    if not v.keys:
        why = "; ".join(f"{r.variant} / {r.target}: {r.status}: {r.reason}" for r in report.results if r.status != "ok")
        items.append(f'<li><span class="verdict slower">Nothing was measured.</span> {_e(why)}</li>')
    src = v.constraints.source
    warn = [n for n in report.notes if n.startswith("WARNING")]
    w = ('<ul class="warn">' + "".join(f"<li>{_e(n)}</li>" for n in warn) + "</ul>") if warn else ""
    return (f'<ul class="summary">{"".join(items)}</ul><p class="muted">Constraint: '
            f"{_e(v.constraints.text(v.quality))} ({_e(src)}). Intervals are 95%; ratios are paired over the "
            f"run's interleaved rounds.</p>{w}")


def _pareto_svg(report: Report, v: View, key: str, by_size: bool = False) -> str:
    pts = [p for p in cell_points(report, key, v.quality) if p.quality is not None or v.quality.kind == "none"]
    if by_size:
        pts = [p for p in pts if p.size is not None]
    xs = [float(p.size or 0) if by_size else p.p50 for p in pts]
    ys = [p.quality if p.quality is not None else 0.0 for p in pts]
    log = use_log(xs)
    spans = xs + ([] if by_size else [p.low for p in pts] + [p.high for p in pts])
    xlo, xhi = sp.padded(min(spans, default=0.0), max(spans, default=1.0), log)
    if not log:
        xlo = max(0.0, xlo)
    ylo, yhi = fit_limits(ys, v.quality.percent)
    ax = sp.Axis(xlo, xhi, log, "size of the deployed model" if by_size else f"p50 latency, {key_text(key)} (ms)",
                 bytes=by_size)
    ay = sp.Axis(ylo, yhi, False, v.quality.label)
    points = []
    for p, x, y in zip(pts, xs, ys, strict=True):
        tip = (f"{p.label}: p50 {p.p50:.4g} ms [{p.low:.4g}, {p.high:.4g}] at {key_text(key)}; "
               f"{v.quality.kind} {y:.2f}{v.quality.unit}; size {sp._size(p.size) if p.size else '-'}"
               + (f"; vs original: {p.ratio.text}" if p.ratio is not None else ""))
        points.append(sp.Point(x, y, None if by_size else p.low, None if by_size else p.high, p.label, p.target,
                               p.baseline, p.flag, tip))
    front = pareto_front([(x, y) for x, y in zip(xs, ys, strict=True)])
    what = "size" if by_size else f"latency at {key_text(key)}"
    return sp.scatter(points, ax, ay, f"{report.recipe.name}: {v.quality.kind} vs {what}", front)


def section_pareto(report: Report, v: View) -> str | None:
    panes = [(key_text(k), _pareto_svg(report, v, k)) for k in v.keys]
    panes.append(("size", _pareto_svg(report, v, v.keys[0] if v.keys else "1", by_size=True)))
    return ("<p>Each point is one model on one target; squares are the original model, bars the p50's 95% "
            "interval, the dashed line the Pareto front (nothing else is both faster and better). Pick a batch "
            "size, or size as the other axis.</p>" + tabs(v, "pareto", panes))


def figure_section(v: View, stem: str, draw: Callable[[str], str | None]) -> str | None:
    """A figure per latency key (batch size) with the selector; None when no key drew anything."""
    panes = [(key_text(k), svg) for k in v.keys if (svg := draw(k)) is not None]
    return tabs(v, stem, panes) if panes else None


def extra_figures(report: Report) -> list[str]:
    """Fidelity figures other than the headline that some cell has: the recipe's measure.metric (a perplexity,
    a recall) and numeric fidelity fields other writers add, by name; plotted against latency."""
    names: dict[str, None] = {}
    skip = {"cosine", "max_abs_diff", "mean_abs_diff", "agreement", "cosine_mean", "snr_db"}
    for r in report.results:
        f = r.fidelity
        if f is None:
            continue
        for k in (f.metric or {}):
            names[f"metric.{k}"] = None
        for k, val in f.model_dump(exclude_none=True).items():
            if k not in skip and isinstance(val, (int, float)) and not isinstance(val, bool) \
                    and ("perplex" in k or k not in Fidelity.model_fields):
                names[k] = None
    return list(names)


def _figure_value(f: Fidelity | None, name: str) -> float | None:
    if f is None:
        return None
    if name.startswith("metric."):
        val = (f.metric or {}).get(name[7:])
    else:
        val = f.model_dump().get(name)
    return float(val) if isinstance(val, (int, float)) and math.isfinite(float(val)) else None


def section_figures(report: Report, v: View) -> str | None:
    names = extra_figures(report)
    if not names:
        return None
    out = []
    for name in names:
        def draw(key: str, name: str = name) -> str | None:
            pts: list[tuple[CellPoint, float]] = []
            for p in cell_points(report, key, v.quality):
                c = report.cell(p.variant, p.target)
                y = _figure_value(c.fidelity if c is not None else None, name)
                if y is not None:
                    pts.append((p, y))
            if not pts:
                return None
            xs = [p.p50 for p, _ in pts] + [p.low for p, _ in pts] + [p.high for p, _ in pts]
            log = use_log(xs)
            xlo, xhi = sp.padded(min(xs), max(xs), log)
            ylo, yhi = fit_limits([y for _, y in pts])
            points = [sp.Point(p.p50, y, p.low, p.high, p.label, p.target, p.baseline, p.flag,
                               f"{p.label}: {name} {y:.4g}; p50 {p.p50:.4g} ms") for p, y in pts]
            lower_better = "perplex" in name or "error" in name or "loss" in name
            front = pareto_front([(p.p50, -y if lower_better else y) for p, y in pts])
            return sp.scatter(points, sp.Axis(xlo if log else max(0.0, xlo), xhi, log,
                                              f"p50 latency, {key_text(key)} (ms)"),
                              sp.Axis(ylo, yhi, False, name + (" (lower is better)" if lower_better else "")),
                              f"{name} vs latency at {key_text(key)}", front)

        body = figure_section(v, "fig", draw)
        if body:
            out.append(f"<h3>{_e(name)}</h3>{body}")
    return "".join(out) or None


def section_latency(report: Report, v: View) -> str | None:
    def draw(key: str) -> str | None:
        pts = {(p.variant, p.target): p for p in cell_points(report, key, v.quality)}
        rows = []
        for r in report.results:
            p = pts.get((r.variant, r.target))
            lat = r.latency.get(key)
            if p is None or lat is None:
                continue
            rows.append(sp.BoxRow(p.label, shown_samples(r, key), r.target, p.flag))
        if not rows:
            return None
        return sp.boxes(rows, f"latency per call, {key_text(key)} (ms)", f"latency distribution, {key_text(key)}")

    body = figure_section(v, "lat", draw)
    if body is None:
        return None
    return ("<p>Every timed call: the box holds the middle half, the whiskers p5 to p95, the bar the median; "
            "dots are the calls themselves (a sample of them).</p>" + body)


def section_results(report: Report, v: View) -> str | None:
    from .report_tables import table_rows

    head, rows = table_rows(report)
    html_rows = [[(f'<span class="slower">{_e(c)}</span>' if "SLOWER" in c else _e(c)) for c in row] for row in rows]
    return table(head, html_rows, "results")


def section_fidelity(report: Report, v: View) -> str | None:
    cells = [r for r in report.results if r.fidelity is not None]
    if not cells:
        return None
    keys: dict[str, None] = {}
    for r in cells:
        assert r.fidelity is not None
        for k in r.fidelity.model_dump(exclude_none=True):
            if k not in ("kind", "headline", "metric"):
                keys[k] = None
        for k in r.fidelity.metric or {}:
            keys[f"metric.{k}"] = None
    head = ["variant", "target", "kind", *keys]
    rows = []
    for r in cells:
        f = r.fidelity
        assert f is not None
        d = f.model_dump(exclude_none=True)
        vals = []
        for k in keys:
            x = (f.metric or {}).get(k[7:]) if k.startswith("metric.") else d.get(k)
            vals.append("-" if x is None else _e(f"{x:.6g}" if isinstance(x, float) else x))
        rows.append([_e(r.variant), _e(r.target), _e(f.kind), *vals])
    return "<p>Each cell's output against the original model's on the same inputs.</p>" + table(head, rows)


def section_parity(report: Report, v: View) -> str | None:
    checked = [r for r in report.results if r.parity]
    if not checked:
        return None
    rows = []
    for r in checked:
        q = r.parity
        assert q is not None
        res = "ok" if q.ok else ("not checked" if q.ok is None else '<span class="slower">FAILED</span>')
        if q.flagged:
            res += ' <span class="slower">(flagged)</span>'
        tol = q.tolerance.model_dump(exclude_none=True) if q.tolerance is not None else {}
        rows.append([_e(r.variant), _e(r.target), _e(q.precision),
                     "-" if q.max_abs_diff is None else f"{q.max_abs_diff:.3g}",
                     "-" if q.cosine is None else f"{q.cosine:.6f}",
                     "-" if q.agreement is None else f"{100 * q.agreement:.1f}%",
                     _e(f"{q.samples if q.samples is not None else '-'} {q.inputs}"),
                     _e(", ".join(f"{k} {val:g}" for k, val in tol.items())) or "-",
                     _e(q.reason or ""), res])
    return ("<p>Each compiled target against its input model; INT8 cells against their simulated (Q/DQ) "
            "model.</p>" + table(["variant", "target", "precision", "max abs diff", "cosine", "top-1 agreement",
                                   "inputs", "tolerance", "reason", "result"], rows))


def _short(d: str | None) -> str:
    return "-" if not d else f'<code title="{_e(d)}">{_e(d[:12])}</code>'


def section_lineage(report: Report, v: View) -> str | None:
    out = []
    for name, var in report.variants.items():
        steps = [[str(s.index), _e(s.pass_), f"<code>{_e(s.text)}</code>",
                  "cache hit" if s.cache_hit else f"{s.seconds:.2f} s", _short(s.digest)] for s in var.steps]
        facts = var.facts.model_dump(mode="json", exclude_none=True) if var.facts is not None else {}
        model = var.model.model_dump(exclude_none=True)
        builds = [[_e(r.target), _e(r.status), _short(r.compiled_digest),
                   f"<code>{_e(json.dumps(r.target_config, sort_keys=True, default=str))}</code>"]
                  for r in report.results if r.variant == name]
        parts = [f"<h3>{_e(name)}</h3><p>torch {_short(var.torch_digest)} &#8594; onnx {_short(var.onnx_digest)}</p>"]
        if steps:
            parts.append(table(["#", "pass", "settings", "took", "output digest"], steps))
        if var.passes:
            parts.append("<details><summary>what each pass recorded</summary><pre>"
                         + _e(json.dumps(var.passes, indent=1, default=str)) + "</pre></details>")
        if model:
            parts.append("<p>" + _e(", ".join(f"{k} {val:,}" if isinstance(val, int) else f"{k} {val:.4g}"
                                             for k, val in model.items())) + "</p>")
        if facts:
            parts.append("<details><summary>facts</summary><pre>" + _e(json.dumps(facts, indent=1)) +
                         "</pre></details>")
        if builds:
            parts.append(table(["target", "status", "compiled digest", "target settings"], builds))
        out.append("".join(parts))
    return "".join(out) or None


def section_notes(report: Report, v: View) -> str | None:
    from .report_tables import noise_lines

    items = [*report.notes, *(f"{r.variant} / {r.target}: {n}" for r in report.results for n in r.notes),
             *noise_lines(report)]
    if not items:
        return None
    return "<ul>" + "".join(f'<li class="{"slower" if "SLOWER" in n or n.startswith("WARNING") else ""}">'
                            f"{_e(n)}</li>" for n in items) + "</ul>"


def section_machine(report: Report, v: View) -> str | None:
    return ("<details><summary>machine, recipe</summary><pre>"
            + _e(json.dumps(report.machine.model_dump(mode="json"), indent=2)) + "</pre><pre>"
            + _e(report.recipe.toml) + "</pre></details>")


# (anchor, heading, renderer); another figure kind is one more entry (e.g. decode tokens/s against perplexity).
def section_generation(report: Report, v: View) -> str | None:
    """A causal LM: perplexity on held-out text against decode tokens/s (interval bars), and its table."""
    from .report_tables import generation_lines

    rows = [r for r in report.results if r.generation is not None and r.generation.perplexity is not None]
    if not rows:
        return None
    pts = []
    for r in rows:
        g = r.generation
        assert g is not None and g.perplexity is not None
        x = g.decode_tokens_per_s or 0.0
        pts.append(sp.Point(x, g.perplexity, g.decode_tokens_per_s_low, g.decode_tokens_per_s_high,
                            f"{r.variant}/{r.target}", r.target, r.variant == "baseline", None,
                            f"{r.variant}/{r.target}: perplexity {g.perplexity:.4g}; {x:.4g} tokens/s"))
    xs = [x for p in pts for x in (p.x, p.x_low or p.x, p.x_high or p.x)]
    log = use_log(xs)
    xlo, xhi = sp.padded(min(xs), max(xs), log)
    ylo, yhi = fit_limits([p.y for p in pts])
    front = pareto_front([(-p.x, -p.y) for p in pts])  # lower x = faster, higher y = lower perplexity
    svg = sp.scatter(pts, sp.Axis(xlo if log else max(0.0, xlo), xhi, log, "decode tokens/s (higher is better)"),
                     sp.Axis(ylo, yhi, False, "perplexity on held-out text (lower is better)"),
                     "perplexity against decode speed", front)
    table = "\n".join(generation_lines(report))
    return f"{svg}<pre>{_e(table)}</pre>"


SECTIONS: list[tuple[str, str, Callable[[Report, View], str | None]]] = [
    ("generation", "Language model: perplexity against decode speed", section_generation),
    ("summary", "Summary", section_summary),
    ("pareto", "Quality against latency and size", section_pareto),
    ("figures", "Other figures against latency", section_figures),
    ("latency", "Latency distributions", section_latency),
    ("results", "Results", section_results),
    ("fidelity", "Fidelity to the original", section_fidelity),
    ("parity", "Parity (each target vs its input model)", section_parity),
    ("lineage", "Lineage", section_lineage),
    ("notes", "Notes and noise", section_notes),
    ("machine", "Machine and recipe", section_machine),
]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.muted { color: #666; font-size: 0.92em; } .slower { color: #c62828; font-weight: 600; }
.summary li { margin: 0.4em 0; } .warn { color: #c62828; font-size: 0.85em; } .verdict { font-size: 1.08em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } code { font-size: 0.95em; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
.tabs > input { position: absolute; opacity: 0; width: 1px; height: 1px; }
.tabs > label { display: inline-block; padding: 3px 10px; border: 1px solid #bbb; border-radius: 4px;
  margin: 0 4px 6px 0; cursor: pointer; background: #f6f6f6; }
.tabs > input:checked + label { background: #1f77b4; color: #fff; border-color: #1f77b4; }
.tabs > input:focus-visible + label { outline: 2px solid #ff7f0e; }
.tabs > .pane { display: none; } svg.plot { max-width: 100%; height: auto; }
nav a { margin-right: 0.8em; }
"""


def render_html(report: Report, constraints: Constraints | None = None) -> str:
    """The whole page as one string (no external resource: scripts, styles, fonts and figures are inline)."""
    v = View(report, quality_axis(report), latency_keys(report), constraints or Constraints.from_report(report))
    body, nav = [], []
    # A causal LM is judged by its generation section; the latency-at-a-batch views have nothing to show for it.
    lm = any(r.generation is not None for r in report.results)
    for anchor, heading, render in SECTIONS:
        if lm and anchor in ("summary", "pareto", "figures", "latency"):
            continue
        html = render(report, v)
        if html:
            body.append(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{html}</section>')
            nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
    m = report.machine
    head = (f"<h1>{_e(report.recipe.name)}</h1><p class=\"muted\"><code>{_e(report.recipe.pipeline)}</code><br>"
            f"{_e(report.created)}, {report.seconds} s on {_e(m.cpu.model)} ({m.cpu.cores} cores"
            f"{', ' + _e(', '.join(m.cpu.isa)) if m.cpu.isa else ''}), {report.measurement.threads} thread(s)</p>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.recipe.name)}: compress report</title>",
        f"<style>{_CSS}{chr(10).join(v.css)}</style>", "</head>", "<body>", head,
        f"<nav>{''.join(nav)}</nav>", *body, "</body>", "</html>", ""])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m compress.reporting.report_html REPORT.json [OUT.html]``: (re)render a report's page."""
    from .report_schema import load_report

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or len(args) > 2 or args[0] in ("-h", "--help"):
        print("usage: python -m compress.reporting.report_html REPORT.json [OUT.html]", file=sys.stderr)
        return 2
    src = Path(args[0])
    out = Path(args[1]) if len(args) > 1 else src.with_name("report.html")
    from ..errors import CompressError

    try:
        out.write_text(render_html(load_report(src)), encoding="utf-8")
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
