"""Stage 3 of a run: measure. Each variant is compiled for each target and checked against its input model
(``compress.measuring.measure_build``), timed interleaved with the others at every batch size with paired ratios and an
A/A session of the baseline (``compress.measuring.measure_timing``), then scored on the validation data
(``compress.measuring.measure_score``). How two cells compare is ``compress.measuring.compare``'s alone.

Targets are told apart only by what they declare (``TargetCaps``): the reference target, one that
runs any batch, one that times on its device; never by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.artifact import PYTORCH, Artifact
from ..errors import CompressError
from ..inputs.feeds import own_seq, synthetic_feeds
from ..quality.eval_cache import score
from ..stages.execute import Variant
from ..stages.plan import Plan
from ..stages.recipe import Recipe
from .cell import Cell, Live
from .measure_build import build_cells, reference_cells
from .measure_score import measure_accuracy
from .measure_timing import measure_latency

__all__ = ["Cell", "Measurement", "measure", "own_seq", "planned_output_kind"]


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
    live = Live()  # the runners, apart from the cells (which are data)
    try:
        cells = build_cells(variants, plan.targets, plan.unavailable, plan.ctx, say, live)
        cells += reference_cells(references or {}, plan.targets, plan.unavailable, say, live)
        measure_latency(cells, live, plan.root, rec, threads, plan.progress, say, probe, aa_session)
        # Through the evaluation cache: a model scored alike before is read, not run again.
        score(plan, cells, variants, _declared_kind(rec, plan.root), _scorer(live))
    finally:
        live.close_all()
    contention = probe.report()
    for w in contention["warnings"]:
        say(f"WARNING {w}")
    return Measurement(cells, threads, threads_note, contention, own_seq(plan.root))


def _scorer(live: Live) -> Callable[..., np.ndarray | None]:
    """measure_accuracy with this run's runners, in the shape the evaluation cache calls its scorer; named after
    measure_score, whose code identity keys the cached evaluations."""
    def compute(cells: list[Cell], *args: Any) -> np.ndarray | None:
        return measure_accuracy(cells, live, *args)

    compute.__module__ = measure_accuracy.__module__
    return compute


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
    feeds = synthetic_feeds(root, 2, rec.seed)
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
