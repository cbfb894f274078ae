"""One budget decided on a run's report (``Verdict``): latency on its interval (absolute, or a ratio that
``compress.measuring.compare`` computes), fidelity and size on the value; the check's exit code and its JUnit record."""

from __future__ import annotations

import datetime as dt
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..measuring.compare import CellRef, clock, compare, same_device, statistic, to_numbers
from ..measuring.stats import verdict
from ..reporting.report_schema import IdenticalRatio, MeasuredRatio, NoRatio, Report, ResultCell
from .baseline_store import BaselineStore
from .budget_spec import (
    _KIND,
    _RATIOS,
    _SHOW,
    EXIT_FAIL,
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_SKIPPED,
    FIDELITY_FIGURES,
    GENERATION,
    BudgetsFile,
    BudgetSpec,
    FidelityBound,
    Limit,
    parse_fidelity,
    parse_limit,
)

# ------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    budget: str
    model: str
    variant: str
    target: str
    metric: str
    limit: str
    status: str  # pass | fail | inconclusive | skipped
    value: float | None = None
    low: float | None = None
    high: float | None = None
    unit: str = ""
    detail: str = ""
    at: str | None = None  # latency budgets: the report's latency key (batch) read; compress.apps.history tracks it
    allow_skip: bool = False  # a skip of this budget does not fail the check
    seconds: float = 0.0  # this budget's share of its model's measuring time (JUnit's per-case time)

    def line(self) -> str:
        if self.value is None:
            got = "-"
        elif self.low is not None and self.high is not None:
            got = f"{self.value:.4g} {self.unit} [{self.low:.4g}, {self.high:.4g}]"
        else:
            got = f"{self.value:.4g} {self.unit}"
        detail = f" - {self.detail}" if self.detail else ""
        return f"{self.status.upper():12s} {self.budget}: {got} (limit {self.limit}){detail}"


def evaluate_budget(b: BudgetSpec, report: Report, bf: BudgetsFile, store: BaselineStore | None,
                    fp: str, memory: Callable[[ResultCell, int], int] | None = None) -> Verdict:
    """Decide one budget from a run's report (raw latency samples included)."""
    variants = [v for v in report.variants if v not in ("baseline", "recorded")]
    variant = b.variant or (variants[0] if variants else "baseline")
    v, bound, lim = _new_verdict(b, variant)
    cell = report.cell(variant, b.target)
    if cell is None:
        v.status = "fail"
        v.detail = f"variant {variant!r} on {b.target!r} was not measured (variants: {', '.join(report.variants)})"
        return v
    if not _judgeable(v, b, cell):
        return v
    if bound is not None:
        return _fidelity_verdict(v, bound, cell, report)
    assert lim is not None and b.metric is not None
    if _KIND[b.metric] == "latency":
        return _latency_verdict(v, b, lim, cell, report, bf, store, fp)
    return _value_verdict(v, b, lim, cell, report, memory)


def _new_verdict(b: BudgetSpec, variant: str) -> tuple[Verdict, FidelityBound | None, Limit | None]:
    """The budget's verdict before anything is judged (skipped), with its parsed bound or limit."""
    if b.fidelity is not None:
        bound = parse_fidelity(b.fidelity, b.title())
        title = b.name or f"{b.model}/{variant}/{b.target}/{bound.figure}"
        return (Verdict(title, b.model, variant, b.target, bound.figure, b.fidelity, "skipped",
                        unit="dB" if bound.figure == "snr_db" else ""), bound, None)
    assert b.metric is not None and b.max is not None  # load_budgets refuses a budget without them
    lim = parse_limit(b.max, b.metric, b.title())
    title = b.name or f"{b.model}/{variant}/{b.target}/{b.metric}@b{b.batch}" + (
        f"s{b.seq}" if b.seq is not None else "")
    v = Verdict(title, b.model, variant, b.target, b.metric, b.max, "skipped", unit=_SHOW[_KIND[b.metric]])
    return v, None, lim


