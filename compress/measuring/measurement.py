"""Stage 3 of a run: measure. Each variant is compiled for each target (``Cell``), checked against
its input model (parity), timed interleaved with the others at every batch size (paired ratios with
intervals, an A/A session of the baseline for the noise), then scored on the validation data
(accuracy and fidelity to the original model).

Targets are told apart only by what they declare (``TargetCaps``): the reference target, one that
runs any batch, one that times on its device; never by name.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.artifact import ONNX, PYTORCH, Artifact
from ..core.cache import Cache
from ..core.capabilities import TargetCaps, refusal
from ..core.manager import PassContext
from ..core.registry import code_identity, get_pass
from ..core.registry import targets as registered_targets
from ..errors import CompressError, TargetUnavailable
from ..inputs.data import DataBundle
from ..quality.eval_cache import parity as cached_parity  # an evaluation made alike before is read, not made again
from ..quality.eval_cache import score
from ..quality.evaluate import fidelity, predict, predict_arrays, predict_feeds, top1
from ..reporting.report_schema import latency_key
from ..stages.execute import Variant
from ..stages.plan import BASELINE, REFERENCE, Plan
from ..stages.recipe import Recipe
from .measure import measure_interleaved, summarize
from .stats import bootstrap_stat, describe_ratio, ratio_ci, ratio_verdict, split_half_aa, widen

AA = "baseline~aa"  # a second session of the baseline, timed beside it: the between-session noise


@dataclass
class Cell:
    """One (variant, target) pair and everything measured on it."""

    variant: str
    target: str
    status: str = "ok"  # ok | unavailable | failed | skipped (nothing new to measure)
    reason: str | None = None
    compiled: Artifact | None = None
    runner: Any = None
    build_s: float | None = None
    cache_hit: bool = False
    latency: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None
    fidelity: dict[str, Any] | None = None
    size_bytes: int | None = None
    parity: dict[str, Any] | None = None  # compiled model vs its input model (for Q/DQ: vs the simulated model)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    identical_to: str | None = None  # "variant/target" whose compiled artifact has the same digest
    ratios: dict[str, Any] = field(default_factory=dict)  # batch -> latency ratio to the baseline, with interval
    reference: bool = False  # a stored baseline artifact, timed only (no accuracy)
    spawn: Any = None  # makes a second runner of the same build (the A/A session)
    caps: TargetCaps = field(default_factory=lambda: TargetCaps(consumes=ONNX))  # what the target declares
    # The remote device the cell ran on (a TVM RPC device, named by its runner); None: this machine. Its latency
    # is judged on the device's own clock and never divided by a figure from another device.
    device: str | None = None
    # A causal LM's figures (compress.measuring.measure_lm): perplexity, KL, agreement, time to first token, decode
    # tokens/s and their paired ratios to the reference cell. None for any other model.
    generation: dict[str, Any] | None = None
    guard: dict[str, Any] | None = None  # the accuracy guard's breach (quality.accuracy_guard), None: within
    artifact_dir: str | None = None  # the compiled model's folder in the run folder (compress.reporting.run_artifacts)


@dataclass
class Measurement:
    """What stage 3 produced: every cell, the thread count used and the machine's load while timing."""

    cells: list[Cell]
    threads: int
    threads_note: str | None
    contention: dict[str, Any]
    seq_own: int | None = None  # the model's own length along its dynamic axes (latency keys "B" are at it)


