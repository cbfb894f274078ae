"""Stage 3, timing: every built cell timed interleaved with the others at every batch size (and sequence
length), an A/A session of the baseline beside it for the between-session noise, then each cell's latency
ratio to the baseline (asked of ``compress.measuring.compare``, which owns every such decision)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.artifact import Artifact
from ..core.protocols import DeviceRunner
from ..errors import CompressError
from ..inputs.feeds import own_seq, synthetic_feeds
from ..reporting.report_schema import BatchLatency, DeviceLatency, MeasuredRatio, TimingInfo, latency_key
from ..stages.plan import BASELINE, REFERENCE
from ..stages.recipe import Recipe
from .cell import Cell, Live
from .compare import CellRef, compare, device_noise_floor, host_noise_floor, same_build, sample_ratio
from .measure import Timing, measure_interleaved, summarize
from .measure_build import dynamic_batch
from .stats import bootstrap_stat

AA = "baseline~aa"  # a second session of the baseline, timed beside it: the between-session noise


def measure_latency(cells: list[Cell], live: Live, root: Artifact, rec: Recipe, threads: int, progress: bool,
                    say: Callable[[str], None], probe: Any = None, aa_session: bool = True) -> None:
    """Time the built cells (identical builds once) and set each one's ratios to the baseline."""
    ok = [c for c in cells if c.status == "ok"]
    _mark_identical(ok)
    timed = [c for c in ok if c.identical_to is None]
    shadows: dict[str, Any] = _aa_sessions(timed, live) if aa_session else {}
    try:
        _time_batches(timed, live, shadows, root, rec, threads, progress, say, probe)
    finally:
        for r in shadows.values():
            r.close()
    ratios(_follow_identical(ok), rec.seed, say)


def _mark_identical(live: list[Cell]) -> None:
    """Byte-identical builds on one target are timed once: racing a build against itself only measures noise
    (and order), which once read as a "124x" speed-up."""
    first: list[Cell] = []
    for c in live:
        twin = next((o for o in first if o.target == c.target and c.compiled_digest and same_build(c, o)), None)
        if twin is None:
            first.append(c)
            continue
        c.identical_to = twin.ref
        c.notes.append(f"identical build to {c.identical_to} (same compiled digest {str(c.compiled_digest)[:12]}): "
                       "timed once, not raced against itself")


def _aa_sessions(timed: list[Cell], live: Live) -> dict[str, Any]:
    """A second runner of each baseline build (per target): its A/A session."""
    shadows: dict[str, Any] = {}
    for c in timed:
        spawn = live.spawns.get(c.ref)
        if spawn is None:
            continue
        try:
            shadows[c.target] = spawn()
        except Exception as e:  # the noise estimate is extra; its absence is noted
            c.notes.append(f"A/A session not measured: {str(e).splitlines()[0]}")
    return shadows


def _follow_identical(live: list[Cell]) -> list[Cell]:
    """An identical build takes the status and the figures of the build that was timed for it."""
    by_ref = {c.ref: c for c in live}
    for c in live:
        rep = by_ref.get(c.identical_to) if c.identical_to is not None else None
        if rep is not None and rep.status != "ok":
            c.status = rep.status
            c.reason = f"identical build to {c.identical_to} ({rep.status}: {rep.reason})"
    live = [c for c in live if c.status == "ok"]
    for c in live:
        if c.identical_to is not None:
            rep = by_ref[c.identical_to]
            c.latency = {b: lat.model_copy(update={"identical_to": str(c.identical_to)})
                         for b, lat in rep.latency.items()}
            c.device = rep.device
    return live