def _judgeable(v: Verdict, b: BudgetSpec, cell: ResultCell) -> bool:
    """Whether the cell can be judged at all; when not, ``v`` says why (skipped or failed)."""
    if cell.status == "unavailable":
        # The only honest skip: this machine cannot run the target (library missing, no device).
        v.detail = f"{b.target} unavailable here: {cell.reason}"
        return False
    if cell.status == "skipped":
        v.detail = f"{b.target} not measured: {cell.reason}"
        return False
    if cell.status != "ok":
        # A failed build, a failed inference or a parity breach of the model under budget is a
        # failure: a gate that skips it goes green on a model that does not even compile.
        v.status = "fail"
        v.detail = f"{b.target} {cell.status}: {cell.reason}"
        return False
    qp = cell.quant_parity
    if qp is not None and qp.flagged:
        tol = qp.tolerance.model_dump() if qp.tolerance is not None else None
        v.status = "fail"
        v.detail = (f"deployed model on {b.target} disagrees with its simulation (agreement "
                    f"{100 * (qp.agreement or 0):.1f}%, tolerance {tol})")
        return False
    return True


def _value_verdict(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report,
                   memory: Callable[[ResultCell, int], int] | None) -> Verdict:
    """Accuracy drop, size or peak memory: decided on the value."""
    if b.metric == "accuracy_drop":
        base = report.cell("baseline", b.target)
        if cell.accuracy_top1 is None or base is None or base.accuracy_top1 is None:
            v.detail = "accuracy not measured (the recipe has no labelled data)"
            return v
        v.value = 100 * (base.accuracy_top1 - cell.accuracy_top1)
    elif b.metric == "size":
        if cell.size_bytes is None:
            v.detail = "size not measured"
            return v
        v.value = float(cell.size_bytes)
    else:
        if memory is None:
            v.detail = "peak memory not measured"
            return v
        v.value = float(memory(cell, b.batch))
    v.status = "pass" if v.value <= lim.value else "fail"
    return v


def _latency_verdict(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report, bf: BudgetsFile,
                     store: BaselineStore | None, fp: str) -> Verdict:
    """A latency budget, decided on its interval: absolute, or a ratio (``compress.measuring.compare``) to another cell
    of the run, to the recorded baseline re-timed in it, or to numbers recorded on another day."""
    at = v.at = b.latency_key(report.measurement.seq_own)
    lat = cell.latency.get(at)
    if lat is None:
        v.status = "fail"
        if b.seq is not None and at != str(b.batch):
            v.detail = (f"batch {b.batch} at sequence length {b.seq} was not measured on {b.target} (see the "
                        "cell's notes: a build fixed to one length runs only that); the budget cannot be verified")
            return v
        v.detail = (f"batch {b.batch} was not measured on {b.target}; the budget cannot be verified "
                    "(add it to the recipe's measure.batch_sizes, or export with a dynamic batch)")
        return v
    notes: list[str] = [f"fewer rounds: {lat.capped}"] if lat.capped else []
    if cell.device is not None:
        ck = clock(cell, at)
        if ck is None or ck.device is None or not ck.samples:
            v.status = "fail"
            v.detail = (f"{b.target} ran on {cell.device} but the report holds no figures from its clock at "
                        f"batch {b.batch}; the budget cannot be verified")
            return v
        # The host figures of a remote cell include the network round trip: the device's are its latency.
        notes.append(f"on {cell.device}'s own clock")
    if lim.ratio_to is None:
        v.value, v.low, v.high = statistic(cell, at, v.metric, bf.confidence, bf.resamples)
    else:
        decided = (_to_recorded(v, b, lim, cell, report, bf, store, fp, notes) if lim.ratio_to == "recorded"
                   else _to_other(v, b, lim, cell, report, bf, notes))
        if decided is not None:
            return decided
    assert v.low is not None and v.high is not None  # set by the statistic or the ratio above
    v.status = verdict(v.low, v.high, lim.value)
    if v.status == "inconclusive":
        notes.insert(0, f"the {int(bf.confidence * 100)}% interval straddles the limit; measurement too noisy to "
                     "decide (raise rounds, quiet the machine)")
    v.detail = "; ".join(notes)
    return v


