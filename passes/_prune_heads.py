"""Attention heads for ``prune.channels``: finding q/k/v blocks, their head counts, and removing whole heads.

Private to ``passes/`` (the leading underscore keeps the registry from importing it as a pass).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def quiet() -> Iterator[None]:
    # torch-pruning warns about every unwrapped parameter it handles; the pass reports what matters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Hugging Face calls it num_attention_heads (BERT, ViT, ...); DistilBERT n_heads with q_lin/k_lin/v_lin.
_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads")
_QKV_NAMES = (("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
# A block that stores its head width reshapes with it (view(..., -1, head_size)): shrinking every head's
# width breaks that reshape, so such blocks lose whole heads instead.
_HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size")
# Derived widths some blocks keep beside the head count (Hugging Face: all_head_size = heads * head_size).
_WIDTH_ATTRS = ("all_head_size",)


def fixed_head_size(block: nn.Module) -> int | None:
    """The head width a block reshapes with, when it stores one."""
    for a in _HEAD_SIZE_ATTRS:
        v = getattr(block, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str, list[nn.Linear]]]:
    """Blocks with separate q/k/v Linear layers and an int head-count attribute.

    Returns ``(name, block, head attribute, [q, k, v])``; their head count must be
    known to the pruner so every head keeps the same width, and updated afterwards
    when whole heads go (the zoo transformer derives head_dim from the width).
    """
    found = []
    for name, m in model.named_modules():
        attr = next((a for a in _HEAD_ATTRS if isinstance(getattr(m, a, None), int)
                     and not isinstance(getattr(m, a), bool)), None)
        if attr is None:
            continue
        for names in _QKV_NAMES:
            layers = [getattr(m, n, None) for n in names]
            linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
            if len(linears) == len(layers):
                found.append((name, m, attr, linears))
                break
    return found


def per_head_state(block: nn.Module, heads: int, layers: list[nn.Linear]) -> str | None:
    """A parameter or buffer of an attention block indexed by head (e.g. Swin's relative position bias table)."""
    # Weights of ordinary layers are handled by the dependency graph; only loose tensors can be per head.
    plain = (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)
    skip = {id(t) for m in block.modules() if isinstance(m, plain) for t in m.parameters()}
    skip |= {id(t) for layer in layers for t in layer.parameters()}
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if id(t) in skip or t.dim() == 0 or heads <= 1:
            continue
        if heads in t.shape and "index" not in name:
            return f"{name} {list(t.shape)}"
    return None


def heads_mode(prune_heads: bool | None, attn: list[tuple[str, nn.Module, str, list[nn.Linear]]]) -> bool:
    """Whether whole heads are removed: the user's prune_heads, or auto (blocks with a stored head width)."""
    if prune_heads is not None:
        return prune_heads
    return any(fixed_head_size(blk) is not None for _, blk, _, _ in attn)


def heads_to_keep(heads: int, fraction: float) -> int:
    return round(heads * (1 - fraction))


def head_scores(pruner: Any, blk: nn.Module, attr: str, layers: list[nn.Linear]) -> torch.Tensor:
    """Importance per head: the group importance of q/k/v/proj channels, averaged over each head."""
    dg = pruner.DG
    q = layers[0]
    group = dg.get_pruning_group(q, dg.get_pruner_of_module(q).prune_out_channels, list(range(q.out_features)))
    imp = pruner.estimate_importance(group)
    if imp is None:  # e.g. BN-scale importance sees no BatchNorm here: fall back to L2 magnitude
        imp = sum(layer.weight.detach().pow(2).sum(1) for layer in layers)
    return imp.detach().float().reshape(int(getattr(blk, attr)), -1).mean(1)


def prune_heads(pruner: Any, blocks: list[tuple[str, nn.Module, str, list[nn.Linear]]], heads_init: dict[int, int],
                 fraction: float, global_ranking: bool) -> bool:
    """Remove whole heads until ``fraction`` of the original heads is gone (at least one head stays per block).

    Each removal prunes q/k/v outputs and proj inputs together through the
    dependency graph, then updates the block's head count (and the pruner's), so
    head_dim stays as it was. Returns whether any head was removed.
    """
    current = {id(blk): int(getattr(blk, attr)) for _, blk, attr, _ in blocks}
    drop: dict[int, list[int]] = {}
    scores = {id(blk): head_scores(pruner, blk, attr, layers) for _, blk, attr, layers in blocks}
    if global_ranking:
        total_keep = max(len(blocks), heads_to_keep(sum(heads_init.values()), fraction))
        n_drop = sum(current.values()) - total_keep
        # Rank every head of every block; never take a block's last head.
        ranked = sorted((float(s), bid, h) for bid, sc in scores.items() for h, s in enumerate(sc))
        left = dict(current)
        for _, bid, h in ranked:
            if n_drop <= 0:
                break
            if left[bid] > 1:
                drop.setdefault(bid, []).append(h)
                left[bid] -= 1
                n_drop -= 1
    else:
        for bid, sc in scores.items():
            n = current[bid] - max(1, heads_to_keep(heads_init[bid], fraction))
            if n > 0:
                drop[bid] = torch.topk(sc, n, largest=False).indices.tolist()
    dg = pruner.DG
    for _, blk, attr, layers in blocks:
        heads_drop = sorted(drop.get(id(blk), []))
        if not heads_drop:
            continue
        q = layers[0]
        heads = int(getattr(blk, attr))
        hd = q.out_features // heads
        idxs = [h * hd + i for h in heads_drop for i in range(hd)]
        with quiet():
            dg.get_pruning_group(q, dg.get_pruner_of_module(q).prune_out_channels, idxs).prune()
        setattr(blk, attr, heads - len(heads_drop))
        for wa in _WIDTH_ATTRS:
            if isinstance(getattr(blk, wa, None), int):
                setattr(blk, wa, (heads - len(heads_drop)) * hd)
        for layer in layers:
            pruner.num_heads[layer] = heads - len(heads_drop)
            pruner.out_channel_groups[layer] = heads - len(heads_drop)
    return bool(drop)

