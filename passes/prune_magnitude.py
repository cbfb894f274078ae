"""Unstructured magnitude pruning (``prune.magnitude``): the smallest weights become real zeros.

The masks are folded into the weights (no mask buffers, no re-parametrisation),
so the exported ONNX graph carries the zeros and nothing else changes. Dense
kernels still multiply by those zeros: this shrinks compressed model size, not
latency, on ONNX Runtime, TVM and TensorRT.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.core.artifact import Artifact
from compress.core.layers import LayerSelector
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError
from compress.inputs.torch_io import clone_module, sample_inputs, torch_artifact

from ._prune_common import (
    SparsityConfig,
    WeightLayer,
    count_macs_params,
    count_params,
    finetune_masked,
    layer_sparsity,
    overall_sparsity,
    require_labels,
    skipped_modules,
    weight_layers,
)

PASS = "prune.magnitude"
NO_SPEEDUP = ("unstructured sparsity gives no speed-up on ONNX Runtime, TVM or TensorRT: their dense kernels "
              "multiply the zeros like any other weight; it only makes the model compress better. "
              "Use prune.channels for latency")


class MagnitudePrune(SparsityConfig):
    """Unstructured magnitude pruning: zero the smallest Conv/Linear weights (globally or per layer)."""

    kind: Literal["prune.magnitude"] = "prune.magnitude"
    sparsity: float = Field(0.5, gt=0, lt=1)
    scope: Literal["global", "layer"] = "global"


def _targets(model: nn.Module, skip: LayerSelector) -> tuple[list[tuple[str, WeightLayer]], list[str]]:
    """The weight layers to prune, and the (outermost) names of the layers ``skip`` leaves alone."""
    names, kept_sub = skipped_modules(model, skip, PASS)
    layers = [(n, m) for n, m in weight_layers(model) if id(m) not in kept_sub]
    if not layers:
        raise PassError(f"{PASS}: no Conv/Linear layer left to prune in {type(model).__name__} "
                        f"(skipped: {', '.join(names) or 'none'})")
    return layers, names


@torch.no_grad()
def magnitude_masks(layers: list[tuple[str, WeightLayer]], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks: the ``sparsity`` fraction of smallest |w| is dropped (ties broken by position)."""
    masks: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for n, m in layers:
            w = m.weight.detach().abs().reshape(-1)
            k = round(sparsity * w.numel())
            keep = torch.ones_like(w, dtype=torch.bool)
            if k:
                keep[torch.topk(w, k, largest=False, sorted=False).indices] = False
            masks[n] = keep.reshape(m.weight.shape)
        return masks
    flat = torch.cat([m.weight.detach().abs().reshape(-1) for _, m in layers])
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    i = 0
    for n, m in layers:
        masks[n] = keep[i:i + m.weight.numel()].reshape(m.weight.shape)
        i += m.weight.numel()
    return masks


@register_pass(MagnitudePrune, consumes="pytorch", produces="pytorch", training_fields=("finetune_epochs",))
def prune_magnitude(art: Artifact, cfg: MagnitudePrune, ctx: PassContext) -> Artifact:
    """Unstructured magnitude sparsity, folded into the weights (real zeros in ONNX; no speed-up)."""
    if cfg.finetune_epochs:
        require_labels(ctx, f"finetune_epochs={cfg.finetune_epochs}", PASS)
    model = clone_module(art).eval()
    layers, skipped = _targets(model, cfg.skip)
    names = [n for n, _ in layers]
    before = overall_sparsity(model, names)
    masks = magnitude_masks(layers, cfg.sparsity, cfg.scope)
    emptied = [n for n, mk in masks.items() if not bool(mk.any())]
    if emptied:
        raise PassError(f"{PASS}: {cfg.scope} sparsity {cfg.sparsity} zeroes every weight of "
                        f"{', '.join(emptied)}, which would cut the network; lower the sparsity, use scope "
                        f"'layer', or list {'it' if len(emptied) == 1 else 'them'} in skip")
    with torch.no_grad():
        for n, m in layers:
            m.weight.mul_(masks[n].to(m.weight.dtype))
    meta: dict[str, Any] = {"sparsity_target": cfg.sparsity, "scope": cfg.scope, "kept": skipped}
    if cfg.finetune_epochs:
        meta["finetune"] = finetune_masked(model, ctx, names, cfg.finetune_epochs, cfg.finetune_lr, PASS)
    model.eval()
    total = count_params(model)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    meta.update({
        "sparsity_before": before,
        "sparsity": overall_sparsity(model, names),
        "sparsity_per_layer": layer_sparsity(model, names),
        "params": total,
        "params_nonzero": total - zeros,
        "sparsity_all_params": round(zeros / total, 6) if total else 0.0,
        "notes": [NO_SPEEDUP],
    })
    try:
        meta["macs_dense"] = count_macs_params(model, sample_inputs(art.inputs, seed=ctx.seed))[0]
    except ImportError:
        pass  # MACs come from torch-pruning's counter; without it the figure is left out
    ctx.log(f"{PASS}: {meta['sparsity']:.1%} of Conv/Linear weights are zero")
    facts = art.known_facts()
    if facts.sparsity is None:  # a 2:4 pattern stays 2:4 (magnitude pruning on top only adds zeros)
        facts = facts.evolve(sparsity="unstructured")
    return torch_artifact(model, art, ctx, metadata={PASS: meta}, facts=facts)
