"""The history of a project's figures across commits and machines (``compress history``, ``check --drift``).

Every ``compress run`` and ``compress check`` appends one record per model to a JSON-lines store
(``runs/history.jsonl`` beside the run folders by default; ``$COMPRESS_HISTORY`` names another file,
``off`` turns it off). A record (``compress.history/v1``) holds the commit (``git rev-parse HEAD``, or
``$COMPRESS_COMMIT``), the time, the machine fingerprint (the key baselines use: CPU, ISA, cores,
libraries, thread setting), the recipe's digest, and every figure with its 95% interval: per cell
the p50 at each batch size, the ratio to the original, top-1, size, and for ``check`` each budget's
figure, limit and verdict together with the absolute statistic behind it.

Appending is safe under concurrent writers: the record is one line written by a single ``write`` on a
descriptor opened with ``O_APPEND`` while an exclusive ``flock`` is held, so lines never interleave.
A reader skips a line it cannot parse (a writer killed mid-line) and says how many it skipped.

Change points (``compress history``) are found by binary segmentation of a figure's log values: a split
is kept when the two sides' means differ by more than 4 noise units, the noise being the larger of the
records' own intervals and the run-to-run scatter (the MAD of successive differences, which a steady
drift does not inflate). ``compress check --drift N`` compares each latency budget's statistic now with
the same budget's N commits back on the same machine: a budget "K x recorded" (each commit against the
baseline recorded at the one before) fails when the figure moved more than K over those N commits, though
each step passed (it warns when the interval only reaches the limit); ``--drift-max PCT`` applies the same
test, with 1 + PCT, to every latency and size budget.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import itertools
import json
import math
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..measuring.compare import CellRef
from ..reporting.report_schema import IdenticalRatio, MeasuredRatio, Report

SCHEMA = "compress.history/v1"
ENV = "COMPRESS_HISTORY"
COMMIT_ENV = "COMPRESS_COMMIT"
FILENAME = "history.jsonl"
_Z = 1.959964
# Earlier runs a drift judgement needs before it can fail: fewer cannot show the machine's run-to-run noise.
MIN_HISTORY = 3


# ------------------------------------------------------------------------------------------- the store


def store_path(out_dir: Path | str | None = None) -> Path | None:
    """Where records go: ``$COMPRESS_HISTORY`` (``off``: nowhere), else ``history.jsonl`` in the folder that
    holds the run folders (``runs/`` for ``runs/NAME``)."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none", "false") else Path(env)
    return (Path(out_dir).parent if out_dir is not None else Path("runs")) / FILENAME


