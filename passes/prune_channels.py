"""Structured channel pruning (``prune.channels``): removes channels, heads and MLP widths for real.

torch-pruning's dependency graph couples the layers that must shrink together
(residual adds, concatenations, grouped/depthwise convs, batch norms, the
classifier's input, q/k/v/proj of an attention block), so the pruned model is a
smaller dense model: fewer MACs on every target, not a masked one.

The pruned structure is stored as a diff of tensor shapes and integer
attributes (``in_channels``, ``groups``, ``heads`` ...) replayed by the
``prune.channels`` structure hook on a freshly built base module, so the
artifact reloads from disk with ``weights_only=True`` and no pickled modules.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.core.artifact import Artifact
from compress.core.config import PassConfig
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError
from compress.inputs.torch_io import clone_module, register_structure_hook, sample_inputs, torch_artifact

from ._prune_common import (
    apply_shape_diff,
    attention_macs,
    count_macs_params,
    find_classifier,
    finetune,
    layer_widths,
    output_module,
    recalibrate_bn,
    require_labels,
    resolve_names,
    shape_diff,
    shape_snapshot,
    weight_layers,
)

PASS = "prune.channels"
# A MACs target bisects the channel ratio in [0, _MACS_MAX_RATIO] down to this resolution.
_MACS_MAX_RATIO = 0.95
_MACS_TOLERANCE = 0.01
_TAYLOR_BATCHES = 4


class ChannelPrune(PassConfig):
    """Structured pruning: physically remove channels/heads so every target runs fewer MACs.

    Give exactly one of ``ratio`` (fraction of channels removed per group) or
    ``macs_target`` (fraction of the original MACs to keep; the channel ratio is
    bisected for the widest model at or under it). The classifier head's
    outputs are always kept.
    """

    kind: Literal["prune.channels"] = "prune.channels"
    ratio: float | None = Field(None, gt=0, lt=1)
    macs_target: float | None = Field(None, gt=0, lt=1)
    global_pruning: bool = False
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    round_to: int | None = Field(None, ge=2, le=256)
    keep: list[str] = Field(default_factory=list)
    # Attention: remove whole heads (True) or shrink every head's width (False). None (auto): whole heads
    # when a block reshapes with a stored head width (Hugging Face attention_head_size), else widths.
    prune_heads: bool | None = None
    bn_recalibrate: bool = True  # re-estimate BatchNorm statistics on the pipeline's data (no labels needed)
    finetune_epochs: int = Field(0, ge=0, le=1000)
    finetune_lr: float = Field(1e-3, gt=0, le=1)

    @model_validator(mode="after")
    def _one_target(self) -> ChannelPrune:
        if (self.ratio is None) == (self.macs_target is None):
            raise ValueError("give exactly one of ratio (fraction of channels to remove, e.g. 0.5) "
                             "or macs_target (fraction of the original MACs to keep, e.g. 0.5)")
        return self

    def data_needed(self) -> str | None:
        return "labelled" if self.finetune_epochs or self.importance == "taylor" else None


@register_structure_hook(PASS)
def _replay(module: nn.Module, data: Any) -> nn.Module:
    return apply_shape_diff(module, data)


def _tp() -> Any:
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise PassError(f"{PASS} needs torch-pruning: pip install 'compress-pipeline[prune]' "
                        "(torch-pruning==1.6.1)") from e
    return tp


@contextmanager
def _quiet() -> Iterator[None]:
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


def heads_mode(cfg: ChannelPrune, attn: list[tuple[str, nn.Module, str, list[nn.Linear]]]) -> bool:
    """Whether whole heads are removed: the user's prune_heads, or auto (blocks with a stored head width)."""
    if cfg.prune_heads is not None:
        return cfg.prune_heads
    return any(fixed_head_size(blk) is not None for _, blk, _, _ in attn)


def _importance(cfg: ChannelPrune, model: nn.Module) -> Any:
    tp = _tp()
    if cfg.importance == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if cfg.importance == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if cfg.importance == "bn_scale":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise PassError(f"{PASS}: importance 'bn_scale' ranks channels by BatchNorm scales, but "
                            f"{type(model).__name__} has no BatchNorm layer; use importance 'l1' or 'l2'")
        return tp.importance.BNScaleImportance()
    return tp.importance.TaylorImportance()