def measure(plan: Plan, variants: list[Variant], references: dict[str, Artifact] | None = None,
            aa_session: bool = True) -> Measurement:
    """Compile every variant for every target, time them interleaved, and score them."""
    from .contention import ContentionProbe, pick_threads

    rec, say = plan.recipe, plan.say
    # Look at the machine's load before building runners: with threads = 0 (auto) the thread count
    # leaves the cores other processes hold alone, so a thread pool does not wait on a core it
    # cannot get.
    probe = ContentionProbe(plan.threads)
    threads, threads_note = pick_threads(rec.measure.threads, os.cpu_count() or 1, probe.before())
    probe.threads = threads
    if "before" in probe.readings:
        probe.readings["before"]["threads"] = threads  # judged against the count actually used
    if threads_note:
        say(threads_note)
    torch.set_num_threads(threads)
    if plan.ctx.text is not None:  # a causal LM: generation timed and scored on held-out text
        from .measure_lm import measure_generation

        cells, threads, how = measure_generation(plan, variants, threads, say)
        return Measurement(cells, threads, how, probe.report(), None)
    cells = _build_cells(variants, plan.targets, plan.ctx, say)
    cells += _reference_cells(references or {}, plan.targets, say)
    try:
        _measure_latency(cells, plan.root, rec, threads, plan.progress, say, probe, aa_session)
        score(plan, cells, variants, _declared_kind(rec, plan.root), _measure_accuracy)  # through the evaluation cache
    finally:
        for c in cells:
            if c.runner is not None:
                c.runner.close()
    contention = probe.report()
    for w in contention["warnings"]:
        say(f"WARNING {w}")
    return Measurement(cells, threads, threads_note, contention, own_seq(plan.root))


def _declared_kind(rec: Recipe, root: Artifact) -> str:
    """The output kind the recipe settles: measure.output_kind, else a Hugging Face task head's, else "auto"."""
    kind: str = rec.measure.output_kind
    if kind == "auto" and root.metadata.get("task"):  # a Hugging Face task head says what its output is
        from ..inputs.hf import task_output_kind

        kind = task_output_kind(str(root.metadata["task"]))
    return kind