def _time_batches(timed: list[Cell], live: Live, shadows: dict[str, Any], root: Artifact, rec: Recipe, threads: int,
                  progress: bool, say: Callable[[str], None], probe: Any) -> None:
    """Time every candidate at every batch size (and sequence length of measure.seq_lens), interleaved
    (with the baselines' A/A sessions). Each shape is its own interleaved measurement, as each batch is."""
    own = own_seq(root)
    # None: the model's own input shape (latency key "B"); other lengths are keyed "B/sS".
    seqs: list[int | None] = [None, *[s for s in dict.fromkeys(rec.measure.seq_lens or []) if s != own]]
    for batch, seq in ((b, s) for b in rec.measure.batch_sizes for s in seqs):
        at = f"batch {batch}" + (f", sequence {seq}" if seq is not None else "")
        fns = _calls(timed, live, shadows, root, rec.seed, batch, seq, at, say)
        timed = [c for c in timed if c.status == "ok"]
        if not fns:
            continue
        say(f"latency at {at}: {len(fns)} candidates interleaved (order shuffled per round, "
            f"seed {rec.seed + batch}), {threads} thread(s)")
        _clear_device_clocks(timed, live, shadows)
        if probe is not None:
            probe.start()
        try:
            timing = measure_interleaved(
                {str(ref): fn for ref, fn in fns.items()}, rec.measure.warmup, rec.measure.min_runs,
                rec.measure.min_time_s, rec.measure.max_time_s, progress=progress,
                desc=f"latency b{batch}" + (f" s{seq}" if seq is not None else ""), seed=rec.seed + batch)
        except Exception as e:  # a runtime failure mid-measurement is reported per cell below
            raise CompressError(f"latency measurement at {at} failed: {e}") from e
        finally:
            if probe is not None:
                probe.stop(at)
        for c in timed:
            _record(c, live[c], timing, latency_key(batch, seq), at, batch, shadows, rec.seed)


def _calls(timed: list[Cell], live: Live, shadows: dict[str, Any], root: Artifact, seed: int, batch: int,
           seq: int | None, at: str, say: Callable[[str], None]) -> dict[CellRef, Callable[[], Any]]:
    """One timed call per candidate at this shape, after one untimed call: a candidate that cannot infer
    fails alone, with its reason (at another sequence length than the model's own: that shape is skipped)."""
    fns: dict[CellRef, Callable[[], Any]] = {}
    for c in timed:
        if batch > 1 and not c.caps.any_batch and not dynamic_batch(c.compiled):
            if seq is None:
                c.notes.append(f"batch {batch} skipped: the model has a fixed batch size of 1")
            continue
        feeds = synthetic_feeds(root, batch, seed, seq)
        renamed = dict(zip(live[c].input_names, feeds.values(), strict=False))
        try:
            live[c].infer(renamed)
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if seq is not None:
                # A build fixed to the model's own length (a static-shape compiler) runs that shape only.
                c.notes.append(f"{at} not measured: inference failed ({why[:200]})")
                continue
            c.status, c.reason = "failed", f"inference failed at batch {batch}: {why}"
            say(f"{c.ref}: {c.reason}")
            continue
        fns[c.ref] = _call(live[c], renamed)
        if c.target in shadows and c.variant == BASELINE:
            fns[CellRef(AA, c.target)] = _call(shadows[c.target], renamed)
    return fns


def _call(runner: Any, feeds: dict[str, Any]) -> Callable[[], Any]:
    return lambda: runner.infer(feeds)


def _clear_device_clocks(timed: list[Cell], live: Live, shadows: dict[str, Any]) -> None:
    """Runners that time on the device (TensorRT: CUDA events) keep a list per call: start each shape empty."""
    for c in timed:
        if c.caps.device_timing:
            live[c].device_ms.clear()
            if c.variant == BASELINE and c.target in shadows and _remote(shadows[c.target]):
                shadows[c.target].device_ms.clear()