def _taylor_grads(model: nn.Module, ctx: PassContext) -> None:
    """Accumulate loss gradients on a few labelled batches (Taylor importance reads them)."""
    data = ctx.data
    model.zero_grad()
    ce = nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()  # BN statistics must not move while scoring channels
    split = data.calib if data.calib.y is not None and len(data.calib) >= 32 else data.train
    with torch.enable_grad():
        for i, (x, y) in enumerate(data.batches(split, 64)):
            if i >= _TAYLOR_BATCHES:
                break
            ce(model(x), torch.from_numpy(y)).backward()
    model.train(was_training)


def _locate_failure(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[str, str, str | None, str]:
    """Run the model and name the innermost module whose forward raised.

    Returns (module name, its class, the last Conv/Linear that ran before it, the error).
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    last_layer: list[str] = []
    failed: list[nn.Module] = []

    def pre(mod: nn.Module, _inp: Any) -> None:
        stack.append(mod)

    def post(mod: nn.Module, _inp: Any, _out: Any) -> None:
        stack.pop()
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            last_layer.append(names[id(mod)])

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    err = ""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # any failure of the pruned forward is reported with its location
        failed = list(stack)
        err = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        for h in handles:
            h.remove()
    if not failed:
        return "", "", None, ""
    inner = failed[-1]
    return names[id(inner)], type(inner).__name__, (last_layer[-1] if last_layer else None), err


def _concat_into_grouped(pruner: Any) -> list[nn.Module]:
    """Roots of groups that reach a grouped conv's inputs only in part (through a concat or split).

    torch-pruning 1.6.1 maps such indices wrongly (it repeats them per conv group
    as if the producer fed the whole input) and fails or corrupts the model, so
    these producers are kept at full width.
    """
    dg = pruner.DG
    out = []
    for group in dg.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        for dep, idxs in group:
            m = dep.target.module
            if (isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
                    and not (m.groups == m.in_channels == m.out_channels)
                    and dg.is_in_channel_pruning_fn(dep.handler) and len(idxs) != m.in_channels):
                out.append(group[0][0].target.module)
                break
    return out


def _heads_to_keep(heads: int, fraction: float) -> int:
    return round(heads * (1 - fraction))


def _head_scores(pruner: Any, blk: nn.Module, attr: str, layers: list[nn.Linear]) -> torch.Tensor:
    """Importance per head: the group importance of q/k/v/proj channels, averaged over each head."""
    dg = pruner.DG
    q = layers[0]
    group = dg.get_pruning_group(q, dg.get_pruner_of_module(q).prune_out_channels, list(range(q.out_features)))
    imp = pruner.estimate_importance(group)
    if imp is None:  # e.g. BN-scale importance sees no BatchNorm here: fall back to L2 magnitude
        imp = sum(layer.weight.detach().pow(2).sum(1) for layer in layers)
    return imp.detach().float().reshape(int(getattr(blk, attr)), -1).mean(1)


def _prune_heads(pruner: Any, blocks: list[tuple[str, nn.Module, str, list[nn.Linear]]], heads_init: dict[int, int],
                 fraction: float, global_ranking: bool) -> bool:
    """Remove whole heads until ``fraction`` of the original heads is gone (at least one head stays per block).

    Each removal prunes q/k/v outputs and proj inputs together through the
    dependency graph, then updates the block's head count (and the pruner's), so
    head_dim stays as it was. Returns whether any head was removed.
    """
    current = {id(blk): int(getattr(blk, attr)) for _, blk, attr, _ in blocks}
    drop: dict[int, list[int]] = {}
    scores = {id(blk): _head_scores(pruner, blk, attr, layers) for _, blk, attr, layers in blocks}
    if global_ranking:
        total_keep = max(len(blocks), _heads_to_keep(sum(heads_init.values()), fraction))
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
            n = current[bid] - max(1, _heads_to_keep(heads_init[bid], fraction))
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
        with _quiet():
            dg.get_pruning_group(q, dg.get_pruner_of_module(q).prune_out_channels, idxs).prune()
        setattr(blk, attr, heads - len(heads_drop))
        for wa in _WIDTH_ATTRS:
            if isinstance(getattr(blk, wa, None), int):
                setattr(blk, wa, (heads - len(heads_drop)) * hd)
        for layer in layers:
            pruner.num_heads[layer] = heads - len(heads_drop)
            pruner.out_channel_groups[layer] = heads - len(heads_drop)
    return bool(drop)


class _Refusal(PassError):
    """A refusal that names the modules whose keeping may let the pruning go through.

    ``problem`` says what went wrong and where; ``advice`` what else to try; ``candidates`` the modules
    to add to ``keep`` (checked by trial pruning before the user is told, see ``_verified_keep``)."""

    def __init__(self, problem: str, advice: str, candidates: Sequence[str] = (), wider: Sequence[str] = ()) -> None:
        self.problem, self.advice, self.candidates = problem, advice, list(dict.fromkeys(candidates))
        self.wider = list(wider)  # kept next when keeping the candidates changes nothing (the same module fails)
        keep = f"; or list them in keep: keep = {self.candidates!r}" if self.candidates else ""
        super().__init__(f"{problem}; {advice}{keep}")


class _WouldEmpty(_Refusal):
    """A ratio that would remove every channel (or head) of some layer."""


class _GraphExplodes(_Refusal):
    """torch-pruning's dependency search from one layer does not end (it loops through the graph)."""