def _paired(v: Verdict, lim: Limit, cell: ResultCell, other: ResultCell, report: Report, bf: BudgetsFile,
            what: str, notes: list[str]) -> Verdict | MeasuredRatio:
    """The cell's latency over ``other``'s, paired in this run (``compress.measuring.compare``), widened by the
    between-session offset of the baseline on the budget's target: the ratio with its interval (``v``'s figures
    set), or the verdict when it is decided without one (an identical build) or cannot be computed."""
    assert v.at is not None
    r = compare(cell, other, v.at, v.metric, bf.confidence, bf.resamples, widen_by=report.cell("baseline", v.target),
                what=what)
    if isinstance(r, IdenticalRatio):
        v.value = v.low = v.high = 1.0
        v.status = "pass" if lim.value >= 1.0 else "fail"
        v.detail = f"identical build to {what} (same digest): not raced against itself"
        return v
    if isinstance(r, NoRatio):
        if not same_device(cell, other):
            return _across_devices(v, cell, other, what)
        v.status = "fail" if r.verdict == "not comparable" else "inconclusive"
        v.detail = f"{r.text}; the budget cannot be verified"
        return v
    if r.session:
        notes.append(f"interval widened by the between-session A/A offset ({100 * r.session:.1f}%)")
    v.value, v.low, v.high = r.ratio, r.low, r.high
    return r


def _to_other(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report, bf: BudgetsFile,
              notes: list[str]) -> Verdict | None:
    """A ratio to another cell of the run: the baseline on this target ("x original") or this variant on
    another target ("x TARGET")."""
    assert lim.ratio_to is not None and v.at is not None
    other = report.cell(v.variant if lim.ratio_to != "original" else "baseline",
                        b.target if lim.ratio_to == "original" else lim.ratio_to)
    if other is None or other.status != "ok" or v.at not in other.latency:
        v.detail = f"reference {lim.ratio_to} unavailable: {other.reason if other else 'not measured'}"
        if other is not None and other.status == "failed":
            v.status = "fail"  # the reference failing to build/run is a broken build, not a skip
        return v
    v.unit = f"x {lim.ratio_to}"
    r = _paired(v, lim, cell, other, report, bf, lim.ratio_to, notes)
    if isinstance(r, Verdict):
        return r
    notes.append(f"paired over {r.rounds} rounds; smallest detectable difference ~{100 * r.mde:.0f}%")
    return None


