"""Helpers shared by the pruning passes: counting, widths, sparsity, keep lists, shape replay.

Private to ``passes/`` (the leading underscore keeps the registry from importing it as a pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from compress.core.config import PassConfig
from compress.core.layers import LayerSelecting, LayerSelector, check_on_root, outermost, skip_field, torch_layers
from compress.errors import PassError

_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
WeightLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear


class SparsityConfig(LayerSelecting, PassConfig):
    """Settings every weight-zeroing pass (prune.magnitude, prune.2to4) shares: the layers left alone (``skip``;
    ``keep`` before it, accepted for one release) and the optional fine-tuning after the masks are set."""

    skip: LayerSelector = skip_field("left unpruned (with their submodules)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = {"keep": ""}
    finetune_epochs: int = Field(0, ge=0, le=1000)
    finetune_lr: float = Field(1e-3, gt=0, le=1)

    def preflight(self, root: Any, text: Any) -> None:
        check_on_root(self.skip, root, self.kind)

    def data_needed(self) -> str | None:
        return "labelled" if self.finetune_epochs else None


def weight_layers(model: nn.Module) -> list[tuple[str, WeightLayer]]:
    """Conv and Linear layers (the ones pruning acts on), in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV_LINEAR)]


def count_macs_params(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass, counted by torch-pruning's op counter.

    The counter covers convolutions, linear layers, norms and pooling; the
    matrix products inside attention (q @ k^T, att @ v) are not counted.
    """
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, tuple(inputs))
    return int(macs), int(params)


# Batched matrix products between activations: attention's q @ k^T and att @ v (Linear layers run as mm/addmm).
_ATTENTION_OPS = ("aten.bmm", "aten.baddbmm", "aten._scaled_dot_product")


def attention_macs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """MACs of the attention matrix products in one forward pass (torch's FLOP counter, flops / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    counts = fc.get_flop_counts().get("Global", {})
    return int(sum(v for k, v in counts.items() if str(k).startswith(_ATTENTION_OPS)) // 2)


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [in, out]}`` for every Conv / Linear layer (channels or features)."""
    out: dict[str, list[int]] = {}
    for name, m in weight_layers(model):
        if isinstance(m, nn.Linear):
            out[name] = [int(m.in_features), int(m.out_features)]
        else:
            out[name] = [int(m.in_channels), int(m.out_channels)]
    return out


def layer_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros in each Conv / Linear weight."""
    wanted = set(names) if names is not None else None
    return {n: round(float((m.weight == 0).float().mean()), 6) for n, m in weight_layers(model)
            if wanted is None or n in wanted}


def overall_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """Zeros over all Conv / Linear weights (or just ``names``), weighted by size."""
    wanted = set(names) if names is not None else None
    zeros = total = 0
    for n, m in weight_layers(model):
        if wanted is None or n in wanted:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return round(zeros / total, 6) if total else 0.0


def find_classifier(model: nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """Name of the layer that produces the model's output (the classifier head), if one does.

    Runs the model once with hooks: the Conv/Linear whose output tensor *is* the
    model output wins; otherwise the last Linear to run.
    """
    produced: dict[int, str] = {}
    order: list[str] = []
    names = {id(m): n for n, m in weight_layers(model)}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = names[id(mod)]
            if isinstance(mod, nn.Linear):
                order.append(names[id(mod)])

    handles = [m.register_forward_hook(hook) for _, m in weight_layers(model)]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(first, torch.Tensor) and id(first) in produced:
        return produced[id(first)]
    return order[-1] if order else None


def output_module(model: nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """Name of the module nearest the model's (first) output, of any type (e.g. a LayerNorm), or None.

    Found through the autograd graph, so an output computed after the last module (a mean-pooled
    embedding) still names the module whose width it carries, and modules off the output's path
    (an unused pooler) are never named.
    """
    names = {id(m): n for n, m in model.named_modules() if n and m._parameters}
    by_fn: dict[int, str] = {}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            by_fn[id(out.grad_fn)] = names[id(mod)]

    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in names]
    try:
        with torch.enable_grad():
            out = model(*inputs)
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if not isinstance(first, torch.Tensor) or first.grad_fn is None:
                return None
            seen: set[int] = set()
            frontier: list[Any] = [first.grad_fn]
            while frontier:  # breadth first: the nearest module to the output wins
                nxt: list[Any] = []
                for fn in frontier:
                    if fn is None or id(fn) in seen:
                        continue
                    seen.add(id(fn))
                    if id(fn) in by_fn:
                        return by_fn[id(fn)]
                    nxt += [f for f, _ in fn.next_functions]
                frontier = nxt
            return None
    finally:
        for h in handles:
            h.remove()


def skipped_modules(model: nn.Module, skip: LayerSelector, pass_name: str) -> tuple[list[str], set[int]]:
    """What ``skip`` selects in ``model``: the outermost names, and the ids of those modules and their submodules.

    ``first`` / ``last`` count among the Conv/Linear weight layers; an entry that selects nothing is refused
    (``compress.core.layers``)."""
    names = outermost(skip.select(torch_layers(model), pass_name, eligible=[n for n, _ in weight_layers(model)]))
    table = dict(model.named_modules())
    return names, {id(s) for n in names for s in table[n].modules()}


# --- structural replay ------------------------------------------------------------------------
# A pruned module differs from its freshly built base only in tensor shapes and a few integer
# attributes (in_channels, groups, heads, ...). Recording just those differences lets the
# artifact be rebuilt on load from ints and lists, with no pickled modules.

_SIMPLE = (int, float, bool, str)


def _attr_value(v: Any) -> Any:
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v):
        return list(v)
    return None


def shape_snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module: own parameter / buffer shapes and simple public attributes."""
    snap: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        attrs = {}
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training":
                continue
            val = _attr_value(v)
            if val is not None:
                attrs[k] = val
        snap[name] = {
            "params": {k: list(p.shape) for k, p in m._parameters.items() if p is not None},
            "buffers": {k: list(b.shape) for k, b in m._buffers.items() if b is not None},
            "attrs": attrs,
        }
    return snap


def shape_diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What changed between two snapshots (only the changed entries)."""
    diff: dict[str, dict[str, Any]] = {}
    for name, a in after.items():
        b = before.get(name)
        if b is None:
            raise PassError(f"module {name!r} appeared during pruning; structural replay cannot rebuild it")
        entry: dict[str, Any] = {}
        for sect in ("params", "buffers", "attrs"):
            changed = {k: v for k, v in a[sect].items() if b[sect].get(k) != v}
            if changed:
                entry[sect] = changed
        if entry:
            diff[name] = entry
    return diff


def apply_shape_diff(model: nn.Module, diff: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize parameters/buffers and set attributes so ``load_state_dict`` fits the pruned weights."""
    table = dict(model.named_modules())
    for name, entry in diff.items():
        m = table.get(name)
        if m is None:
            raise PassError(f"pruned structure names module {name!r}, which the rebuilt model lacks; "
                            "the model definition changed since the artifact was made")
        for k, shape in entry.get("params", {}).items():
            old = m._parameters.get(k)
            dtype = old.dtype if old is not None else torch.float32
            req = old.requires_grad if old is not None else True
            m._parameters[k] = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=req)
        for k, shape in entry.get("buffers", {}).items():
            old_b = m._buffers.get(k)
            dtype = old_b.dtype if old_b is not None else torch.float32
            m._buffers[k] = torch.zeros(shape, dtype=dtype)
        for k, v in entry.get("attrs", {}).items():
            cur = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)
    return model


# --- masked fine-tuning -------------------------------------------------------------------------

def freeze_zeros(model: nn.Module, names: Iterable[str]) -> list[Any]:
    """Mask the gradients of zero weights so a fine-tune keeps them exactly zero.

    With a zero gradient AdamW's moments stay zero and weight decay of a zero is
    zero, so masked weights do not move. Returns the hook handles to remove.
    """
    table = dict(model.named_modules())
    handles = []
    for n in names:
        w = table[n].weight  # type: ignore[union-attr]
        mask = (w != 0).to(w.dtype).detach()
        handles.append(w.register_hook(lambda g, m=mask: g * m))
    return handles


def require_labels(ctx: Any, what: str, pass_name: str, alternative: str = "") -> None:
    """Raise a clear error unless the pipeline carries labelled data."""
    data = ctx.data
    if data is None or not getattr(data, "labelled", False):
        has = "no data" if data is None else f"unlabelled data ({data.name})"
        alt = f", {alternative}" if alternative else ""
        raise PassError(f"{pass_name}: {what} needs labelled data, but the pipeline has {has}; set "
                        f"data = {{ source = \"builtin:digits\" }} (or a labelled folder/.npz){alt}")


def finetune(model: nn.Module, ctx: Any, epochs: int, lr: float, pass_name: str) -> list[float]:
    """Short supervised fine-tune on the pipeline's labelled data."""
    from compress.inputs.training import fit

    require_labels(ctx, f"finetune_epochs={epochs}", pass_name)
    curve = fit(model, ctx.data, epochs, lr=lr, seed=ctx.seed, progress=ctx.progress, desc=f"{pass_name} fine-tune",
                heartbeat=ctx.log)
    return [round(a, 4) for a in curve]


def finetune_masked(model: nn.Module, ctx: Any, names: Iterable[str], epochs: int, lr: float,
                    pass_name: str) -> dict[str, Any]:
    """Fine-tune with the zero weights of ``names`` held at zero; the record for the pass metadata."""
    handles = freeze_zeros(model, names)
    try:
        return {"epochs": epochs, "lr": lr, "val_top1": finetune(model, ctx, epochs, lr, pass_name)}
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, max_samples: int = 512, batch_size: int = 64) -> int:
    """Re-estimate BatchNorm running statistics on unlabelled samples; returns how many were used.

    Removing channels changes what every later layer sees, so the stored means
    and variances no longer fit; re-estimating them (no labels, no gradients)
    recovers much of the accuracy lost to pruning.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or data is None:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch seen
    was_training = model.training
    model.train()
    seen = 0
    try:
        for split in (data.calib, data.train):
            for x, _ in data.batches(split, batch_size):
                if seen >= max_samples:
                    break
                x = x[: max_samples - seen]
                if len(x) < 2:  # training-mode BatchNorm needs more than one value per channel
                    break
                model(x)
                seen += len(x)
    finally:
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        model.train(was_training)
    return seen


def nonzero_per_group_of_4(w: np.ndarray, axis: int = 1) -> np.ndarray:
    """Count of non-zeros in each consecutive group of 4 along ``axis`` (which must divide by 4)."""
    moved = np.moveaxis(np.asarray(w), axis, -1)
    if moved.shape[-1] % 4:
        raise ValueError(f"axis {axis} has length {moved.shape[-1]}, not a multiple of 4")
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    return (groups != 0).sum(axis=-1)