# A pruning group larger than this many dependencies per graph node is a search that loops (FocalNet's
# modulation: the search re-visits the same layers with ever new index sets and runs for hours).
_GROUP_LIMIT_PER_NODE = 8
_GROUP_LIMIT_MIN = 2000


@contextmanager
def _bounded_search(names: dict[int, str]) -> Iterator[None]:
    """Cut off torch-pruning's dependency search when a group grows without bound, naming its root layer."""
    from torch_pruning.dependency import graph as tp_graph
    from torch_pruning.dependency import group as tp_group

    state: dict[str, Any] = {"root": None, "limit": _GROUP_LIMIT_MIN}
    orig_add, orig_get = tp_group.Group.add_dep, tp_graph.DependencyGraph.get_pruning_group

    def add_dep(self: Any, dep: Any, idxs: Any) -> None:
        orig_add(self, dep, idxs)
        if len(self._group) > state["limit"]:
            root = state["root"]
            label = names.get(id(root), type(root).__name__)
            # The loop runs through the block around the layer (FocalNet's modulation: every layer of it
            # explodes in turn), so the block is what to keep.
            block = label.rpartition(".")[0] if id(root) in names else ""
            raise _GraphExplodes(
                f"{PASS}: torch-pruning's search for the layers coupled to {label!r} does not end (over "
                f"{state['limit']:,} dependencies: the graph loops through its block); stopped",
                "leave that block out of pruning", [block or label] if id(root) in names else [])

    def get_pruning_group(self: Any, module: nn.Module, *a: Any, **kw: Any) -> Any:
        state["root"] = module
        state["limit"] = max(_GROUP_LIMIT_MIN, _GROUP_LIMIT_PER_NODE * len(self.module2node))
        return orig_get(self, module, *a, **kw)

    tp_group.Group.add_dep = add_dep
    tp_graph.DependencyGraph.get_pruning_group = get_pruning_group
    try:
        yield
    finally:
        tp_group.Group.add_dep = orig_add
        tp_graph.DependencyGraph.get_pruning_group = orig_get


def _modules_in_traceback(e: BaseException, names: dict[int, str]) -> list[str]:
    """The model modules a failing torch-pruning frame was working on, innermost frame first: every weight layer
    of a pruning group (its root first), else one module or the layer feeding a graph node."""
    tb = e.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for v in frame.f_locals.values():
            items = getattr(v, "_group", None)
            if isinstance(items, list) and items and hasattr(items[0], "dep"):
                layers = [names.get(id(it.dep.target.module), "") for it in items
                          if isinstance(it.dep.target.module, (nn.Linear, nn.modules.conv._ConvNd))]
                if any(layers):
                    return list(dict.fromkeys(n for n in layers if n))
        for v in frame.f_locals.values():
            for cand in (v, getattr(v, "module", None), getattr(getattr(v, "target", None), "module", None)):
                if isinstance(cand, nn.Module) and id(cand) in names and names[id(cand)]:
                    return [names[id(cand)]]
            # A torch-pruning node of an op (a concat, a split) has no module: name the layer feeding it.
            for inp in getattr(v, "inputs", None) or []:
                m = getattr(inp, "module", None)
                if isinstance(m, nn.Module) and id(m) in names and names[id(m)]:
                    return [names[id(m)]]
    return []