def _to_recorded(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report, bf: BudgetsFile,
                 store: BaselineStore | None, fp: str, notes: list[str]) -> Verdict | None:
    """A ratio to the recorded baseline: its kept artifact re-timed in this run (paired), else the numbers
    recorded on another day (unpaired: the weaker comparison, said so)."""
    assert v.at is not None
    ref = report.cell("recorded", b.target)
    rec = store.get(BaselineStore.key(b.model, v.variant, b.target, v.at, fp)) if store else None
    if ref is not None and (rec is None or (rec.get("artifact") or {}).get("dir") != ref.compiled_digest):
        # One stored artifact is re-timed per target; this one is another budget's baseline.
        if rec is not None:
            rec.setdefault("artifact_missing", "this target's re-timed baseline artifact belongs to "
                                               "another variant's budget")
        ref = None
    if ref is not None and ref.status == "ok" and not same_device(ref, cell):
        return _across_devices(v, cell, ref, "the recorded baseline")
    if ref is not None and ref.status == "ok" and v.at in ref.latency:
        v.unit = "x recorded"
        r = _paired(v, lim, cell, ref, report, bf, "the recorded baseline", notes)
        if isinstance(r, Verdict):
            return r
        notes.append(f"baseline artifact {str(ref.compiled_digest)[:12]} re-timed in this run, "
                     f"paired over {r.rounds} rounds; smallest detectable difference ~{100 * r.mde:.0f}%")
        return None
    if store is None:
        v.detail = "no baseline file given"
        return v
    if rec is None:
        v.detail = (f"no recorded baseline for this machine fingerprint ({fp[:12]}); "
                    "run compress check --update-baseline on this machine first")
        return v
    got = to_numbers(cell, v.at, rec, v.metric, bf.confidence, bf.resamples)
    if isinstance(got, NoRatio):
        v.status = "fail"
        v.detail = (f"{b.target} ran on {cell.device or 'this machine'}, its baseline was recorded on "
                    f"{rec.get('device') or 'this machine'}: figures from two devices are not "
                    "comparable; run compress check --update-baseline against this device")
        return v
    v.value, v.low, v.high = got.ratio, got.low, got.high
    v.unit = "x recorded (numbers only)"
    why = (ref.reason if ref is not None and ref.status != "ok"
           else rec.get("artifact_missing") or "the baseline artifact is gone")
    notes.append(f"WEAKER comparison: against numbers recorded {rec.get('recorded', '?')}, unpaired, "
                 f"because {why}; run --update-baseline to store the artifact")
    if rec.get("digest") != cell.compiled_digest:
        notes.append("baseline was recorded for a different build of this model")
    return None


def _fidelity_source(report: Report) -> str:
    """What a run's fidelity was measured on, for the verdict."""
    from ..quality.fidelity import SYNTHETIC_SAMPLES

    if report.data is None:
        return f"{SYNTHETIC_SAMPLES} synthetic inputs (the recipe has no data)"
    return f"the validation split ({report.data.val} samples of {report.data.source})"


def _across_devices(v: Verdict, cell: ResultCell, other: ResultCell, what: str) -> Verdict:
    """A latency ratio between cells timed on two devices is refused: it would not be a same-run comparison."""
    v.status = "fail"
    v.detail = (f"{CellRef.of(cell)} was timed on {cell.device or 'this machine'} and {what} on "
                f"{other.device or 'this machine'}: a ratio across devices is not a same-run comparison; budget an "
                "absolute latency (e.g. '5 ms') or a ratio to a cell on the same device ('x original')")
    return v


def _generation_verdict(v: Verdict, bound: FidelityBound, cell: ResultCell) -> Verdict:
    """A causal LM's figure: quality decided on the value; a speed ratio on its paired interval (pass when all
    of it holds the bound, fail when none of it does, inconclusive otherwise)."""
    g = cell.generation
    v.status = "fail"
    if g is None:
        v.detail = "this cell has no generation figures (it was not measured as a causal language model)"
        return v
    got = getattr(g, bound.figure, None)
    if got is None:
        v.detail = (f"this cell has no {bound.figure} (the reference cell is not compared with itself)"
                    if bound.figure in _RATIOS else f"this cell has no {bound.figure}")
        return v
    if bound.figure in _RATIOS:
        v.value, v.low, v.high = float(got.ratio), float(got.low), float(got.high)
        lo_ok, hi_ok = bound.holds(v.low), bound.holds(v.high)
        v.status = "pass" if lo_ok and hi_ok else "fail" if not lo_ok and not hi_ok else "inconclusive"
        v.detail = f"paired ratio to the reference cell over {got.rounds} interleaved generation rounds"
        return v
    v.value = float(got)
    v.status = "pass" if bound.holds(v.value) else "fail"
    v.detail = f"on {g.eval_tokens} held-out tokens against the reference cell; deterministic: decided on the value"
    return v


