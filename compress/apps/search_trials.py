"""One trial of a search: its model built, probed untrained and measured as an ordinary run, and the
figures read from that run's report (``compress.measuring.compare`` decides its latency ratio); the statistics that
rule a trial out from its probe and pool the between-session spread of the trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import CompressError
from ..measuring.compare import compare
from ..reporting.report_schema import MeasuredRatio, NoRatio, Report
from ..stages.recipe import Recipe
from .search_space import PROBE_METRICS, TIMED, SearchSpec


def trial_metrics(report: Report, variant: str, target: str, batch: int) -> dict[str, Any]:
    """Objectives of one trial from its run report (the trial's variant against the baseline)."""
    base, cell = report.cell("baseline", target), report.cell(variant, target)
    if cell is None and variant not in report.variants and base is not None:
        cell = base  # a point with every optional pass off is the original model itself
    if cell is None or cell.status != "ok":
        reason = "not measured" if cell is None else f"{cell.status}: {cell.reason}"
        raise CompressError(f"the trial's model on {target}: {reason}")
    if cell.generation is not None:
        drafting = base is not None and cell is not base and base.target_config.get("draft") == variant
        return _lm_metrics(report, variant, cell, target, base if drafting else None)
    b = str(batch)
    out: dict[str, Any] = {"p50_ms": cell.latency[b].p50_ms, "size_mb": (cell.size_bytes or 0) / 1e6}
    if base is not None and base.status == "ok":
        # The run's own paired ratio (block bootstrap, widened by the baseline's A/A spread); where the run gave
        # none (the trial is the original model itself), compress.measuring.compare's.
        r = cell.ratio_to_baseline.get(b) if cell is not base else None
        if r is None or isinstance(r, NoRatio):
            r = compare(cell, base, b)
        if isinstance(r, NoRatio):
            raise CompressError(f"the trial's latency on {target}: {r.text}")
        out.update(latency_ratio=r.ratio, latency_ratio_ci=[r.low, r.high])
        if isinstance(r, MeasuredRatio) and r.session:
            # the run's one-draw A/A offset, and its interval before that widening
            out.update(aa_offset=r.session, latency_ratio_ci_paired=_unwiden(r.ratio, r.low, r.high, r.session))
        if base.accuracy_top1 is not None and cell.accuracy_top1 is not None:
            out["accuracy_drop"] = (base.accuracy_top1 - cell.accuracy_top1) * 100
            out["top1"] = cell.accuracy_top1
    if cell.fidelity is not None and cell.fidelity.agreement is not None:
        out["fidelity_loss"] = 1.0 - float(cell.fidelity.agreement)
    out.update(_structure_and_conditions(report, variant, cell.latency[b], b))
    return out


def _lm_metrics(report: Report, variant: str, cell: Any, target: str, verifier: Any = None) -> dict[str, Any]:
    """A causal LM trial's figures from its generation record: the paired ratios to the original on the reference
    target (measure_lm), decode as time per token (1 / decode_speedup, so that every objective is minimized) with
    its interval turned over alike, and quality on held-out text. With ``verifier`` (``[search] draft``: the trial's
    model drafts for the original's cell on the target) the speed and agreement are that cell's, generating
    speculatively; size and MACs stay the draft's."""
    g = (verifier or cell).generation
    s, t = [(r.ratio, r.low, r.high) if r is not None else None for r in (g.decode_speedup, g.ttft_ratio)]
    if (s is None or t is None) and variant not in report.variants and verifier is None:
        # Every optional pass off, and this cell is the run's reference: the original against itself.
        s = t = (1.0, 1.0, 1.0)
    if s is None or t is None:
        raise CompressError(f"the trial's model on {target}: no generation speed ratio to the original (a cell on "
                            "the reference target is the reference itself; search another target)")
    out: dict[str, Any] = {"decode_time_ratio": 1 / s[0], "decode_time_ratio_ci": [1 / s[2], 1 / s[1]],
                           "decode_speedup": s[0], "ttft_ratio": t[0], "ttft_ratio_ci": [t[1], t[2]],
                           "decode_tokens_per_s": g.decode_tokens_per_s, "ttft_ms": g.ttft_ms,
                           "size_mb": (cell.size_bytes or 0) / 1e6}
    quality = {"perplexity_rise": g.perplexity_rise, "perplexity": g.perplexity, "kl": g.kl,
               "top1_agreement": g.top1_agreement, "greedy_agreement": g.greedy_agreement}
    if verifier is not None:
        quality = {"greedy_agreement": g.greedy_agreement, "draft_acceptance": g.draft_acceptance,
                    "tokens_per_verifier_pass": g.tokens_per_verifier_pass}
    out.update({k: float(v) for k, v in quality.items() if v is not None})
    info = report.variants.get(variant)
    out["macs_ratio"] = _macs_ratio(list(info.passes.values()) if info is not None else [])
    out["threads"] = report.measurement.threads
    return out


def _macs_ratio(metas: list[dict[str, Any]]) -> float:
    """MACs of the trial's model / the original's: the passes' own ratios (channel pruning), or for a decoder the
    blocks' MACs per token after / before (prune.depth, prune.width; the LM head left out, as in Minitron's
    counts), multiplied; 1.0 when no pass changed the structure."""
    out = 1.0
    for m in metas:
        before, after = m.get("macs_per_token_before"), m.get("macs_per_token_after")
        if "macs_ratio" in m:
            out *= float(m["macs_ratio"])
        elif isinstance(before, dict) and isinstance(after, dict) and before.get("blocks"):
            out *= float(after["blocks"]) / float(before["blocks"])
    return out


def _structure_and_conditions(report: Report, variant: str, lat: Any, b: str) -> dict[str, Any]:
    """MACs/params ratios of the trial's model, and the conditions its latency was timed under
    (threads, other processes' load): two runs' figures are comparable only under like conditions."""
    # Whichever passes recorded a MACs/params ratio (structured pruning), multiplied; 1.0 when none did.
    info = report.variants.get(variant)
    metas = list(info.passes.values()) if info is not None else []
    out: dict[str, Any] = {"macs_ratio": _macs_ratio(metas),
                           "params_ratio": math.prod(float(m["params_ratio"]) for m in metas if "params_ratio" in m)}
    if lat.p50_ci:
        out["p50_ci"] = list(lat.p50_ci)
    out["threads"] = report.measurement.threads
    during = ((report.contention.during or {}) if report.contention is not None else {}).get(f"batch {b}")
    if during is not None:
        out["others_cores"] = during.others_cores
    return out


def evaluate_trial(rec: Recipe, out: Path, cache_dir: str | Path | None, target: str, batch: int,
                   needed: list[str]) -> dict[str, Any]:
    """Run one trial's recipe (cached steps are reused) and return its metrics, or why it failed."""
    from ..stages.pipeline import run as run_recipe

    try:
        report = run_recipe(rec, out_dir=out, cache_dir=cache_dir, progress=False, write=True)
        m = trial_metrics(report, rec.name, target, batch)
        missing = [o for o in needed if o not in m]
        if missing:
            raise CompressError(f"metric(s) {', '.join(missing)} could not be measured for this trial")
    except CompressError as e:
        return {"ok": False, "error": str(e).splitlines()[0][:500]}
    return {"ok": True, "metrics": m, "host": _host()}


def probe_recipe(rec: Recipe, batch: int, target: str) -> Recipe | None:
    """The trial's recipe without its training: passes that only train (``PassCaps.trains_only``:
    distill) left out, their training settings (``PassCaps.training_fields``) set to 0, and a
    short latency measurement at the search batch on the search target. Training changes weights,
    not shapes, so the probe's MACs, parameters, compiled size and latency are the trial's (its
    accuracy is not, and is not used). None when the trial has no training to save."""
    from ..core.registry import get_pass

    # Each pass's settings read by the names its capabilities declare (PassCaps).
    if any(getattr(p, f) is not None for p in rec.passes for f in get_pass(p.kind).caps.accuracy_fields):
        return None  # accuracy-controlled quantization picks its float nodes by the trained model's accuracy
    passes = []
    for p in rec.passes:
        caps = get_pass(p.kind).caps  # what the pass declares it trains
        if caps.trains_only:
            continue
        upd: dict[str, Any] = {f: 0 for f in caps.training_fields if getattr(p, f, 0)}
        passes.append(p.model_copy(update=upd) if upd else p)
    if passes == list(rec.passes):
        return None
    # A fidelity guard judges an untrained model here; it only refuses, it does not shape the model.
    passes = [p.model_copy(update=off) if (off := {f: None for f in get_pass(p.kind).caps.guard_fields
                                                     if getattr(p, f) is not None}) else p for p in passes]
    m = rec.measure
    fast = m.model_copy(update={"batch_sizes": [batch], "warmup": min(m.warmup, 2), "min_runs": min(m.min_runs, 15),
                                "min_time_s": min(m.min_time_s, 0.2)})
    return rec.model_copy(update={"passes": passes, "measure": fast,
                                  "targets": [t for t in rec.targets if t.kind == target]})


def probe_trial(rec: Recipe, out: Path, cache_dir: str | Path | None, target: str, batch: int) -> dict[str, Any]:
    """Build and time a probe recipe (see :func:`probe_recipe`); its structure metrics, or why it failed."""
    from ..stages.pipeline import run as run_recipe

    try:
        report = run_recipe(rec, out_dir=out, cache_dir=cache_dir, progress=False, write=False, aa_session=False)
        m = trial_metrics(report, rec.name, target, batch)
    except CompressError as e:
        return {"ok": False, "error": "probe (untrained): " + str(e).splitlines()[0][:480]}
    keep = (*PROBE_METRICS, *TIMED.values(), "threads")
    return {"ok": True, "metrics": {k: v for k, v in m.items() if k in keep}}


_Z95 = 1.959964


def _unwiden(ratio: float, low: float, high: float, d: float) -> list[float]:
    """The paired interval before :func:`compress.measuring.stats.widen` combined z * d into it (in quadrature)."""
    zd = _Z95 * d
    lo = math.sqrt(max(math.log(ratio / low) ** 2 - zd * zd, 0.0))
    hi = math.sqrt(max(math.log(high / ratio) ** 2 - zd * zd, 0.0))
    return [ratio * math.exp(-lo), ratio * math.exp(hi)]


def session_spread(trials: list[Any]) -> tuple[float, int]:
    """The between-session spread of latency (log scale) pooled over the search's finished trials.

    Each trial's run times the baseline in a second session beside the first (the A/A offset d);
    one run's interval is widened by its own single draw of d, which is often far below the
    spread (|d| of one draw is under a quarter of its standard deviation one time in five), so two
    runs of one trial disagreed beyond their intervals. A search has many draws: their root mean
    square estimates the spread with as many degrees of freedom as trials. (0, 0) without any."""
    # A repeated point's figures are its first trial's: one draw.
    ds = [float(t.user_attrs["aa_offset"]) for t in trials if t.state.name == "COMPLETE"
          and t.user_attrs.get("aa_offset") is not None and "repeat_of" not in t.user_attrs]
    if not ds:
        return 0.0, 0
    return math.sqrt(sum(d * d for d in ds) / len(ds)), len(ds)


def pooled_ci(attrs: dict[str, Any], spread: float) -> list[float] | None:
    """A trial's latency-ratio interval widened by the pooled session spread instead of its own draw."""
    raw, r = attrs.get("latency_ratio_ci_paired"), attrs.get("latency_ratio")
    if not raw or r is None or spread <= 0:
        return attrs.get("latency_ratio_ci")
    zd = _Z95 * spread
    lo = math.hypot(math.log(r / raw[0]), zd)
    hi = math.hypot(math.log(raw[1] / r), zd)
    return [r * math.exp(-lo), r * math.exp(hi)]


def _optimistic(probe: dict[str, Any], margin: float, spread: float = 0.0) -> dict[str, float]:
    """The best each probe metric could be in the trained trial: interval low ends, less the margin
    for timings (the probe is a separate, short session; the pooled session spread when that is
    wider), less 1% for the size."""
    out: dict[str, float] = {k: float(probe[k]) for k in ("macs_ratio", "params_ratio") if k in probe}
    if "size_mb" in probe:
        out["size_mb"] = float(probe["size_mb"]) * 0.99
    for k, ci in TIMED.items():
        if k in probe:
            out[k] = float((probe.get(ci) or [probe[k]])[0]) / max(1 + margin, math.exp(_Z95 * spread))
    return out


def hopeless(probe: dict[str, Any], spec: SearchSpec, limits: dict[str, float], feasible: list[Any],
             spread: float = 0.0) -> str | None:
    """Why a trial cannot help, judged from its untrained probe; None when it may.

    It cannot meet a constraint when even its optimistic figure is beyond the limit; it cannot
    join the front when every objective is known from the probe and a feasible finished trial is
    at least as good on all of them and better on one (with accuracy among the objectives, the
    probe cannot judge the front: training decides it)."""
    opt = _optimistic(probe, spec.probe_margin, spread)
    for c, lim in limits.items():
        if c in opt and opt[c] > lim:
            return (f"cannot meet {c} <= {lim:g}: the untrained probe measured {float(probe[c]):.4g} "
                    f"(at best {opt[c]:.4g}), before any training")
    if all(o in opt for o in spec.objectives):
        mine = [opt[o] for o in spec.objectives]
        for t in feasible:
            if all(v <= x for v, x in zip(t.values, mine, strict=True)) and list(t.values) != mine:
                return (f"dominated by trial {t.number} (" + ", ".join(f"{o} {v:.4g} vs at best {x:.4g}" for o, v, x
                                                                     in zip(spec.objectives, t.values, mine,
                                                                            strict=True)) + "), before any training")
    return None


def retime_trials(recs: dict[str, Recipe], out: Path, cache_dir: str | Path | None, target: str,
                  batch: int) -> dict[str, dict[str, Any]] | str:
    """Time several trials' models in one run, interleaved with the original (cached builds); each
    one's latency figures, or the error line."""
    from ..stages.pipeline import run as run_recipe

    first = next(iter(recs.values()))
    base = first.model_copy(update={"name": "front", "targets": [t for t in first.targets if t.kind == target],
                                    "measure": first.measure.model_copy(update={"batch_sizes": [batch]})})
    try:
        report = run_recipe(base, out_dir=out, cache_dir=cache_dir, progress=False, write=True,
                            variants={name: list(r.passes) for name, r in recs.items()})
        metrics = {name: trial_metrics(report, name, target, batch) for name in recs}
    except CompressError as e:
        return str(e).splitlines()[0][:300]
    keep = (*TIMED, *TIMED.values())
    return {name: {k: m[k] for k in keep if k in m} for name, m in metrics.items()}


def _host() -> str:
    import socket

    return socket.gethostname()