def _check_ratio_leaves_channels(pruner: Any, ratio: float, round_to: int | None, names: dict[int, str],
                                 prune_heads: bool, keep: Sequence[str] = ()) -> None:
    """Refuse a ratio that empties a layer (torch-pruning would silently skip that layer instead).

    Every layer it would empty is found, not just the first: keeping one layer changes the groups the
    others fall in, so the search repeats with the found ones kept until nothing more would be emptied,
    and the refusal names all of them (or says that nothing would be left to prune)."""
    dg = pruner.DG
    ignored = list(pruner.ignored_layers)
    found: list[tuple[str, str]] = []  # (module name, what would happen to it)
    for _ in range(16):  # each round keeps what the previous one found; it ends long before this
        new: list[tuple[nn.Module, str, str]] = []
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=pruner.root_module_types):
            is_attn, qkv = pruner._is_atten_group(group)
            root = group[0][0].target.module
            label = names.get(id(root), type(root).__name__)
            if is_attn and prune_heads:
                heads = pruner.num_heads[qkv[0]]
                if _heads_to_keep(heads, ratio) < 1:
                    new.append((root, label, f"every attention head of {label!r} ({heads} heads)"))
                continue
            total = dg.get_out_channels(root)
            groups = pruner._get_channel_groups(group)
            per_group = total // groups
            n_pruned = per_group - int(per_group * (1 - ratio))
            if round_to and n_pruned > 0:
                rounded = total - n_pruned
                n_pruned = total - (rounded - rounded % round_to)
            if n_pruned >= per_group:
                why = f" after rounding to multiples of {round_to}" if round_to else ""
                if groups > 1:
                    why += (f", coupled in {groups} groups of {per_group} that torch-pruning thins evenly (e.g. a "
                            f"GroupNorm with {groups} groups), so it removes {n_pruned} of every {per_group}")
                new.append((root, label, f"every channel of {label!r} ({total} channels{why})"))
        if not new:
            break
        found += [(label, what) for _, label, what in new]
        ignored += [m for m, _, _ in new]
    if not found:
        return
    labels = [label for label, _ in found]
    more = f" (and of {len(found) - 1} more layer(s))" if len(found) > 1 else ""
    problem = f"{PASS}: ratio {ratio} would remove {found[0][1]}{more}"
    advice = f"lower the ratio{', lower round_to' if round_to else ''}"
    left = any(True for _ in dg.get_all_groups(ignored_layers=ignored, root_module_types=pruner.root_module_types))
    if not left:
        raise _WouldEmpty(problem, f"{advice}: no keep helps at this ratio, since keeping these layers leaves "
                          "nothing to prune")
    raise _WouldEmpty(problem, advice, [*keep, *labels])


@dataclass
class _Pruned:
    """What one pruning run did, beyond the module it changed."""

    kept_names: list[str]
    untraced: list[str] = field(default_factory=list)
    unmappable: list[str] = field(default_factory=list)


