"""report.html (one self-contained page) and the fixed pareto.png, from reports built by tests/reports.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.reporting.report_html import render_html
from compress.reporting.report_view import Constraints, cell_points, fit_limits, summarize
from tests.reports import cell, latency, make_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG = "{http://www.w3.org/2000/svg}"


class StrictParser(HTMLParser):
    """Balanced tags and no resource fetched from anywhere: what a self-contained page must be."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("script", "link", "img", "iframe", "object") or (tag == "script" and a.get("src")):
            self.problems.append(f"<{tag}> loads or runs something: {a}")
        for k in ("src", "href"):
            if a.get(k) and not str(a[k]).startswith("#"):
                self.problems.append(f"<{tag} {k}={a[k]!r}> points outside the page")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))  # SVG's <line/>, <circle/>: no close tag expected

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()


def _ratio(r: float, lo: float, hi: float) -> dict[str, Any]:
    verdict = "slower" if lo > 1 else "faster" if hi < 1 else "no measurable difference"
    word = f"{1 / r:.2f}x SLOWER" if verdict == "slower" else f"{1 / r:.2f}x faster"
    return {"ratio": r, "low": lo, "high": hi, "rounds": 40, "block": 4, "mde": 0.02, "paired": True,
            "session": 0.0, "identical": False, "verdict": verdict, "text": f"{word} [{1 / hi:.2f}x, {1 / lo:.2f}x]"}