def _fidelity_verdict(v: Verdict, bound: FidelityBound, cell: ResultCell, report: Report) -> Verdict:
    """Decide a fidelity bound on the value itself: the same data gives the same outputs (no interval)."""
    if bound.kind == GENERATION:
        return _generation_verdict(v, bound, cell)
    fid = cell.fidelity
    v.status = "fail"
    if fid is None:
        v.detail = ("fidelity was not measured on this cell (no reference output: the original model did not "
                    "run on any target)")
        return v
    if fid.degenerate:
        # A constant or all-zero reference passes any fidelity bound vacuously: that is no evidence.
        v.detail = f"fidelity cannot be judged: {fid.degenerate}"
        return v
    value: float | None
    if bound.figure == "metric" or bound.figure.startswith("metric."):
        got = fid.metric or {}
        name = bound.figure.partition(".")[2]
        if not got:
            v.detail = "the recipe's measure.metric gave no figure on this cell"
            return v
        if not name and len(got) != 1:
            v.detail = f"measure.metric returned several figures ({', '.join(got)}); name one: metric.NAME"
            return v
        if name and name not in got:
            v.detail = f"measure.metric returned {', '.join(got)}, not {name!r}"
            return v
        value = got[name] if name else next(iter(got.values()))
    else:
        value = getattr(fid, bound.figure, None)
        if value is None:
            have = [k for k in FIDELITY_FIGURES if getattr(fid, k, None) is not None]
            v.detail = f"this cell's {fid.kind} fidelity has no {bound.figure} (it has {', '.join(have) or 'none'})"
            return v
    v.value = float(value)
    v.status = "pass" if bound.holds(v.value) else "fail"
    v.detail = (f"{fid.kind} fidelity to the original model on {_fidelity_source(report)}; deterministic: decided "
                "on the value, no interval")
    return v


def overall_exit(verdicts: list[Verdict], allow_skip: bool = False) -> int:
    """The check's exit code. It fails closed: a budget that could not be judged (skipped: no recorded
    baseline, a reference or target unavailable here) is exit 4 unless skipping is allowed for it."""
    st = {v.status for v in verdicts}
    if "fail" in st:
        return EXIT_FAIL
    if any(v.status == "skipped" and not (allow_skip or v.allow_skip) for v in verdicts):
        return EXIT_SKIPPED
    if "inconclusive" in st:
        return EXIT_INCONCLUSIVE
    return EXIT_PASS


def _unique_names(verdicts: list[Verdict]) -> list[str]:
    """JUnit test case names, one per budget: two budgets on the same figure (``2 ms`` and ``0.5x torch``)
    are told apart by their limit, and by their position if even that is the same (CI views key on names)."""
    names = [v.budget for v in verdicts]
    names = [f"{n} [max {v.limit}]" if names.count(n) > 1 else n for n, v in zip(names, verdicts, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} #{seen[n]}")
    return out


def junit_xml(verdicts: list[Verdict], seconds: float) -> str:
    suite = ET.Element("testsuite", name="compress.check", tests=str(len(verdicts)),
                       failures=str(sum(v.status == "fail" for v in verdicts)),
                       errors=str(sum(v.status == "inconclusive" for v in verdicts)),
                       skipped=str(sum(v.status == "skipped" for v in verdicts)), time=f"{seconds:.3f}",
                       timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    for v, name in zip(verdicts, _unique_names(verdicts), strict=True):
        tc = ET.SubElement(suite, "testcase", classname=f"compress.{v.model}.{v.target}", name=name,
                           time=f"{v.seconds:.3f}")
        msg = v.line()
        if v.status == "fail":
            ET.SubElement(tc, "failure", message=msg, type="BudgetExceeded").text = msg
        elif v.status == "inconclusive":
            ET.SubElement(tc, "error", message=msg, type="Inconclusive").text = msg
        elif v.status == "skipped":
            ET.SubElement(tc, "skipped", message=v.detail or "skipped")
        ET.SubElement(tc, "system-out").text = json.dumps(asdict(v))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