def _prune_at(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune, ctx: PassContext,
              ratio: float, precheck: bool) -> _Pruned:
    """Prune ``model`` in place at one channel ``ratio`` (and head fraction); check the result runs."""
    tp = _tp()
    names = {id(m): n for n, m in model.named_modules()}
    kept = resolve_names(model, cfg.keep, "keep", PASS)
    kept_names = list(cfg.keep)
    head = find_classifier(model, inputs)
    if head is not None and head not in kept_names:
        kept.append(dict(model.named_modules())[head])
        kept_names.append(head)
    last = output_module(model, inputs)
    if last is not None and last != head and last not in kept_names:
        # The output is made by a norm (an encoder's last_hidden_state): its width is the model's contract
        # (embedding size), so the residual stream keeps its width; heads and MLP widths are pruned.
        kept.append(dict(model.named_modules())[last])
        kept_names.append(last)
    with torch.no_grad():
        out0 = model(*inputs)
    first0 = out0[0] if isinstance(out0, (tuple, list)) else out0
    out_shape = tuple(first0.shape) if isinstance(first0, torch.Tensor) else None
    attn = attention_blocks(model)
    num_heads = {layer: int(getattr(blk, attr)) for _, blk, attr, layers in attn for layer in layers}
    whole_heads = heads_mode(cfg, attn)
    kept_set0 = {id(sub) for m in kept for sub in m.modules()}
    per_head = [(n, st) for n, blk, attr, layers in attn if not any(id(x) in kept_set0 for x in layers)
                for st in [per_head_state(blk, int(getattr(blk, attr)), layers)] if st]
    if per_head:
        # torch-pruning does not know that these tensors are indexed by head: removing heads (or head widths)
        # would leave them out of step. Keeping the blocks still prunes the MLP widths around them.
        blocks = [n for n, _ in per_head]
        raise _Refusal(f"{PASS}: attention block {blocks[0]!r} holds per-head state ({per_head[0][1]}), which "
                       "heads cannot be removed from consistently", "keep the attention blocks to prune the rest",
                       [*cfg.keep, *blocks])
    if not whole_heads:
        kept_set = {id(sub) for m in kept for sub in m.modules()}
        fixed = [(n, blk) for n, blk, _, layers in attn
                 if fixed_head_size(blk) is not None and not any(id(x) in kept_set for x in layers)]
        if fixed:
            n, blk = fixed[0]
            # Narrower heads under a reshape with the old head size would silently regroup (mix) the heads.
            raise _Refusal(f"{PASS}: attention block {n!r} ({type(blk).__name__}) reshapes with a fixed head size "
                           f"({fixed_head_size(blk)}), so its head widths cannot shrink",
                           "set prune_heads = true (remove whole heads)", [*cfg.keep, n])
    if cfg.importance == "taylor":
        _taylor_grads(model, ctx)
    ctx.log(f"{PASS}: tracing {type(model).__name__} into torch-pruning's dependency graph")
    try:
        with _quiet(), _bounded_search(names):
            pruner = tp.pruner.BasePruner(
                model, tuple(inputs), importance=_importance(cfg, model), global_pruning=cfg.global_pruning,
                pruning_ratio=ratio, iterative_steps=1, ignored_layers=kept, round_to=cfg.round_to,
                # Whole heads are removed by _prune_heads below: torch-pruning 1.6.1's own head pruning
                # removes at least one head per step and can empty a block.
                num_heads=dict(num_heads), prune_num_heads=False, prune_head_dims=not whole_heads,
            )
    except PassError:
        raise
    except Exception as e:  # torch-pruning's tracer raises many types on models it cannot follow
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        found = _modules_in_traceback(e, names)
        at = f" at {found[0]!r}" if found else ""
        # The graph is built for the whole model before any layer is kept, so no keep can avoid this.
        raise _Refusal(f"{PASS}: torch-pruning could not build its dependency graph of {type(model).__name__}{at} "
                       f"({type(e).__name__}: {first[:300]})",
                       "no keep avoids this (the graph is built for the whole model before any layer is kept): "
                       "make that forward traceable, or compress this model without prune.channels "
                       "(quantize.int8 / quantize.dynamic, or prune.magnitude for sparsity)") from e
    ctx.log(f"{PASS}: dependency graph of {len(pruner.DG.module2node):,} nodes built; removing channels")
    info = _Pruned(kept_names, untraced=[n for n, m in weight_layers(model) if m not in pruner.DG.module2node])
    for m in _concat_into_grouped(pruner):
        pruner.ignored_layers.extend(m.modules())
        info.unmappable.append(names[id(m)])
    if precheck and not cfg.global_pruning:
        _check_ratio_leaves_channels(pruner, ratio, cfg.round_to, names, whole_heads, cfg.keep)

    kept_ids = {id(m) for m in pruner.ignored_layers}
    head_blocks = [a for a in attn if not any(id(layer) in kept_ids for layer in a[3])] if whole_heads else []
    heads_init = {id(blk): int(getattr(blk, attr)) for _, blk, attr, _ in head_blocks}
    if head_blocks and _prune_heads(pruner, head_blocks, heads_init, ratio, cfg.global_pruning):
        if cfg.importance == "taylor":
            _taylor_grads(model, ctx)  # the removed heads took their gradients with them
    # torch-pruning silently skips a group it would empty; record those to refuse the ratio instead.
    refused: list[str] = []
    check = pruner.DG.check_pruning_group

    def checked(group: Any) -> bool:
        ok = bool(check(group))
        if not ok:
            refused.append(names.get(id(group[0][0].target.module), "?"))
        return ok

    pruner.DG.check_pruning_group = checked
    current: list[str] = []  # the group being pruned: its root first, then every weight layer in it
    try:
        with _quiet(), _bounded_search(names):
            for group in pruner.step(interactive=True):
                root = group[0][0].target.module
                outs = [names.get(id(dep.target.module), "") for dep, _ in group
                        if isinstance(dep.target.module, (nn.Linear, nn.modules.conv._ConvNd))]
                current[:] = [names.get(id(root), ""), *outs]
                group.prune()
    except PassError:
        raise
    except Exception as e:  # an op torch-pruning cannot prune consistently
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # The failure is in the group being pruned, or (raised inside the generator, e.g. while scoring the next
        # group) in the group a torch-pruning frame holds. Keeping its root alone may not do: an attention group
        # is re-rooted at the layer after it (whose inputs it prunes), so every weight layer of it is kept.
        inside = _modules_in_traceback(e, names)
        group_layers = inside or [n for n in current if n]
        where = group_layers[0] if group_layers else None
        at = f" of the layers coupled to {where!r}" if where else ""
        coupled = group_layers
        raise _Refusal(f"{PASS}: torch-pruning failed while removing channels{at} ({type(e).__name__}: "
                       f"{first[:300]})", "lower the ratio", [*cfg.keep, *coupled]) from e
    model.zero_grad(set_to_none=True)
    if refused:
        why = (" (their importance scores all fall under the global threshold, e.g. ties, as with 'bn_scale' on an "
               "untrained model where every BN scale is 1); use local pruning or another importance, "
               if cfg.global_pruning else "")
        raise _WouldEmpty(f"{PASS}: {'global ' if cfg.global_pruning else ''}ratio {ratio:.4g} would remove every "
                          f"channel of {', '.join(repr(r) for r in refused)}{why.rstrip('; ,')}",
                          f"lower the ratio{' or round_to' if cfg.round_to else ''}", [*cfg.keep, *refused])

    where, cls, feeder, err = _locate_failure(model, inputs)
    if where or cls:
        label = repr(where) if where else f"the model's own forward ({cls})"
        # Keeping a module without Conv/Linear weights changes nothing; keeping the layer that feeds it does.
        keep_hint = [feeder] if feeder else ([where] if where else [])
        # When keeping the feeding layer is not enough, the failing module itself, then the block around it.
        wider = [where, where.rpartition(".")[0]] if where else []
        raise _Refusal(
            f"{PASS}: after pruning, {label} fails: {err[:300]}. torch-pruning's tracer could not follow this "
            f"module (it holds channel-sized state or hard-coded shapes), so its channels went out of step",
            "keep the layer that feeds it", [*cfg.keep, *keep_hint], [w for w in wider if w])
    with torch.no_grad():
        out_now = model(*inputs)
    first_now = out_now[0] if isinstance(out_now, (tuple, list)) else out_now
    if out_shape is not None and isinstance(first_now, torch.Tensor) and tuple(first_now.shape) != out_shape:
        raise PassError(f"{PASS}: pruning changed the model's output shape from {list(out_shape)} to "
                        f"{list(first_now.shape)}; list the module that produces the output in keep")
    empty = [n for n, (i, o) in layer_widths(model).items() if i == 0 or o == 0]
    if empty:
        raise PassError(f"{PASS}: pruning left no channels in {', '.join(empty)}; lower the ratio or keep them")
    return info


