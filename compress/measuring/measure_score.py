"""Stage 3, scoring: each built cell on the validation data (top-1 where there are labels) and against the
original model's output on the reference target (fidelity, measured the way the output kind calls for)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core.artifact import Artifact
from ..inputs.data import DataBundle
from ..inputs.feeds import synthetic_feeds
from ..quality.evaluate import fidelity, predict, predict_arrays, predict_feeds, top1
from ..stages.execute import Variant
from ..stages.plan import BASELINE
from .cell import Cell, Live
from .measure_build import dynamic_batch


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


def measure_accuracy(cells: list[Cell], live: Live, variants: list[Variant], data: DataBundle | None, root: Artifact,
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
        all_feeds = synthetic_feeds(root, SYNTHETIC_SAMPLES, 1234)
        xs = all_feeds[root.inputs[0].name]
    ref_cell = next((c for c in cells if c.variant == BASELINE and c.status == "ok"
                     and c.caps.reference), None) or next(
        (c for c in cells if c.variant == BASELINE and c.status == "ok"), None)
    ordered = ([ref_cell] if ref_cell else []) + [c for c in cells if c is not ref_cell]
    for c in ordered:
        if c.status != "ok" or c.reference:
            continue
        bs = 64 if (c.caps.any_batch or dynamic_batch(c.compiled)) else 1
        try:
            if c is ref_cell and ref_outputs is not None:
                logits = ref_outputs
            elif data is not None and data.input_names:  # one named array per model input
                logits = predict_feeds(live[c], data.feeds(data.val), bs)
            elif data is not None:
                logits = predict(live[c], data, data.val, bs)
            elif len(root.inputs) > 1:  # several named inputs (token ids and a mask): synthetic, valid values
                logits = predict_feeds(live[c], all_feeds, bs)
            else:
                assert xs is not None  # set above whenever there is no data
                logits = predict_arrays(live[c], xs, bs)
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