def planned_output_kind(rec: Recipe, root: Artifact) -> tuple[str, str]:
    """(kind, why) of the fidelity a run of ``rec`` will measure, found before it runs (``compress check``
    refuses a budget on a figure the run would not produce): declared, the task head's, else inferred as
    the measurement does, from the original model's output on synthetic inputs (its shape; for an ONNX
    model also its name)."""
    from ..quality.fidelity import infer_kind

    kind = _declared_kind(rec, root)
    if kind != "auto":
        return kind, ("declared in the recipe (measure.output_kind)" if rec.measure.output_kind != "auto"
                      else f"the model's task {root.metadata.get('task')!r}")
    feeds = _feeds(root, 2, rec.seed)
    name: str | None = None
    try:
        if root.kind == PYTORCH:
            with torch.no_grad():
                from ..inputs.torch_io import load_torch

                out: Any = load_torch(root)(*(torch.from_numpy(a) for a in feeds.values()))
            out = out[0] if isinstance(out, (tuple, list)) else out
            ref = out.detach().cpu().numpy()
        else:
            from .ort import ort_session

            sess = ort_session(root.path / "model.onnx")
            name = sess.get_outputs()[0].name
            ref = sess.run(None, dict(zip((i.name for i in sess.get_inputs()), feeds.values(), strict=False)))[0]
    except CompressError:
        raise
    except Exception as e:  # the model itself fails: the run would too, with the same message
        raise CompressError(f"the model failed on synthetic inputs while finding its output kind: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return infer_kind(np.asarray(ref), name, "auto")


def _compile(target: Any, art: Artifact, ctx: PassContext) -> tuple[Artifact, bool, float]:
    # The target's code identity is in the key: editing a target rebuilds exactly its entries.
    key = Cache.key(art.digest, f"target:{target.name}", 1, target.config.canonical(),
                    extra={**target.fingerprint(), "code": code_identity(type(target).__module__)})
    hit = ctx.cache.get(key)
    if hit is not None:
        return hit, True, 0.0
    t0 = time.perf_counter()
    out = target.compile(art, ctx)
    secs = time.perf_counter() - t0
    out.parent = art.digest
    out.producer = f"compile {target.name}"
    out.metadata = {**art.metadata, **out.metadata, "build_s": secs}
    if out.facts is None:  # a build keeps its input's facts unless the target says otherwise
        out.facts = art.known_facts()
    return ctx.cache.put(key, out), False, secs


def _affinity() -> set[int] | None:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def restore_affinity(saved: set[int] | None, who: str, say: Callable[[str], None]) -> bool:
    """Put this thread's CPU mask back if a runtime narrowed it; True when it had to.

    A runtime that pins the calling thread (TVM's pool did, see the tvm target) confines every thread
    the process starts afterwards, other targets' thread pools included, and the main thread that takes
    part in their work: every later figure of the run would be measured on fewer cores than it says.
    """
    now = _affinity()
    if saved is None or now is None or now == saved:
        return False
    os.sched_setaffinity(0, saved)
    say(f"warning: {who} narrowed this process's CPU mask to {sorted(now)}; restored to {sorted(saved)} so "
        "other targets are not timed on fewer cores")
    return True


def _dynamic_batch(art: Artifact | None) -> bool:
    """Whether a compiled model takes any batch size (its facts say so; unknown counts as no)."""
    return art is None or bool(art.known_facts().dynamic_batch)


def new_cell(t: Any, v: Variant, variants: list[Variant], unavailable: str | None,
             say: Callable[[str], None]) -> tuple[Cell, Artifact | None]:
    """The cell of variant ``v`` on target ``t`` and the model to build it from; None, with the cell's status
    and reason set, when there is nothing to build: the target cannot run here (``unavailable``), the chain made
    no model the target consumes, the build would re-measure the baseline's own model, or the target refuses
    the model's facts. Shared by every stage-3 builder (latency cells here, generation cells in measure_lm)."""
    cell = Cell(v.name, t.name, config=t.config.canonical(), caps=t.caps)
    src = v.torch_art if t.caps.consumes == PYTORCH else v.onnx_art
    if unavailable is not None:
        cell.status, cell.reason = "unavailable", unavailable
        return cell, None
    if src is None:
        cell.status = "unavailable"
        cell.reason = ("no PyTorch model (the run started from an ONNX file)" if t.caps.consumes == PYTORCH
                       else "the pipeline produced no ONNX model")
        return cell, None
    if t.caps.consumes == PYTORCH and v.onnx_art is not None and v.steps:
        onnx_after = [r.kind for r in v.steps if get_pass(r.kind).consumes == ONNX]
        base_torch = variants[0].torch_art
        if onnx_after and v is not variants[0] and base_torch is not None and src.digest == base_torch.digest:
            # Measuring the baseline's own model again would only show noise as a "speed-up".
            cell.status = "skipped"
            cell.reason = (f"same PyTorch model as the baseline ({', '.join(onnx_after)} acts on the ONNX "
                           "model only)")
            return cell, None
        if onnx_after:
            cell.notes.append(f"measures the PyTorch model before the ONNX passes ({', '.join(onnx_after)})")
    refused = refusal(t.caps, src.known_facts(), t.name)
    if refused is not None:  # the artifact needs what the target does not have: say so, build nothing
        able = [k for k, (_, cls) in registered_targets().items()
                if cls.caps.consumes == t.caps.consumes and refusal(cls.caps, src.known_facts(), k) is None]
        cell.status, cell.reason = "failed", f"refused: {refused}" + (
            f"; targets that can run it: {', '.join(able)}" if able else "")
        say(f"compile {v.name} for {t.name}: {cell.reason}")
        return cell, None
    return cell, src


def _build_cells(variants: list[Variant], targets: list[Any], ctx: PassContext,
                 say: Callable[[str], None]) -> list[Cell]:
    cells = []
    mask = _affinity()
    for t in targets:
        reason = t.unavailable_reason()
        for v in variants:
            cell, src = new_cell(t, v, variants, reason, say)
            cells.append(cell)
            if src is None:
                continue
            try:
                compiled, hit, secs = _compile(t, src, ctx)
                cell.compiled, cell.cache_hit = compiled, hit
                cell.build_s = compiled.metadata.get("build_s", secs)
                cell.size_bytes = src.size_bytes() if t.caps.consumes == PYTORCH else compiled.size_bytes()
                cell.notes += list(compiled.metadata.get("target_notes", []))  # kept if it cannot run here
                cell.runner = t.runner(compiled, threads=torch.get_num_threads())
                if v is variants[0]:
                    cell.spawn = (lambda t=t, comp=compiled: t.runner(comp, threads=torch.get_num_threads()))
                say(f"compile {v.name} for {t.name}: {'cache hit' if hit else f'{secs:.1f}s'}")
                _check_target_parity(cell, t, src, compiled, ctx, say)
                if restore_affinity(mask, f"target {t.name}", say):
                    cell.notes.append("this target's runtime narrowed the process's CPU mask; restored after its "
                                      "build")
            except TargetUnavailable as e:
                cell.status, cell.reason = "unavailable", str(e)
            except CompressError as e:
                # One target failing must not stop the others: the report shows why.
                cell.status, cell.reason = "failed", str(e)
                say(f"compile {v.name} for {t.name}: failed: {e}")
    return cells


def own_seq(root: Artifact) -> int | None:
    """The model's own length along its dynamic (non-batch) axes, or None when it has none."""
    return next((s.shape[ax] for s in root.inputs for ax, _ in s.dynamic_axes if 0 < ax < len(s.shape)), None)


def _feeds(root: Artifact, batch: int, seed: int, seq: int | None = None) -> dict[str, np.ndarray]:
    """Synthetic inputs at ``batch`` (and sequence length ``seq`` along the dynamic axes, if given)."""
    g = np.random.default_rng(seed)
    feeds = {}
    for s in root.inputs:
        shape = (batch, *s.shape[1:])
        if seq is not None and s.dynamic_axes:
            shape = tuple(seq if i in dict(s.dynamic_axes) else n for i, n in enumerate(shape))
            s = dataclasses.replace(s, shape=shape)
        if np.issubdtype(np.dtype(s.dtype), np.floating):
            feeds[s.name] = g.standard_normal(shape).astype(s.dtype)
        else:  # token ids within the vocabulary, masks of ones (see torch_io.sample_inputs)
            from ..inputs.torch_io import sample_inputs

            feeds[s.name] = sample_inputs((s,), batch=batch, seed=seed)[0].numpy()
    return feeds


def _reference_cells(references: dict[str, Artifact], targets: list[Any],
                     say: Callable[[str], None]) -> list[Cell]:
    """Cells for stored baseline artifacts (already compiled): timed beside the candidates."""
    cells = []
    by_name = {t.name: t for t in targets}
    for tname, art in references.items():
        t = by_name.get(tname)
        if t is None:
            continue
        cell = Cell(REFERENCE, tname, config=t.config.canonical(), compiled=art, reference=True, cache_hit=True,
                    caps=t.caps)
        cells.append(cell)
        reason = t.unavailable_reason()
        if reason is not None:
            cell.status, cell.reason = "unavailable", reason
            continue
        try:
            cell.size_bytes = art.size_bytes()
            cell.runner = t.runner(art, threads=torch.get_num_threads())
            say(f"recorded baseline for {tname}: artifact {art.digest[:12]} loaded, timed in this run")
        except TargetUnavailable as e:
            cell.status, cell.reason = "unavailable", str(e)
        except CompressError as e:
            cell.status, cell.reason = "failed", f"the stored baseline artifact could not be loaded: {e}"
    return cells


def _measure_latency(cells: list[Cell], root: Artifact, rec: Recipe, threads: int, progress: bool,
                     say: Callable[[str], None], probe: Any = None, aa_session: bool = True) -> None:
    live = [c for c in cells if c.status == "ok"]
    # Byte-identical builds on one target are timed once: racing a build against itself only
    # measures noise (and order), which once read as a "124x" speed-up.
    first: dict[tuple[str, str], Cell] = {}
    for c in live:
        dkey = (c.target, c.compiled.digest if c.compiled is not None else "")
        if dkey in first and dkey[1]:
            c.identical_to = f"{first[dkey].variant}/{c.target}"
            c.notes.append(f"identical build to {c.identical_to} (same compiled digest {dkey[1][:12]}): "
                           "timed once, not raced against itself")
        else:
            first[dkey] = c
    timed = [c for c in live if c.identical_to is None]
    shadows: dict[str, Any] = {}
    if aa_session:
        for c in timed:
            if c.spawn is None:
                continue
            try:
                shadows[c.target] = c.spawn()
            except Exception as e:  # the noise estimate is extra; its absence is noted
                c.notes.append(f"A/A session not measured: {str(e).splitlines()[0]}")
    try:
        _time_batches(timed, shadows, root, rec, threads, progress, say, probe)
    finally:
        for r in shadows.values():
            r.close()
    for c in live:
        rep_cell = next((o for o in live if c.identical_to == f"{o.variant}/{o.target}"), None)
        if rep_cell is not None and rep_cell.status != "ok":
            c.status = rep_cell.status
            c.reason = f"identical build to {c.identical_to} ({rep_cell.status}: {rep_cell.reason})"
    live = [c for c in live if c.status == "ok"]
    by_key = {f"{c.variant}/{c.target}": c for c in live}
    for c in live:
        if c.identical_to is not None:
            rep = by_key[c.identical_to].latency
            c.latency = {b: {**lat, "identical_to": c.identical_to} for b, lat in rep.items()}
            c.device = by_key[c.identical_to].device
    _ratios(live, rec.seed, say)


def _time_batches(timed: list[Cell], shadows: dict[str, Any], root: Artifact, rec: Recipe, threads: int,
                  progress: bool, say: Callable[[str], None], probe: Any) -> None:
    """Time every candidate at every batch size (and sequence length of measure.seq_lens), interleaved
    (with the baselines' A/A sessions). Each shape is its own interleaved measurement, as each batch is."""
    own = own_seq(root)
    # None: the model's own input shape (latency key "B"); other lengths are keyed "B/sS".
    seqs: list[int | None] = [None, *[s for s in dict.fromkeys(rec.measure.seq_lens or []) if s != own]]
    for batch, seq in ((b, s) for b in rec.measure.batch_sizes for s in seqs):
        key_ = latency_key(batch, seq)
        at = f"batch {batch}" + (f", sequence {seq}" if seq is not None else "")
        fns = {}
        for c in timed:
            if batch > 1 and not c.caps.any_batch and not _dynamic_batch(c.compiled):
                if seq is None:
                    c.notes.append(f"batch {batch} skipped: the model has a fixed batch size of 1")
                continue
            feeds = _feeds(root, batch, rec.seed, seq)
            renamed = dict(zip(c.runner.input_names, feeds.values(), strict=False))
            try:  # one untimed call first: a candidate that cannot infer fails alone, with its reason
                c.runner.infer(renamed)
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                if seq is not None:
                    # A build fixed to the model's own length (a static-shape compiler) runs that shape only.
                    c.notes.append(f"{at} not measured: inference failed ({why[:200]})")
                    continue
                c.status, c.reason = "failed", f"inference failed at batch {batch}: {why}"
                say(f"{c.variant}/{c.target}: {c.reason}")
                continue
            fns[(c.variant, c.target)] = (lambda r=c.runner, f=renamed: r.infer(f))
            if c.target in shadows and c.variant == BASELINE:
                fns[(AA, c.target)] = (lambda r=shadows[c.target], f=renamed: r.infer(f))
        timed = [c for c in timed if c.status == "ok"]
        if not fns:
            continue
        say(f"latency at {at}: {len(fns)} candidates interleaved (order shuffled per round, "
            f"seed {rec.seed + batch}), {threads} thread(s)")
        for c in timed:  # runners that time on the device (TensorRT: CUDA events) keep a list per call
            if c.caps.device_timing:
                c.runner.device_ms.clear()
                if c.variant == BASELINE and c.target in shadows and _remote(shadows[c.target]):
                    shadows[c.target].device_ms.clear()
        if probe is not None:
            probe.start()
        try:
            timing = measure_interleaved(
                {f"{v}/{t}": fn for (v, t), fn in fns.items()}, rec.measure.warmup, rec.measure.min_runs,
                rec.measure.min_time_s, rec.measure.max_time_s, progress=progress,
                desc=f"latency b{batch}" + (f" s{seq}" if seq is not None else ""), seed=rec.seed + batch)
        except Exception as e:  # a runtime failure mid-measurement is reported per cell below
            raise CompressError(f"latency measurement at {at} failed: {e}") from e
        finally:
            if probe is not None:
                probe.stop(at)
        samples = timing.samples
        meta = timing.meta()
        for c in timed:
            key = f"{c.variant}/{c.target}"
            if samples.get(key):
                # Raw samples stay in the report: the budget gate bootstraps intervals from them.
                s = samples[key]
                lat: dict[str, Any] = {**summarize(s, batch).model_dump(), "samples_ms": [round(x, 5) for x in s],
                                       "timing": meta}
                if len(s) >= 2:
                    _, lo, hi = bootstrap_stat(s, "p50", 0.95, 1000, seed=rec.seed)
                    lat["p50_ci"] = [round(lo, 5), round(hi, 5)]
                twin = samples.get(f"{AA}/{c.target}") if c.variant == BASELINE else None
                if twin and len(twin) >= 2 and len(s) >= 2:
                    lat["aa_session"] = ratio_ci(twin, s, "p50", seed=rec.seed).to_json()
                if key in timing.capped:
                    lat["capped"] = timing.capped[key]
                    c.notes.append(f"{at}: fewer rounds: {timing.capped[key]}")
                c.latency[key_] = lat
                gpu = c.runner.device_ms if c.caps.device_timing else None
                if gpu and _remote(c.runner):
                    c.latency[key_]["device"] = _remote_device_latency(c, gpu, len(s), batch, twin_runner=(
                        shadows.get(c.target) if c.variant == BASELINE else None), seed=rec.seed)
                elif gpu:
                    # Device time (CUDA events), beside the host wall time above (warm-up calls included); the
                    # runner names the device it came from.
                    c.latency[key_]["device"] = {
                        **summarize(list(gpu), batch).model_dump(),
                        "measured_on": getattr(c.runner, "device_name", "this machine's GPU (CUDA events)")}


def _remote(runner: Any) -> bool:
    """A runner on a remote device (TVM RPC): its host wall times include the network round trip."""
    return bool(getattr(runner, "remote", False))


def _remote_device_latency(c: Cell, device_ms: list[float], rounds: int, batch: int, twin_runner: Any,
                           seed: int) -> dict[str, Any]:
    """A remote cell's latency on the device's own clock: the timed rounds only (the last ``rounds`` calls,
    one per round, in round order), kept raw so that ratios and budgets pair them round by round with
    another cell timed on the same device; the baseline's A/A session on the device's clock beside it."""
    c.device = str(c.runner.device_name)
    own = [float(x) for x in device_ms[-rounds:]]
    out: dict[str, Any] = {**summarize(own, batch).model_dump(), "measured_on": c.device,
                           "samples_ms": [round(x, 5) for x in own]}
    twin = list(twin_runner.device_ms[-rounds:]) if twin_runner is not None and _remote(twin_runner) else []
    if len(twin) >= 2 and len(own) >= 2:
        out["aa_session"] = ratio_ci(twin, own, "p50", seed=seed).to_json()
    note = (f"timed on the device through the {c.device}: its latency ratios and budgets use the device's own "
            "clock (latency.B.device); the host figures (samples_ms, p50 in the table) include the RPC round trip "
            "and are never compared with figures from another device")
    for n in [note, *getattr(c.runner, "device_notes", [])]:
        if n not in c.notes:
            c.notes.append(n)
    return out


def _ratios(live: list[Cell], seed: int, say: Callable[[str], None]) -> None:
    """Per target and batch: each variant's p50 latency ratio to the baseline, paired over rounds,
    with its interval; the baseline's split-half A/A (the noise floor). Slower anywhere is flagged.

    A cell timed on a remote device is compared on that device's clock, and only with a baseline timed
    on the same device: a device figure is never divided by a host figure."""
    base = {c.target: c for c in live if c.variant == BASELINE}
    for c in live:
        b = base.get(c.target)
        for batch, lat in c.latency.items():
            if c is b:
                aa = split_half_aa(lat["samples_ms"], seed=seed)
                if aa is not None:
                    lat["aa"] = aa.to_json()
                dev = lat.get("device") or {}
                if dev.get("samples_ms") and (aa := split_half_aa(dev["samples_ms"], seed=seed)) is not None:
                    dev["aa"] = aa.to_json()
                continue
            if b is None or batch not in b.latency:
                continue
            if c.identical_to == f"baseline/{c.target}":
                c.ratios[batch] = {"ratio": 1.0, "low": 1.0, "high": 1.0, "identical": True,
                                   "verdict": "identical", "text": describe_ratio(None, identical=True)}
                continue
            num, den, aa_s = lat["samples_ms"], b.latency[batch]["samples_ms"], b.latency[batch].get("aa_session")
            if c.device is not None or b.device is not None:
                mine, theirs = (lat.get("device") or {}), (b.latency[batch].get("device") or {})
                if c.device != b.device or not mine.get("samples_ms") or not theirs.get("samples_ms"):
                    c.ratios[batch] = {"verdict": "not comparable", "text": (
                        f"no ratio: timed on {c.device or 'this machine'}, the baseline on "
                        f"{b.device or 'this machine'}; figures from two devices are not a same-run comparison")}
                    continue
                num, den, aa_s = mine["samples_ms"], theirs["samples_ms"], theirs.get("aa_session")
            try:
                r = widen(ratio_ci(num, den, "p50", seed=seed), aa_s)
            except ValueError as e:
                c.ratios[batch] = {"verdict": "not enough rounds", "text": f"no ratio: {e}"}
                continue
            c.ratios[batch] = {**r.to_json(), "identical": False, "verdict": ratio_verdict(r),
                               "text": describe_ratio(r) + (" (device clock)" if c.device is not None else "")}
            if r.low > 1.0 and c.variant != REFERENCE:
                msg = (f"SLOWER than the baseline at batch {batch}: latency x{r.ratio:.2f} "
                       f"[{r.low:.2f}, {r.high:.2f}] (p50, 95% interval)")
                c.notes.append(msg)
                say(f"WARNING {c.variant}/{c.target}: {msg}")


def _output_name(variants: list[Variant]) -> str | None:
    """The first output's name in the baseline's ONNX graph (a hint to what the output is), if there is one."""
    art = variants[0].onnx_art if variants else None
    if art is None:
        return None
    try:
        import onnx

        return str(onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph.output[0].name)
    except Exception:  # only a hint: an unreadable graph is reported by the targets that load it
        return None


def _measure_accuracy(cells: list[Cell], variants: list[Variant], data: DataBundle | None, root: Artifact,
                      say: Callable[[str], None], output_kind: str = "auto", metric: str | None = None,
                      ref_outputs: np.ndarray | None = None) -> np.ndarray | None:
    """Top-1 on the validation split and fidelity to the original model on the reference target.

    Fidelity is measured the way the output calls for (compress.quality.fidelity): argmax agreement for
    logits, per-sample cosine for embeddings, SNR for regression, plus the user's metric if named.
    ``ref_outputs``: the reference's outputs the evaluation cache kept (not run again); returns the reference's.
    """
    from ..quality.fidelity import SYNTHETIC_SAMPLES, infer_kind, load_metric, run_metric

    metric_fn = load_metric(metric) if metric else None
    kind: str | None = None
    ref: np.ndarray | None = None
    xs: np.ndarray | None = None
    if data is None:
        # No data: fidelity on seeded random inputs only; accuracy stays "not measured".
        all_feeds = _feeds(root, SYNTHETIC_SAMPLES, 1234)
        xs = all_feeds[root.inputs[0].name]
    ref_cell = next((c for c in cells if c.variant == BASELINE and c.status == "ok"
                     and c.caps.reference), None) or next(
        (c for c in cells if c.variant == BASELINE and c.status == "ok"), None)
    ordered = ([ref_cell] if ref_cell else []) + [c for c in cells if c is not ref_cell]
    for c in ordered:
        if c.status != "ok" or c.reference:
            continue
        bs = 64 if (c.caps.any_batch or _dynamic_batch(c.compiled)) else 1
        try:
            if c is ref_cell and ref_outputs is not None:
                logits = ref_outputs
            elif data is not None and data.input_names:  # one named array per model input
                logits = predict_feeds(c.runner, data.feeds(data.val), bs)
            elif data is not None:
                logits = predict(c.runner, data, data.val, bs)
            elif len(root.inputs) > 1:  # several named inputs (token ids and a mask): synthetic, valid values
                logits = predict_feeds(c.runner, all_feeds, bs)
            else:
                assert xs is not None  # set above whenever there is no data
                logits = predict_arrays(c.runner, xs, bs)
        except Exception as e:  # report the failing target instead of aborting the run
            c.status, c.reason = "failed", f"inference on the validation data failed: {str(e).splitlines()[0]}"
            continue
        if c is ref_cell:
            ref = logits
            kind, why = infer_kind(ref, _output_name(variants), output_kind)
            say(f"fidelity as {kind} ({why})")
        if data is not None and data.labelled and (kind or "logits") == "logits":
            c.accuracy = top1(logits, data.val.y)  # type: ignore[arg-type]
        if ref is not None:
            c.fidelity = fidelity(ref, logits, kind or "logits")
            if metric_fn is not None and metric is not None:
                labels = data.val.y if data is not None else None
                c.fidelity["metric"] = run_metric(metric_fn, metric, ref, logits, labels)
            if c is ref_cell and c.fidelity.get("degenerate"):
                say(f"WARNING fidelity: {c.fidelity['degenerate']}")
    if ref_cell is not None:
        say(f"fidelity reference: baseline on {ref_cell.target}")
    return ref


def _check_target_parity(cell: Cell, target: Any, src: Artifact, compiled: Artifact, ctx: PassContext,
                         say: Callable[[str], None]) -> None:
    """The compiled model against its input ONNX model on the same inputs (``compress.quality.parity``); a breach, or
    an inference that fails while checking, fails the cell with one line. The eager PyTorch target is
    itself the reference, so it has nothing to check."""
    if target.caps.reference or target.caps.consumes != ONNX:
        return
    from ..quality.parity import model_precision, target_parity

    precision = model_precision(src)
    coarsen = getattr(target, "parity_precision", None)  # e.g. TensorRT building FP32 with TF32 or FP16 kernels
    if callable(coarsen):
        precision = coarsen(src, precision)
    batch = (min(16, int(getattr(target.config, "max_batch", 16))) if _dynamic_batch(compiled)
             else src.inputs[0].shape[0])
    try:
        cell.parity = cached_parity(ctx.cache, cell, target, src.digest, precision, batch, ctx.data, ctx.seed, lambda: (
            target_parity(src, cell.runner.infer, ctx.data, target.config, precision, batch, ctx.seed)))
    except Exception as e:  # the runner raising is a failed inference of this cell, not of the run
        cell.status, cell.reason = "failed", f"inference failed during the parity check: {str(e).splitlines()[0]}"
    else:
        if cell.parity["ok"] is None:
            cell.notes.append(f"parity NOT checked: {cell.parity['reason']}")
        elif not cell.parity["ok"]:
            cell.status, cell.reason = "failed", f"parity: {cell.parity['reason']}"
    if cell.status == "failed":
        say(f"compile {cell.variant} for {cell.target}: failed: {cell.reason}")
        cell.runner.close()
        cell.runner = None