_KEEP_TRIES = 12


def _verified_keep(first: _Refusal, pristine: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune,
                   ctx: PassContext, spent: float) -> PassError:
    """The refusal to raise, with a ``keep`` that was checked to go through, or saying that none was found.

    The suggested keep is tried on a fresh copy; when that run refuses too, the modules its refusal names are
    added and it is tried again (a few times, within a few times the first attempt's duration), so the user is
    never sent round the loop of "keep this" -> "now keep that"."""
    keep = list(dict.fromkeys([*cfg.keep, *first.candidates]))
    if not first.candidates or keep == list(cfg.keep):
        return first
    budget = max(60.0, 4 * spent)
    t0 = time.monotonic()
    err: PassError = first
    widths0 = layer_widths(pristine)
    heads0 = {n: int(getattr(b, a)) for n, b, a, _ in attention_blocks(pristine)}
    for i in range(1, _KEEP_TRIES + 1):
        ctx.log(f"{PASS}: refused; checking that keep = {keep!r} goes through (try {i} of at most {_KEEP_TRIES})")
        trial = copy.deepcopy(pristine)
        try:
            _prune_at(trial, inputs, cfg.model_copy(update={"keep": keep}), ctx, cfg.ratio or 0.0, precheck=True)
        except _Refusal as e:
            err = e
            more = [c for c in e.candidates if c not in keep] or [c for c in e.wider if c not in keep][:1]
            if not more or time.monotonic() - t0 > budget:
                break
            keep = list(dict.fromkeys([*keep, *more]))
            continue
        except PassError as e:
            err = e
            break
        heads1 = {n: int(getattr(b, a)) for n, b, a, _ in attention_blocks(trial)}
        if layer_widths(trial) == widths0 and heads1 == heads0:
            return PassError(f"{first.problem}; {first.advice}: no keep helps, since keeping what it names "
                             f"(keep = {keep!r}) leaves nothing to prune at this ratio")
        # A module kept with its block is named once, by the block (keep covers submodules).
        keep = [k for k in keep if not any(k.startswith(o + ".") for o in keep)]
        return PassError(f"{first.problem}; {first.advice}; or list them in keep: keep = {keep!r} (checked: pruning "
                         "goes through with it)")
    why = str(err).split(": ", 1)[-1][:300]
    return PassError(f"{first.problem}; {first.advice}. No keep that goes through was found: with keep = {keep!r} "
                     f"it still fails ({why})")