def _lat(p50: float, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    s = list(np.random.default_rng(seed).normal(p50, 0.02 * p50, 40))
    return latency(s, batch, p50_ci=[0.98 * p50, 1.02 * p50])


def _report(acc_small: float = 0.99, fid_metric: dict[str, float] | None = None) -> Any:
    fid = {"kind": "logits", "headline": "agreement", "cosine": 0.999, "max_abs_diff": 0.1, "mean_abs_diff": 0.01,
           "agreement": 0.99, **({"metric": fid_metric} if fid_metric else {})}
    results = [
        cell("baseline", "torch", acc=0.99, lat={"1": _lat(10.0), "8": _lat(40.0, 8)}, size=120_000),
        cell("baseline", "onnxruntime", acc=0.99, lat={"1": _lat(1.0, seed=1), "8": _lat(4.0, 8, 1)}, size=115_000),
        # The small model is slower at batch 1 (its whole interval above 1) and faster at batch 8.
        cell("small", "onnxruntime", acc=acc_small, lat={"1": _lat(1.25, seed=2), "8": _lat(2.0, 8, 2)},
             size=20_000, fidelity=fid,
             ratio_to_baseline={"1": _ratio(1.25, 1.2, 1.3), "8": _ratio(0.5, 0.48, 0.52)}),
        cell("small", "torch", acc=acc_small, lat={"1": _lat(9.0, seed=3), "8": _lat(30.0, 8, 3)}, size=60_000,
             fidelity=fid, ratio_to_baseline={"1": _ratio(0.9, 0.88, 0.92), "8": _ratio(0.75, 0.7, 0.8)}),
    ]
    return make_report(results, batch_sizes=[1, 8], name="demo")


def _check_page(html: str) -> StrictParser:
    p = StrictParser()
    p.feed(html)
    p.close()
    assert not p.problems, p.problems[:5]
    assert not p.stack, f"unclosed: {p.stack}"
    assert "url(" not in html and "@import" not in html  # CSS fetches nothing either
    for svg in re.findall(r"<svg\b.*?</svg>", html, re.S):
        ET.fromstring(svg)  # each figure is well-formed XML (an SVG viewer or parser reads it on its own)
    return p


def test_html_is_one_parseable_page_with_summary_first_and_a_figure_per_batch() -> None:
    html = render_html(_report())
    p = _check_page(html)
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", html, re.S)]
    titles = [s.findtext(f"{SVG}title") or "" for s in svgs]
    # Pareto at each batch size and by size; a latency distribution at each batch size.
    assert any("vs latency at batch 1" in t for t in titles) and any("vs latency at batch 8" in t for t in titles)
    assert any("vs size" in t for t in titles)
    assert sum("latency distribution" in t for t in titles) == 2
    # The summary comes first and names the winner at each batch, with its interval.
    sections = [a.get("id") for tag, a in p.tags if tag == "section"]
    assert sections[0] == "summary" and {"pareto", "latency", "results", "lineage"} <= set(sections)
    summary = html[html.index('id="summary"'):html.index('id="pareto"')]
    assert "At batch 8, small / onnxruntime is the fastest" in summary and "2.00x faster [1.92x, 2.08x]" in summary
    assert "At batch 1 no compressed model beats the original" in summary and "1.25x SLOWER" not in summary
    assert "0.80x SLOWER" in summary  # the slower cell is named in the summary
    # The selectors are radio buttons (no script); each group's first pane is the one shown.
    radios = [a for tag, a in p.tags if tag == "input" and a.get("type") == "radio"]
    assert len(radios) == 3 + 2 and sum("checked" in a for a in radios) == 2
    # Interval bars drawn for every point of the latency view, and the slower cell ringed.
    pareto1 = next(s for s in svgs if "vs latency at batch 1" in (s.findtext(f"{SVG}title") or ""))
    points = pareto1.findall(f".//{SVG}g[@class='point']")
    assert len(points) == 4 and all(g.find(f".//{SVG}g[@class='ci']") is not None for g in points)
    flagged = [g for g in points if g.find(f"{SVG}circle[@class='flag']") is not None]
    assert [g.findtext(f"{SVG}title", "").split(":")[0] for g in flagged] == ["small / onnxruntime"]


def test_summary_respects_the_accuracy_constraint() -> None:
    rep = _report(acc_small=0.95)  # 4 points below the original: ruled out at the default 1-point constraint
    s = summarize(rep, "8")
    assert s.best is not None and s.best.label == "baseline / onnxruntime"
    assert any("small / onnxruntime: top-1 drop 4.00 points" in x for x in s.excluded)
    loose = summarize(rep, "8", Constraints(max_accuracy_drop=5.0))
    assert loose.best is not None and loose.best.label == "small / onnxruntime"
    assert "against the original on torch" in (loose.vs_reference or "")  # paired from the run's samples


def test_other_fidelity_figures_such_as_perplexity_are_plotted() -> None:
    html = render_html(_report(fid_metric={"perplexity": 14.8}))
    _check_page(html)
    figs = html[html.index('id="figures"'):html.index('id="latency"')]
    assert "metric.perplexity" in figs and "lower is better" in figs
    assert len(re.findall(r"<svg\b", figs)) == 2  # at each batch size
    assert "figures" not in [m for m in re.findall(r'<section id="(\w+)"', render_html(_report()))]


def test_html_escapes_names_from_the_recipe() -> None:
    rep = _report()
    rep.recipe.name = "<b>x</b> & y"
    html = render_html(rep)
    _check_page(html)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt; &amp; y" in html


def test_a_run_where_nothing_ran_still_renders_and_says_why(tmp_path: Path) -> None:
    from compress.reporting.report import plot_pareto

    rep = make_report([cell("baseline", "onnxruntime", status="failed", reason="boom"),
                       cell("q", "tvm", status="unavailable", reason="no tvm here")])
    html = render_html(rep)
    _check_page(html)
    assert "Nothing was measured." in html and "q / tvm: unavailable: no tvm here" in html
    plot_pareto(rep, tmp_path / "p.png")


def test_axis_limits_never_collapse() -> None:
    lo, hi = fit_limits([99.44, 99.44, 99.44], percent=True)
    assert hi - lo >= 1.0 and lo < 99.44 < hi <= 100.5
    lo, hi = fit_limits([100.0, 100.0], percent=True)
    assert hi == 100.5 and lo < 100.0
    lo, hi = fit_limits([3.0, 3.0])
    assert hi > lo


def _red_pixels(png: Path) -> int:
    import matplotlib.image as mpimg

    img = (mpimg.imread(str(png))[..., :3] * 255).astype(int)
    red = np.array([214, 39, 40])  # matplotlib's tab:red, used only for the "slower" ring
    return int((np.abs(img - red).sum(axis=-1) < 30).sum())


def test_pareto_png_marks_slower_cells_and_fits_equal_accuracies(tmp_path: Path) -> None:
    from compress.reporting.report import plot_pareto

    rep = _report()  # every cell at 99% top-1: the y axis used to leave them on one flat line
    boxes = plot_pareto(rep, tmp_path / "p.png")
    assert len(boxes) == 4 and _red_pixels(tmp_path / "p.png") > 50
    assert [p.label for p in cell_points(rep, "1") if p.slower] == ["small / onnxruntime"]
    rep.results[2].ratio_to_baseline = {}  # no verdict: nothing ringed
    plot_pareto(rep, tmp_path / "q.png")
    assert _red_pixels(tmp_path / "q.png") == 0


def test_write_report_writes_the_html_page(tmp_path: Path) -> None:
    from compress.reporting.report import write_report

    write_report(_report(), tmp_path)
    assert (tmp_path / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="unavailable: Debian's chromium is not installed here "
                    "(apt-get install chromium); the page is still parsed by the default tests")
def test_page_draws_its_plots_in_headless_chromium(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    page = tmp_path / "report.html"
    page.write_text(render_html(_report()), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = (mpimg.imread(str(shot))[..., :3] * 255).astype(int)

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(img - np.array(rgb)).sum(axis=-1) < 24).sum())

    # The markers of both targets' colours and the red ring of the slower cell are on screen: the SVG drew.
    assert count((0x1F, 0x77, 0xB4)) > 100, "no torch-blue pixels: the figures did not draw"
    assert count((0xFF, 0x7F, 0x0E)) > 50, "no onnxruntime-orange pixels"
    assert count((0xD6, 0x27, 0x28)) > 30, "the slower cell's red ring is missing"
