"""2:4 semi-structured sparsity (``prune.2to4``): in every group of four weights, two are zero.

Groups run along the reduction axis (a Linear's input features; a conv's input
channels at each output channel and kernel position), the layout NVIDIA's
sparse tensor cores read. Only TensorRT on Ampere or newer GPUs turns the
pattern into speed; on CPUs and other runtimes it is plain unstructured
sparsity with no speed-up.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from compress.core.artifact import Artifact
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError
from compress.inputs.torch_io import clone_module, torch_artifact

from ._prune_common import (
    SparsityConfig,
    WeightLayer,
    finetune_masked,
    layer_sparsity,
    nonzero_per_group_of_4,
    overall_sparsity,
    require_labels,
    skipped_modules,
    weight_layers,
)

PASS = "prune.2to4"
NOTE = ("2:4 sparsity speeds up only TensorRT on NVIDIA sparse tensor cores (Ampere or newer, with sparse weights "
        "enabled in the builder); ONNX Runtime, TVM and every CPU run it as dense, with no speed-up")


class TwoFourPrune(SparsityConfig):
    """2:4 semi-structured sparsity on eligible Conv/Linear weights (TensorRT sparse tensor cores)."""

    kind: Literal["prune.2to4"] = "prune.2to4"


def reduction_width(m: WeightLayer) -> int:
    """Length of the axis 2:4 groups run along: input features, or input channels per conv group."""
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    return int(m.in_channels // m.groups)


def eligibility(m: WeightLayer) -> str | None:
    """None when the layer can hold the 2:4 pattern, else why not."""
    width = reduction_width(m)
    if width % 4:
        what = "input features" if isinstance(m, nn.Linear) else "input channels per group"
        return f"{width} {what}, not a multiple of 4"
    return None


def check_2to4(weight: torch.Tensor | np.ndarray, axis: int = 1) -> bool:
    """True when every group of four consecutive weights along ``axis`` holds at most two non-zeros."""
    w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    return bool((nonzero_per_group_of_4(w, axis) <= 2).all())


def violations_2to4(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Layers (of ``names``, default: every eligible one) whose weight breaks the 2:4 pattern."""
    table = dict(weight_layers(model))
    wanted = names if names is not None else [n for n, m in table.items() if eligibility(m) is None]
    return [n for n in wanted if not check_2to4(table[n].weight)]


@torch.no_grad()
def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask holding the two largest |w| of every group of four along dim 1."""
    moved = weight.detach().abs().movedim(1, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    top = groups.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(moved.shape).movedim(-1, 1)


@register_pass(TwoFourPrune, consumes="pytorch", produces="pytorch", training_fields=("finetune_epochs",))
def prune_2to4(art: Artifact, cfg: TwoFourPrune, ctx: PassContext) -> Artifact:
    """2:4 semi-structured sparsity (speed-up only on TensorRT sparse tensor cores, Ampere+)."""
    if cfg.finetune_epochs:
        require_labels(ctx, f"finetune_epochs={cfg.finetune_epochs}", PASS)
    model = clone_module(art).eval()
    skip_names, kept = skipped_modules(model, cfg.skip, PASS)
    eligible: list[str] = []
    skipped: dict[str, str] = {}
    for n, m in weight_layers(model):
        reason = "kept" if id(m) in kept else eligibility(m)
        if reason is None:
            eligible.append(n)
        else:
            skipped[n] = reason
    if not eligible:
        raise PassError(f"{PASS}: no layer of {type(model).__name__} can hold the 2:4 pattern "
                        f"(skipped: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    table = dict(weight_layers(model))
    with torch.no_grad():
        for n in eligible:
            w = table[n].weight
            w.mul_(mask_2to4(w).to(w.dtype))
    meta: dict[str, Any] = {"kept": skip_names}
    if cfg.finetune_epochs:
        meta["finetune"] = finetune_masked(model, ctx, eligible, cfg.finetune_epochs, cfg.finetune_lr, PASS)
    model.eval()
    bad = violations_2to4(model, eligible)
    if bad:
        raise PassError(f"{PASS}: internal check failed: {', '.join(bad)} break the 2:4 pattern after pruning")
    all_names = [n for n, _ in weight_layers(model)]
    meta.update({
        "eligible": eligible,
        "skipped": skipped,
        "pattern_ok": True,
        "sparsity_per_layer": layer_sparsity(model, eligible),
        "sparsity_eligible": overall_sparsity(model, eligible),
        "sparsity": overall_sparsity(model, all_names),
        "notes": [NOTE] + ([f"{len(skipped)} layer(s) left dense (see skipped)"] if skipped else []),
    })
    ctx.log(f"{PASS}: {len(eligible)} layers 2:4-sparse, {len(skipped)} skipped")
    return torch_artifact(model, art, ctx, metadata={PASS: meta}, facts=art.known_facts().evolve(sparsity="2:4"))