def _search_macs(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune, ctx: PassContext,
                 macs0: int) -> tuple[nn.Module, _Pruned, float, int]:
    """Bisect the channel ratio for the least pruning that meets the MACs target.

    Each trial prunes a fresh copy in one shot; MACs fall step-wise with the
    ratio (more so with round_to), so bisection lands on the widest model at
    or under the target instead of overshooting the way fixed steps do.
    """
    target = cfg.macs_target * macs0  # type: ignore[operator]

    def trial(r: float) -> tuple[nn.Module, _Pruned, int]:
        m = copy.deepcopy(model)
        info = _prune_at(m, inputs, cfg, ctx, r, precheck=True)
        return m, info, count_macs_params(m, inputs)[0]

    # torch-pruning skips a layer whose channels would all go (round_to makes that happen early), so
    # MACs stop falling with the ratio there: ratios that would empty a layer count as too high.
    best: tuple[nn.Module, _Pruned, float] | None = None
    least = macs0
    lo, hi, trials = 0.0, _MACS_MAX_RATIO, 0
    while hi - lo > _MACS_TOLERANCE:
        mid = (lo + hi) / 2
        trials += 1
        try:
            m, info, macs = trial(mid)
        except _WouldEmpty:
            hi = mid
            continue
        least = min(least, macs)
        if macs <= target:
            best, hi = (m, info, mid), mid
        else:
            lo = mid
    if best is None:
        raise PassError(f"{PASS}: could not reach macs_target {cfg.macs_target}: the most pruning that leaves "
                        f"every layer a channel{f' (in multiples of {cfg.round_to})' if cfg.round_to else ''} "
                        f"keeps {least / macs0:.3f} of the MACs (kept layers: {', '.join(cfg.keep) or 'the head'}); "
                        "raise macs_target, lower round_to, or keep fewer layers")
    return best[0], best[1], best[2], trials


