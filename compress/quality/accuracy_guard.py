"""The accuracy guard of every run: a variant that lost more than ``measure.max_accuracy_drop`` points
against the original model on the same target is marked (status ``ACCURACY -43.7 pt`` in the table,
``accuracy_guard`` in report.json), warned about once with the passes that could win it back, and drawn
apart in the plot. A fast model that no longer works is not a result to be reported as ``ok``.

The figure judged is top-1 accuracy when the data has labels; without labels, fidelity to the original on
the same real inputs: argmax agreement for class scores (points of disagreement) and mean cosine for
embeddings ((1 - cosine) x 100 points). Fidelity on synthetic inputs (no data) is not judged: random inputs
say little about the task, and the report says so.
"""

from __future__ import annotations

from typing import Any

from ..core.registry import get_pass, passes


def _figure(cell: Any, labelled: bool) -> tuple[str, float] | None:
    """The cell's task figure in points (higher is better) and its name, or None when it has none."""
    if labelled and cell.accuracy is not None:
        return "top-1", 100.0 * float(cell.accuracy)
    fid = cell.fidelity or {}
    if not labelled and "agreement" in fid:
        return "agreement", 100.0 * float(fid["agreement"])
    if not labelled and "cosine_mean" in fid:
        return "cosine", 100.0 * float(fid["cosine_mean"])
    return None


def recovery_hint(chain: list[Any]) -> str:
    """The passes and settings that could win accuracy back, from what the passes declare: training-only
    passes (distill) and the training settings of the variant's own passes (finetune_epochs)."""
    trains = sorted(k for k, p in passes().items() if p.caps.trains_only)
    fields = sorted({f"{c.kind}{{{f}=...}}" for c in chain for f in get_pass(c.kind).caps.training_fields})
    kinds = {c.kind for c in chain}
    torch_chain = any(get_pass(k).consumes == "pytorch" for k in kinds)
    parts = []
    if torch_chain and trains:
        parts.append(f"add {' or '.join(trains)} (trains the compressed model against the original)")
    if fields:
        parts.append(f"fine-tune ({', '.join(fields)})")
    parts.append("or compress less (a milder setting, or layers kept in float)")
    return "; ".join(parts)


def judge(cells: list[Any], bound_pt: float, labelled: bool, real_data: bool,
          chains: dict[str, list[Any]]) -> list[str]:
    """Mark each cell whose figure fell more than ``bound_pt`` below the original's on the same target
    (``cell.guard``); returns the warning lines, one per variant (not one per target)."""
    if not real_data:
        return []
    base = {c.target: c for c in cells if c.variant == "baseline" and c.status == "ok"}
    worst: dict[str, tuple[float, str, str]] = {}
    for c in cells:
        if c.variant == "baseline" or c.status != "ok" or c.reference:
            continue
        ref = base.get(c.target) or next(iter(base.values()), None)
        got, want = _figure(c, labelled), _figure(ref, labelled) if ref is not None else None
        if got is None or want is None or got[0] != want[0]:
            continue
        drop = want[1] - got[1]
        if drop > bound_pt:
            c.guard = {"figure": got[0], "original": round(want[1], 3), "value": round(got[1], 3),
                       "drop_pt": round(drop, 3), "bound_pt": bound_pt,
                       "text": f"ACCURACY -{drop:.1f} pt"}
            if c.variant not in worst or drop > worst[c.variant][0]:
                worst[c.variant] = (drop, c.target, f"{got[0]} {got[1]:.2f}% vs {want[1]:.2f}%")
    lines = []
    for variant, (drop, target, figs) in worst.items():
        lines.append(f"{variant}: {figs} on {target} (-{drop:.1f} points, more than the {bound_pt:g}-point bound "
                     f"of measure.max_accuracy_drop): {recovery_hint(chains.get(variant, []))}")
    return lines