def git_commit(cwd: Path | str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the working tree, or (None, None) outside git; ``$COMPRESS_COMMIT`` wins."""
    env = os.environ.get(COMMIT_ENV)
    if env:
        return env.strip(), None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                            text=True, timeout=10)
        return head.stdout.strip(), bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line: a single write, O_APPEND, under an exclusive lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it all in one call; the loop only guards a short write
                view = view[os.write(fd, view):]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records in the order written, and how many lines were skipped (unparseable, or another schema)."""
    if not path.exists():
        return [], 0
    out, skipped = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the history ({e})") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA and isinstance(rec.get("figures"), list):
            out.append(rec)
        else:
            skipped += 1
    return out, skipped


# ------------------------------------------------------------------------------------------ the records


def _fig(name: str, value: float | None, low: float | None = None, high: float | None = None, unit: str = "",
         better: str = "lower", **extra: Any) -> dict[str, Any] | None:
    if value is None or not math.isfinite(value):
        return None
    d: dict[str, Any] = {"name": name, "value": value, "unit": unit, "better": better}
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        d["low"], d["high"] = low, high
    return {**d, **extra}


def run_figures(report: Report) -> list[dict[str, Any]]:
    """Each measured cell's figures: p50 per latency key with its interval, ratio to the original, top-1, size."""
    from ..reporting.report_view import p50_with_interval

    out: list[dict[str, Any] | None] = []
    for r in report.results:
        if r.status != "ok" or r.variant in ("recorded", "baseline~aa"):
            continue
        cell = str(CellRef.of(r))
        for key in r.latency:
            p = p50_with_interval(r, key)
            if p is not None:
                out.append(_fig(f"{cell}/p50@{key}", p[0], p[1], p[2], "ms"))
            x = r.ratio_to_baseline.get(key)
            if isinstance(x, (MeasuredRatio, IdenticalRatio)):
                out.append(_fig(f"{cell}/ratio@{key}", x.ratio, x.low, x.high, "x original"))
        if r.accuracy_top1 is not None:
            out.append(_fig(f"{cell}/top1", 100 * r.accuracy_top1, unit="%", better="higher"))
        if r.size_bytes is not None:
            out.append(_fig(f"{cell}/size", float(r.size_bytes), unit="B"))
    return [f for f in out if f is not None]


def machine_key(report: Report) -> str:
    from .budget import fingerprint_key

    return fingerprint_key(report.machine.model_dump(), report.measurement.threads_setting or "auto")[:16]


def record(kind: str, report: Report, figures: list[dict[str, Any]], commit: tuple[str | None, bool | None]
           | None = None) -> dict[str, Any]:
    sha, dirty = commit if commit is not None else git_commit()
    m = report.machine
    return {"schema": SCHEMA, "kind": kind, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": sha, "dirty": dirty, "machine": machine_key(report),
            "machine_desc": f"{m.cpu.model} ({m.cpu.affinity_cores or m.cpu.cores} cores, "
                            f"{report.measurement.threads_setting or 'auto'} threads)",
            "recipe": report.recipe.name,
            "recipe_digest": hashlib.sha256(report.recipe.toml.encode()).hexdigest(),
            "figures": figures}


def record_run(report: Report, out_dir: Path | str | None) -> Path | None:
    """``compress run``: append the run's figures; returns the store written, None when history is off."""
    path = store_path(out_dir)
    if path is None:
        return None
    append(path, record("run", report, run_figures(report)))
    return path


def budget_figures(res: Any, model: str) -> list[dict[str, Any]]:
    """Each budget of ``model``: its verdict's figure and limit, and the absolute statistic behind a latency
    budget (the cell's p50/p90/... at the budget's batch, with its interval), which ``--drift`` compares."""
    from ..measuring.compare import statistic
    from .budget import FIDELITY_FIGURES, LATENCY

    rep = res.reports.get(model)
    out: list[dict[str, Any] | None] = []
    for v in res.verdicts:
        if v.model != model or v.metric == "drift":
            continue
        extra: dict[str, Any] = {"limit": v.limit, "status": v.status, "metric": v.metric}
        cell = rep.cell(v.variant, v.target) if rep is not None else None
        same_run = v.metric in LATENCY and v.value is not None and v.unit.startswith("x ") and \
            not v.unit.startswith("x recorded")
        if same_run:
            # A ratio to a cell timed in the same run ("0.5x torch", "x original") cancels the machine's load; an
            # absolute latency does not (two checks of one build minutes apart moved 5% here), so drift reads it.
            extra["abs"] = {"value": v.value, "low": v.low, "high": v.high, "unit": v.unit}
        elif v.metric in LATENCY and v.at and cell is not None and cell.status == "ok" and v.at in cell.latency:
            a, lo, hi = statistic(cell, v.at, v.metric)
            extra["abs"] = {"value": a, "low": lo, "high": hi, "unit": "ms"}
        elif v.metric == "size" and v.value is not None:
            extra["abs"] = {"value": v.value, "unit": "B"}
        better = "higher" if FIDELITY_FIGURES.get(v.metric, ("", "<="))[1] == ">=" else "lower"
        # A verdict without a figure (skipped, or failed before measuring) is kept: its status is history too.
        out.append(_fig(f"budget {v.budget}", v.value, v.low, v.high, v.unit, better, **extra)
                   or {"name": f"budget {v.budget}", "value": None, "unit": v.unit, "better": better, **extra})
    return [f for f in out if f is not None]


def record_check(res: Any, path: Path | None) -> None:
    """``compress check``: one record per model measured, its run figures and its budgets."""
    if path is None:
        return
    commit = git_commit()
    for model, rep in res.reports.items():
        append(path, record("check", rep, [*run_figures(rep), *budget_figures(res, model)], commit))


# ---------------------------------------------------------------------------------------------- series


@dataclass
class Point:
    commit: str | None
    time: str
    value: float
    low: float | None
    high: float | None
    abs: dict[str, Any] | None = None
    limit: str | None = None
    status: str | None = None
    metric: str | None = None

    @property
    def tick(self) -> str:
        return (self.commit or "")[:7] or self.time[5:16].replace("T", " ")


@dataclass
class Series:
    machine: str
    machine_desc: str
    recipe: str
    name: str
    unit: str
    better: str
    points: list[Point] = field(default_factory=list)


def series(records: Sequence[dict[str, Any]], figure: str | None = None, machine: str | None = None,
           per_commit: bool = True) -> list[Series]:
    """Each (machine, recipe, figure) over time. ``per_commit``: one point per commit (the latest record of
    it), in the order the commits first appeared; records without a commit stay one point each."""
    out: dict[tuple[str, str, str], Series] = {}
    for rec in records:
        m = str(rec.get("machine"))
        if machine and not m.startswith(machine):
            continue
        for f in rec["figures"]:
            name = f.get("name", "")
            if figure and figure not in name:
                continue
            if f.get("value") is None:
                continue
            key = (m, str(rec.get("recipe")), name)
            s = out.setdefault(key, Series(m, str(rec.get("machine_desc", "")), key[1], name, f.get("unit", ""),
                                           f.get("better", "lower")))
            p = Point(rec.get("commit"), str(rec.get("time", "")), float(f["value"]), f.get("low"), f.get("high"),
                      f.get("abs"), f.get("limit"), f.get("status"), f.get("metric"))
            if per_commit and p.commit is not None and s.points and any(q.commit == p.commit for q in s.points):
                s.points = [q if q.commit != p.commit else p for q in s.points]
            else:
                s.points.append(p)
    return list(out.values())


def _log(values: Sequence[float]) -> list[float]:
    return [math.log(v) for v in values]


def run_noise(logs: Sequence[float]) -> float:
    """Run-to-run scatter (sd, log scale) from successive differences, robust to a steady drift and to steps:
    the MAD of the differences around their median, / sqrt(2) (a difference holds two runs' noise)."""
    if len(logs) < 3:
        return 0.0
    d = sorted(b - a for a, b in itertools.pairwise(logs))
    med = d[len(d) // 2]
    dev = sorted(abs(x - med) for x in d)
    return 1.4826 * dev[len(dev) // 2] / math.sqrt(2)


def _interval_sd(points: Sequence[Point]) -> float:
    """The typical sd (log scale) the records' own 95% intervals imply."""
    sds = sorted(math.log(p.high / p.low) / (2 * _Z) for p in points
                 if p.low is not None and p.high is not None and p.low > 0 and p.high > 0)
    return sds[len(sds) // 2] if sds else 0.0


def change_points(points: Sequence[Point], threshold: float = 4.0, min_size: int = 2,
                  min_effect: float = 0.01) -> list[int]:
    """Indices i where the figure changed between point i-1 and point i (binary segmentation; see module)."""
    vals = [p.value for p in points]
    if len(vals) < 2 * min_size or any(v <= 0 for v in vals):
        return []
    logs = _log(vals)
    sd = max(run_noise(logs), _interval_sd(points), 1e-3)
    found: list[int] = []

    def split(lo: int, hi: int) -> None:  # [lo, hi)
        n = hi - lo
        if n < 2 * min_size:
            return
        best, best_t = -1, 0.0
        for i in range(lo + min_size, hi - min_size + 1):
            left, right = logs[lo:i], logs[i:hi]
            diff = abs(sum(right) / len(right) - sum(left) / len(left))
            t = diff / (sd * math.sqrt(1 / len(left) + 1 / len(right)))
            if t > best_t and diff >= math.log1p(min_effect):
                best, best_t = i, t
        if best < 0 or best_t < threshold:
            return
        found.append(best)
        split(lo, best)
        split(best, hi)

    split(0, len(logs))
    return sorted(found)


# ----------------------------------------------------------------------------------------------- drift


@dataclass
class Drift:
    budget: str
    status: str  # pass | fail | warn (the interval reaches the limit) | skipped
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    limit: float | None = None
    since: str | None = None  # the commit compared with
    steps: int = 0
    detail: str = ""

    def line(self) -> str:
        got = f"x{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}]" if self.ratio is not None else "-"
        lim = f"x{self.limit:.3g}" if self.limit is not None else "-"
        return f"{self.status.upper():12s} drift {self.budget}: {got} over {self.steps} commit(s) (limit {lim})" + (
            f" - {self.detail}" if self.detail else "")


def drift_limit(limit_text: str | None, metric: str | None, drift_max: float | None) -> float | None:
    """How far (a ratio) a budget's figure may move over the window: K for "K x recorded" (K > 1), 1 + drift_max
    for any latency or size budget when given; None: the budget's own check already bounds it."""
    from .budget import LATENCY, parse_limit

    if not limit_text or metric not in (*LATENCY, "size"):
        return None
    try:
        lim = parse_limit(limit_text, metric, "history")
    except Exception:  # a budget file since changed; judge it by drift_max alone
        lim = None
    if lim is not None and lim.ratio_to == "recorded" and lim.value > 1:
        return lim.value if drift_max is None else min(lim.value, 1 + drift_max)
    return 1 + drift_max if drift_max is not None else None


def drift(past: Sequence[dict[str, Any]], now: Sequence[dict[str, Any]], n: int,
          drift_max: float | None = None) -> list[Drift]:
    """Judge each budget figure of the records ``now`` (this check) against the same budget over the last ``n``
    commits in ``past`` on the same machine: the movement is the fitted line through the window's log values
    times its length, its interval from one run's sd (the series' run-to-run scatter or, where larger, the
    records' own intervals); fail when all of the interval is beyond the limit, warn when it reaches it."""
    from ..measuring.stats import verdict

    out = []
    for rec in now:
        for f in rec["figures"]:
            if not f.get("name", "").startswith("budget "):
                continue
            limit = drift_limit(f.get("limit"), f.get("metric"), drift_max)
            name = f["name"][7:]
            if limit is None:
                continue
            cur = f.get("abs")
            if not cur or not cur.get("value"):
                out.append(Drift(name, "skipped", limit=limit, detail="not measured in this run"))
                continue
            hist = [s for s in series(past, machine=rec["machine"], figure=f["name"])
                    if s.name == f["name"] and s.recipe == rec["recipe"]]
            pts = [p for p in (hist[0].points if hist else []) if p.abs and p.abs.get("value")
                   and (p.commit is None or p.commit != rec.get("commit"))]
            if not pts:
                out.append(Drift(name, "skipped", limit=limit, detail="no earlier record on this machine"))
                continue
            window = pts[-n:]
            then = window[0]
            assert then.abs is not None

            def half(d: dict[str, Any]) -> float:
                lo, hi = d.get("low"), d.get("high")
                return math.log(hi / lo) / 2 if lo and hi and lo > 0 else 0.0

            # The movement over the window: the least-squares line through its log values (every commit in it,
            # not just the two ends, counts), times its length. One run's sd: the series' run-to-run scatter
            # (which holds each run's own noise too), at least what the records' own intervals say.
            ys = _log([p.abs["value"] for p in window if p.abs] + [cur["value"]])
            xs = list(range(len(ys)))
            xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
            sxx = sum((x - xm) ** 2 for x in xs)
            slope = sum((x - xm) * (y - ym) for x, y in zip(xs, ys, strict=True)) / sxx
            steps = len(ys) - 1
            r = math.exp(slope * steps)
            scatter = run_noise(_log([p.abs["value"] for p in pts if p.abs] + [cur["value"]]))
            sd = max(scatter, (half(cur) + half(then.abs)) / (2 * _Z))
            hw = _Z * sd * steps / math.sqrt(sxx)
            lo, hi = r * math.exp(-hw), r * math.exp(hw)
            # A drift whose interval only reaches the limit warns: the window's own noise is no regression, and
            # blocking on it would make the long-horizon gate cry wolf (the step budget already decides each run).
            st = {"inconclusive": "warn"}.get(verdict(lo, hi, limit), verdict(lo, hi, limit))
            few = len(pts) < MIN_HISTORY
            if few and st == "fail":
                # Under MIN_HISTORY earlier runs the run-to-run scatter is unknown, and the records' own intervals
                # miss it (a busy machine moves absolute figures between runs): warn, do not fail.
                st = "warn"
            short = len(window) < n
            out.append(Drift(name, st, r, lo, hi, limit, then.commit or then.time, len(window),
                             (f"only {len(pts)} earlier run(s) on this machine: the run-to-run noise is not known "
                              f"yet, so this can only warn; " if few else "")
                             + (f"only {len(window)} earlier commit(s) on this machine; " if short else "")
                             + f"against {then.tick}; each step judged alone "
                             + ("passed" if all(p.status in (None, "pass") for p in window) else "did not all pass")))
    return out


def apply_drift(res: Any, records: Sequence[dict[str, Any]], n: int, drift_max: float | None) -> list[Drift]:
    """Add a verdict per drift judgement to a check result (metric "drift"); a drift that fails fails the check
    (exit 1); a warning (the interval reaches the limit) is printed and changes no exit code."""
    from .budget import EXIT_FAIL, Verdict

    commit = git_commit()
    now = [record("check", rep, budget_figures(res, model), commit) for model, rep in res.reports.items()]
    found = drift(records, now, n, drift_max)
    for d in found:
        res.verdicts.append(Verdict(f"{d.budget} (drift over {d.steps} commits)", "", "", "", "drift",
                                    f"x{d.limit:.3g} over {n} commits" if d.limit else "-", d.status, d.ratio,
                                    d.low, d.high, "x then", d.detail))
    if any(d.status == "fail" for d in found):
        res.exit_code = EXIT_FAIL
    return found


# ---------------------------------------------------------------------------------------------- printing


_BARS = "▁▂▃▄▅▆▇█"


def _value(v: float, unit: str) -> str:
    if unit == "B":
        from ..reporting.report_tables import fmt_size

        return fmt_size(int(v))
    return f"{v:.4g}"


def sparkline(values: Sequence[float], marks: Sequence[int] = ()) -> str:
    lo, hi = min(values), max(values)
    out = []
    for i, v in enumerate(values):
        if i in marks:
            out.append("|")
        out.append(_BARS[int((v - lo) / (hi - lo) * (len(_BARS) - 1)) if hi > lo else 3])
    return "".join(out)


def render_text(all_series: Sequence[Series], last: int = 40) -> str:
    lines: list[str] = []
    by_machine: dict[str, list[Series]] = {}
    for s in all_series:
        by_machine.setdefault(s.machine, []).append(s)
    for m, ss in by_machine.items():
        lines.append(f"machine {m} - {ss[0].machine_desc}")
        for s in ss:
            pts = s.points[-last:]
            vals = [p.value for p in pts]
            cps = change_points(pts)
            first, cur = vals[0], vals[-1]
            move = f" ({100 * (cur / first - 1):+.1f}%)" if first else ""
            better = "lower is better" if s.better == "lower" else "higher is better"
            lines.append(f"  {s.recipe}: {s.name} [{s.unit}, {better}]  {len(pts)} point(s)")
            lines.append(f"    {sparkline(vals, cps)}  {_value(first, s.unit)} -> {_value(cur, s.unit)}{move}  "
                         f"({pts[0].tick} .. {pts[-1].tick})")
            for i in cps:
                a = sum(vals[max(0, i - 3):i]) / len(vals[max(0, i - 3):i])
                b = sum(vals[i:i + 3]) / len(vals[i:i + 3])
                lines.append(f"    CHANGE at {pts[i].tick} (after {pts[i - 1].tick}): {_value(a, s.unit)} -> "
                             f"{_value(b, s.unit)} "
                             f"({100 * (b / a - 1):+.1f}%)")
        lines.append("")
    return "\n".join(lines).rstrip()


def render_html(all_series: Sequence[Series], last: int = 40) -> str:
    """A self-contained page of trend figures (one per figure and machine), change points marked."""
    from html import escape

    from ..reporting import svg_plot as sp

    parts = []
    for s in all_series:
        pts = s.points[-last:]
        cps = change_points(pts)
        svg = sp.trend(sp.Series(s.name, [p.value for p in pts], [p.low for p in pts], [p.high for p in pts],
                                 [p.tick for p in pts], cps), s.unit,
                       f"{s.recipe}: {s.name} on {s.machine}")
        parts.append(f"<section><h2>{escape(s.recipe)}: {escape(s.name)}</h2><p>{escape(s.machine_desc)}; "
                     f"{len(cps)} change point(s)</p>{svg}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>compress history</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:1.5em auto}"
            "svg{max-width:100%;height:auto}</style></head><body><h1>compress history</h1>"
            + "".join(parts) + "</body></html>\n")