def prune_module(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune,
                 ctx: PassContext) -> tuple[nn.Module, dict[str, Any]]:
    """Prune (a copy of, for MACs targets) ``model``; return the pruned module and the metadata record."""
    if cfg.importance == "taylor":
        require_labels(ctx, "importance 'taylor' (it ranks channels by loss gradients)", PASS,
                       "or use importance 'l1' / 'l2' / 'bn_scale'")
    _importance(cfg, model)  # refuse an impossible criterion before any work
    macs0, params0 = count_macs_params(model, inputs)
    widths0 = layer_widths(model)
    attn0 = {n: int(getattr(blk, attr)) for n, blk, attr, _ in attention_blocks(model)}
    before = shape_snapshot(model)
    attention_counts: dict[str, int] = {}
    att_err = ""
    try:
        att0 = attention_macs(model, inputs) if attn0 else 0
    except Exception as e:  # the FLOP counter is an extra figure; its failure must not fail the pass
        att0, att_err = -1, (str(e).splitlines()[0][:120] if str(e) else type(e).__name__)

    if cfg.ratio is not None:
        pristine = copy.deepcopy(model)  # a refusal's keep is checked on a fresh copy
        t0 = time.monotonic()
        try:
            info = _prune_at(model, inputs, cfg, ctx, cfg.ratio, precheck=True)
        except _Refusal as e:
            raise _verified_keep(e, pristine, inputs, cfg, ctx, time.monotonic() - t0) from e
        ratio_used, trials = cfg.ratio, 1
    else:
        model, info, ratio_used, trials = _search_macs(model, inputs, cfg, ctx, macs0)
    attn = attention_blocks(model)
    widths1 = layer_widths(model)
    heads1 = {n: int(getattr(blk, attr)) for n, blk, attr, _ in attn}
    if widths1 == widths0 and heads1 == attn0:
        raise PassError(f"{PASS}: pruning removed no channel of {type(model).__name__} at ratio "
                        f"{ratio_used:.4g}; raise the ratio or keep fewer layers")
    macs1, params1 = count_macs_params(model, inputs)
    diff = shape_diff(before, shape_snapshot(model))
    pruned_layers = [n for n in widths0 if n not in info.kept_names]
    out0 = sum(widths0[n][1] for n in pruned_layers)
    out1 = sum(widths1[n][1] for n in pruned_layers)
    notes = ["channels are physically removed: the exported model is a smaller dense model, faster on every target"]
    if attn:
        try:
            att1 = attention_macs(model, inputs) if att0 >= 0 else -1
        except Exception as e:  # the FLOP counter is an extra figure; its failure must not fail the pass
            att1, att_err = -1, (str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
        if att1 < 0:
            notes.append(f"MACs do not count the attention matrix products (q @ k^T, att @ v); counting them "
                         f"failed: {att_err}")
        else:
            notes.append(f"MACs above exclude the attention matrix products (q @ k^T, att @ v), counted separately: "
                         f"{att0:,} -> {att1:,} at this input shape (they grow with the sequence length squared)")
            attention_counts = {"attention_macs_before": att0, "attention_macs_after": att1}
    if info.unmappable:
        notes.append("kept unpruned, because their outputs are concatenated (or split) into a grouped conv, whose "
                     f"channel groups torch-pruning cannot map: {', '.join(info.unmappable)}")
    if info.untraced:
        notes.append(f"not reached by the tracer, left unpruned: {', '.join(info.untraced)}")
    if cfg.macs_target is not None and macs1 / macs0 < 0.8 * cfg.macs_target:
        # The widest model that meets the target can be much smaller than asked: widths move in steps.
        notes.append(f"macs_target {cfg.macs_target} met at {macs1 / macs0:.2f} of the MACs: channel counts move in "
                     f"steps{f' of {cfg.round_to}' if cfg.round_to else ''}, and the next wider model was above the "
                     "target" + ("; a smaller round_to lands closer" if cfg.round_to else ""))
    meta: dict[str, Any] = {
        "mode": "ratio" if cfg.ratio is not None else "macs_target",
        "ratio": cfg.ratio, "macs_target": cfg.macs_target, "ratio_used": round(ratio_used, 4), "trials": trials,
        "importance": cfg.importance, "global_pruning": cfg.global_pruning, "round_to": cfg.round_to,
        "params_before": params0, "params_after": params1, "params_ratio": round(params1 / params0, 4),
        "macs_before": macs0, "macs_after": macs1, "macs_ratio": round(macs1 / macs0, 4),
        "channel_ratio_achieved": round(1 - out1 / out0, 4) if out0 else 0.0,
        "kept": info.kept_names,
        "widths_before": widths0, "widths_after": widths1,
        "notes": notes,
    }
    if attn:
        meta["heads_before"] = attn0
        meta["heads_after"] = heads1
        meta.update(attention_counts)
    meta["_diff"] = diff
    return model, meta


@register_pass(ChannelPrune, consumes="pytorch", produces="pytorch", training_fields=("finetune_epochs",))
def prune_channels(art: Artifact, cfg: ChannelPrune, ctx: PassContext) -> Artifact:
    """Structured channel/head pruning with torch-pruning (fewer MACs on every target)."""
    if cfg.finetune_epochs:
        require_labels(ctx, f"finetune_epochs={cfg.finetune_epochs}", PASS)
    model = clone_module(art).eval()
    inputs = sample_inputs(art.inputs, seed=ctx.seed)
    model, meta = prune_module(model, inputs, cfg, ctx)
    diff = meta.pop("_diff")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if cfg.bn_recalibrate and has_bn:
        if ctx.data is None:
            meta["notes"].append("BatchNorm statistics were not re-estimated (no data in the pipeline); "
                                 "accuracy drops more than it needs to")
        else:
            meta["bn_recalibrated_samples"] = recalibrate_bn(model, ctx.data)
    if cfg.finetune_epochs:
        meta["finetune"] = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
                            "val_top1": finetune(model, ctx, cfg.finetune_epochs, cfg.finetune_lr, PASS)}
    model.eval()
    ctx.log(f"{PASS}: MACs {meta['macs_before']:,} -> {meta['macs_after']:,} ({meta['macs_ratio']:.3f}x), "
            f"params {meta['params_before']:,} -> {meta['params_after']:,}")
    return torch_artifact(model, art, ctx, structure_step={"hook": PASS, "data": diff}, metadata={PASS: meta})
