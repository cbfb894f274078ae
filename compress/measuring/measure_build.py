"""Stage 3, building: each variant compiled for each target through the cache (``Cell``), checked against
its input model on the same inputs (parity), with a runner ready for timing and scoring. Stored baseline
artifacts (``compress check``'s recorded builds) become cells beside them, already compiled."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch

from ..core.artifact import ONNX, PYTORCH, Artifact
from ..core.cache import Cache
from ..core.capabilities import dense_note, refusal
from ..core.manager import PassContext
from ..core.protocols import PARITY_BATCH, Target
from ..core.registry import code_identity, get_pass
from ..core.registry import targets as registered_targets
from ..errors import CompressError, TargetUnavailable
from ..stages.execute import Variant
from ..stages.plan import REFERENCE
from .cell import Cell, Live


def compile_for(target: Target, art: Artifact, ctx: PassContext) -> tuple[Artifact, bool, float]:
    """``art`` built by ``target`` through the cache: (the build, cache hit, seconds it took)."""
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


def dynamic_batch(art: Artifact | None) -> bool:
    """Whether a compiled model takes any batch size (its facts say so; unknown counts as no)."""
    return art is None or bool(art.known_facts().dynamic_batch)


def new_cell(t: Target, v: Variant, variants: list[Variant], unavailable: str | None,
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
    facts = src.known_facts()
    kernels = [k for k, (_, cls) in registered_targets().items() if facts.sparsity in cls.caps.sparse_kernels]
    if (note := dense_note(t.caps, facts, t.name, kernels)) is not None:
        cell.notes.append(note)
    return cell, src


def build_cells(variants: list[Variant], targets: list[Target], unavailable: dict[str, str], ctx: PassContext,
                say: Callable[[str], None], live: Live) -> list[Cell]:
    """Every variant's cell on every target, built (with a runner) where it can be; ``unavailable`` is the
    plan's answer for each target that cannot run here."""
    cells = []
    mask = _affinity()
    for t in targets:
        for v in variants:
            cell, src = new_cell(t, v, variants, unavailable.get(t.name), say)
            cells.append(cell)
            if src is None:
                continue
            with cell_build(cell, say):
                _build(cell, t, src, v is variants[0], ctx, say, live)
                if restore_affinity(mask, f"target {t.name}", say):
                    cell.notes.append("this target's runtime narrowed the process's CPU mask; restored after its "
                                      "build")
    return cells


@contextlib.contextmanager
def cell_build(cell: Cell, say: Callable[[str], None]) -> Iterator[None]:
    """Build one cell: a target that cannot run here marks it unavailable, a build error marks it failed, each
    with its reason, and the other cells go on (one target failing must not stop the others; the report says
    why)."""
    try:
        yield
    except TargetUnavailable as e:
        cell.status, cell.reason = "unavailable", str(e)
    except CompressError as e:
        cell.status, cell.reason = "failed", str(e)
        say(f"compile {cell.variant} for {cell.target}: failed: {e}")


def _build(cell: Cell, t: Target, src: Artifact, baseline: bool, ctx: PassContext, say: Callable[[str], None],
           live: Live) -> None:
    compiled, hit, secs = compile_for(t, src, ctx)
    cell.compiled, cell.cache_hit = compiled, hit
    cell.build_s = compiled.metadata.get("build_s", secs)
    cell.size_bytes = src.size_bytes() if t.caps.consumes == PYTORCH else compiled.size_bytes()
    cell.notes += list(compiled.metadata.get("target_notes", []))  # kept if it cannot run here
    live.runners[cell.ref] = t.runner(compiled, threads=torch.get_num_threads())
    if baseline:
        live.spawns[cell.ref] = (lambda t=t, comp=compiled: t.runner(comp, threads=torch.get_num_threads()))
    say(f"compile {cell.variant} for {t.name}: {'cache hit' if hit else f'{secs:.1f}s'}")
    _check_target_parity(cell, t, src, compiled, ctx, say, live)


def reference_cells(references: dict[str, Artifact], targets: list[Target], unavailable: dict[str, str],
                    say: Callable[[str], None], live: Live) -> list[Cell]:
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
        reason = unavailable.get(tname)
        if reason is not None:
            cell.status, cell.reason = "unavailable", reason
            continue
        try:
            cell.size_bytes = art.size_bytes()
            live.runners[cell.ref] = t.runner(art, threads=torch.get_num_threads())
            say(f"recorded baseline for {tname}: artifact {art.digest[:12]} loaded, timed in this run")
        except TargetUnavailable as e:
            cell.status, cell.reason = "unavailable", str(e)
        except CompressError as e:
            cell.status, cell.reason = "failed", f"the stored baseline artifact could not be loaded: {e}"
    return cells


def _check_target_parity(cell: Cell, target: Target, src: Artifact, compiled: Artifact, ctx: PassContext,
                         say: Callable[[str], None], live: Live) -> None:
    """The compiled model against its input ONNX model on the same inputs (``compress.quality.parity``); a breach, or
    an inference that fails while checking, fails the cell with one line. The eager PyTorch target is
    itself the reference, so it has nothing to check."""
    if target.caps.reference or target.caps.consumes != ONNX:
        return
    from ..quality.eval_cache import parity as cached_parity
    from ..quality.parity import model_precision, target_parity

    # A target may run a precision coarser than the model's (TensorRT building FP32 with TF32 or FP16 kernels).
    # A target may run coarser kernels than the model's precision (TensorRT building FP32 with TF32 or FP16).
    precision = target.parity_precision(src, model_precision(src))
    batch = min(PARITY_BATCH, target.parity_batch()) if dynamic_batch(compiled) else src.inputs[0].shape[0]
    try:
        # An evaluation made alike before is read from the evaluation cache, not made again.
        cell.parity = cached_parity(ctx.cache, cell, target, src.digest, precision, batch, ctx.data, ctx.seed, lambda: (
            target_parity(src, live[cell].infer, ctx.data, target.config, precision, batch, ctx.seed)))
    except Exception as e:  # the runner raising is a failed inference of this cell, not of the run
        cell.status, cell.reason = "failed", f"inference failed during the parity check: {str(e).splitlines()[0]}"
    else:
        if cell.parity["ok"] is None:
            cell.notes.append(f"parity NOT checked: {cell.parity['reason']}")
        elif not cell.parity["ok"]:
            cell.status, cell.reason = "failed", f"parity: {cell.parity['reason']}"
    if cell.status == "failed":
        say(f"compile {cell.variant} for {cell.target}: failed: {cell.reason}")
        live.close(cell)