def _record(c: Cell, runner: Any, timing: Timing, key: str, at: str, batch: int, shadows: dict[str, Any],
            seed: int) -> None:
    """The cell's latency at this shape from the interleaved timing: raw samples kept (the budget gate
    bootstraps intervals from them), the baseline's A/A session beside its own, the device's clock if any."""
    s = timing.samples.get(str(c.ref))
    if not s:
        return
    lat = BatchLatency(**summarize(s, batch).model_dump(), samples_ms=[round(x, 5) for x in s],
                       timing=TimingInfo.model_validate(timing.meta()))
    if len(s) >= 2:
        _, lo, hi = bootstrap_stat(s, "p50", 0.95, 1000, seed=seed)
        lat.p50_ci = (round(lo, 5), round(hi, 5))
    twin = timing.samples.get(str(CellRef(AA, c.target))) if c.variant == BASELINE else None
    if twin and len(twin) >= 2 and len(s) >= 2:
        lat.aa_session = sample_ratio(twin, s, "p50", seed=seed)
    if str(c.ref) in timing.capped:
        lat.capped = timing.capped[str(c.ref)]
        c.notes.append(f"{at}: fewer rounds: {lat.capped}")
    gpu = runner.device_ms if c.caps.device_timing else None
    if gpu and _remote(runner):
        lat.device = _remote_device_latency(c, runner, len(s), batch, twin_runner=(
            shadows.get(c.target) if c.variant == BASELINE else None), seed=seed)
    elif gpu:
        # Device time (CUDA events), beside the host wall time above (warm-up calls included); the runner names
        # the device it came from.
        lat.device = DeviceLatency(**summarize(list(gpu), batch).model_dump(), measured_on=runner.device_name)
    c.latency[key] = lat


def _remote(runner: DeviceRunner) -> bool:
    """A runner on a remote device (TVM RPC): its host wall times include the network round trip."""
    return bool(runner.remote)


def _remote_device_latency(c: Cell, runner: DeviceRunner, rounds: int, batch: int, twin_runner: Any,
                           seed: int) -> DeviceLatency:
    """A remote cell's latency on the device's own clock: the timed rounds only (the last ``rounds`` calls,
    one per round, in round order), kept raw so that ratios and budgets pair them round by round with
    another cell timed on the same device; the baseline's A/A session on the device's clock beside it."""
    c.device = str(runner.device_name)
    own = [float(x) for x in runner.device_ms[-rounds:]]
    out = DeviceLatency(**summarize(own, batch).model_dump(), measured_on=c.device,
                        samples_ms=[round(x, 5) for x in own])
    twin = list(twin_runner.device_ms[-rounds:]) if twin_runner is not None and _remote(twin_runner) else []
    if len(twin) >= 2 and len(own) >= 2:
        out.aa_session = sample_ratio(twin, own, "p50", seed=seed)
    note = (f"timed on the device through the {c.device}: its latency ratios and budgets use the device's own "
            "clock (latency.B.device); the host figures (samples_ms, p50 in the table) include the RPC round trip "
            "and are never compared with figures from another device")
    for n in [note, *runner.device_notes]:
        if n not in c.notes:
            c.notes.append(n)
    return out


def ratios(live: list[Cell], seed: int, say: Callable[[str], None]) -> None:
    """Per target and batch: each variant's p50 latency ratio to the baseline (``compress.measuring.compare``), and the
    baseline's split-half A/A (the noise floor). Slower anywhere is flagged."""
    base = {c.target: c for c in live if c.variant == BASELINE}
    for c in live:
        b = base.get(c.target)
        for at, lat in c.latency.items():
            if c is b:
                if (aa := host_noise_floor(c, at, seed)) is not None:  # set only when measured (exclude_unset)
                    lat.aa = aa
                if lat.device is not None and (aa := device_noise_floor(c, at, seed)) is not None:
                    lat.device.aa = aa
                continue
            if b is None or at not in b.latency:
                continue
            r = c.ratios[at] = compare(c, b, at, seed=seed)
            if isinstance(r, MeasuredRatio) and r.low > 1.0 and c.variant != REFERENCE:
                msg = (f"SLOWER than the baseline at batch {at}: latency x{r.ratio:.2f} "
                       f"[{r.low:.2f}, {r.high:.2f}] (p50, 95% interval)")
                c.notes.append(msg)
                say(f"WARNING {c.ref}: {msg}")
