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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.core.artifact import Artifact
from compress.core.config import PassConfig
from compress.core.layers import (
    LayerSelecting,
    LayerSelector,
    check_on_root,
    outermost,
    skip_field,
    torch_layers,
)
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
    shape_diff,
    shape_snapshot,
    weight_layers,
)
from ._prune_heads import attention_blocks, fixed_head_size, heads_mode, per_head_state, prune_heads, quiet
from ._prune_refusals import (
    Refusal,
    WouldEmpty,
    bounded_search,
    check_ratio_leaves_channels,
    concat_into_grouped,
    locate_failure,
    modules_in_traceback,
)

PASS = "prune.channels"
# A MACs target bisects the channel ratio in [0, _MACS_MAX_RATIO] down to this resolution.
_MACS_MAX_RATIO = 0.95
_MACS_TOLERANCE = 0.01
_TAYLOR_BATCHES = 4


# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep": ""}


class ChannelPrune(LayerSelecting, PassConfig):
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
    skip: LayerSelector = skip_field("left unpruned (with their submodules; the classifier head always is)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS
    # Attention: remove whole heads (True) or shrink every head's width (False). None (auto): whole heads
    # when a block reshapes with a stored head width (Hugging Face attention_head_size), else widths.
    prune_heads: bool | None = None
    bn_recalibrate: bool = True  # re-estimate BatchNorm statistics on the pipeline's data (no labels needed)
    finetune_epochs: int = Field(0, ge=0, le=1000)
    finetune_lr: float = Field(1e-3, gt=0, le=1)

    def preflight(self, root: Any, text: Any) -> None:
        check_on_root(self.skip, root, PASS)

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


@dataclass
class _Pruned:
    """What one pruning run did, beyond the module it changed."""

    kept_names: list[str]
    untraced: list[str] = field(default_factory=list)
    unmappable: list[str] = field(default_factory=list)


def _kept_layers(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune) -> list[str]:
    """The layers left unpruned: what ``skip`` selects (outermost names), the classifier head, and the module
    that makes the model's output when it is not the head."""
    kept_names = outermost(cfg.skip.select(torch_layers(model), PASS, eligible=[n for n, _ in weight_layers(model)]))
    head = find_classifier(model, inputs)
    if head is not None and head not in kept_names:
        kept_names.append(head)
    last = output_module(model, inputs)
    if last is not None and last != head and last not in kept_names:
        # The output is made by a norm (an encoder's last_hidden_state): its width is the model's contract
        # (embedding size), so the residual stream keeps its width; heads and MLP widths are pruned.
        kept_names.append(last)
    return kept_names


def _refuse_attention(attn: list[tuple[str, nn.Module, str, list[nn.Linear]]], kept: list[nn.Module],
                      whole_heads: bool, skip: list[str]) -> None:
    """Refuse attention blocks whose heads cannot be pruned consistently, naming the blocks to skip."""
    kept_set = {id(sub) for m in kept for sub in m.modules()}
    per_head = [(n, st) for n, blk, attr, layers in attn if not any(id(x) in kept_set for x in layers)
                for st in [per_head_state(blk, int(getattr(blk, attr)), layers)] if st]
    if per_head:
        # torch-pruning does not know that these tensors are indexed by head: removing heads (or head widths)
        # would leave them out of step. Keeping the blocks still prunes the MLP widths around them.
        blocks = [n for n, _ in per_head]
        raise Refusal(f"{PASS}: attention block {blocks[0]!r} holds per-head state ({per_head[0][1]}), which "
                      "heads cannot be removed from consistently", "skip the attention blocks to prune the rest",
                      [*skip, *blocks])
    if not whole_heads:
        fixed = [(n, blk) for n, blk, _, layers in attn
                 if fixed_head_size(blk) is not None and not any(id(x) in kept_set for x in layers)]
        if fixed:
            n, blk = fixed[0]
            # Narrower heads under a reshape with the old head size would silently regroup (mix) the heads.
            raise Refusal(f"{PASS}: attention block {n!r} ({type(blk).__name__}) reshapes with a fixed head size "
                          f"({fixed_head_size(blk)}), so its head widths cannot shrink",
                          "set prune_heads = true (remove whole heads)", [*skip, n])


def _build_pruner(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune, ratio: float,
                  kept: list[nn.Module], attn: list[tuple[str, nn.Module, str, list[nn.Linear]]],
                  whole_heads: bool, names: dict[int, str]) -> Any:
    """torch-pruning's pruner over the model's dependency graph, or a refusal naming where tracing failed."""
    tp = _tp()
    num_heads = {layer: int(getattr(blk, attr)) for _, blk, attr, layers in attn for layer in layers}
    try:
        with quiet(), bounded_search(names):
            return tp.pruner.BasePruner(
                model, tuple(inputs), importance=_importance(cfg, model), global_pruning=cfg.global_pruning,
                pruning_ratio=ratio, iterative_steps=1, ignored_layers=kept, round_to=cfg.round_to,
                # Whole heads are removed by prune_heads below: torch-pruning 1.6.1's own head pruning
                # removes at least one head per step and can empty a block.
                num_heads=dict(num_heads), prune_num_heads=False, prune_head_dims=not whole_heads,
            )
    except PassError:
        raise
    except Exception as e:  # torch-pruning's tracer raises many types on models it cannot follow
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        found = modules_in_traceback(e, names)
        at = f" at {found[0]!r}" if found else ""
        # The graph is built for the whole model before any layer is skipped, so no skip can avoid this.
        raise Refusal(f"{PASS}: torch-pruning could not build its dependency graph of {type(model).__name__}{at} "
                      f"({type(e).__name__}: {first[:300]})",
                      "no skip avoids this (the graph is built for the whole model before any layer is skipped): "
                      "make that forward traceable, or compress this model without prune.channels "
                      "(quantize.int8 / quantize.dynamic, or prune.magnitude for sparsity)") from e


def _remove_channels(pruner: Any, cfg: ChannelPrune, ratio: float, names: dict[int, str], skip: list[str]) -> None:
    """Run the pruner's steps; refuse a failing group (naming its layers) or a group it would empty."""
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
        with quiet(), bounded_search(names):
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
        # group) in the group a torch-pruning frame holds. Skipping its root alone may not do: an attention group
        # is re-rooted at the layer after it (whose inputs it prunes), so every weight layer of it is skipped.
        group_layers = modules_in_traceback(e, names) or [n for n in current if n]
        where = group_layers[0] if group_layers else None
        at = f" of the layers coupled to {where!r}" if where else ""
        raise Refusal(f"{PASS}: torch-pruning failed while removing channels{at} ({type(e).__name__}: "
                      f"{first[:300]})", "lower the ratio", [*skip, *group_layers]) from e
    if refused:
        why = (" (their importance scores all fall under the global threshold, e.g. ties, as with 'bn_scale' on an "
               "untrained model where every BN scale is 1); use local pruning or another importance, "
               if cfg.global_pruning else "")
        raise WouldEmpty(f"{PASS}: {'global ' if cfg.global_pruning else ''}ratio {ratio:.4g} would remove every "
                         f"channel of {', '.join(repr(r) for r in refused)}{why.rstrip('; ,')}",
                         f"lower the ratio{' or round_to' if cfg.round_to else ''}", [*skip, *refused])


def _check_pruned(model: nn.Module, inputs: Sequence[torch.Tensor], out_shape: tuple[int, ...] | None,
                  skip: list[str]) -> None:
    """Refuse a pruned model that fails to run, changed its output shape, or has a layer left empty."""
    where, cls, feeder, err = locate_failure(model, inputs)
    if where or cls:
        label = repr(where) if where else f"the model's own forward ({cls})"
        # Skipping a module without Conv/Linear weights changes nothing; skipping the layer that feeds it does.
        hint = [feeder] if feeder else ([where] if where else [])
        # When skipping the feeding layer is not enough, the failing module itself, then the block around it.
        wider = [where, where.rpartition(".")[0]] if where else []
        raise Refusal(
            f"{PASS}: after pruning, {label} fails: {err[:300]}. torch-pruning's tracer could not follow this "
            f"module (it holds channel-sized state or hard-coded shapes), so its channels went out of step",
            "skip the layer that feeds it", [*skip, *hint], [w for w in wider if w])
    with torch.no_grad():
        out_now = model(*inputs)
    first_now = out_now[0] if isinstance(out_now, (tuple, list)) else out_now
    if out_shape is not None and isinstance(first_now, torch.Tensor) and tuple(first_now.shape) != out_shape:
        raise PassError(f"{PASS}: pruning changed the model's output shape from {list(out_shape)} to "
                        f"{list(first_now.shape)}; list the module that produces the output in skip")
    empty = [n for n, (i, o) in layer_widths(model).items() if i == 0 or o == 0]
    if empty:
        raise PassError(f"{PASS}: pruning left no channels in {', '.join(empty)}; lower the ratio or skip them")


def _prune_at(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune, ctx: PassContext,
              ratio: float, precheck: bool) -> _Pruned:
    """Prune ``model`` in place at one channel ``ratio`` (and head fraction); check the result runs."""
    names = {id(m): n for n, m in model.named_modules()}
    table = dict(model.named_modules())
    kept_names = _kept_layers(model, inputs, cfg)
    kept = [table[n] for n in kept_names]
    skip = list(cfg.skip.entries)  # what a refusal suggests starts from what the user wrote
    with torch.no_grad():
        out0 = model(*inputs)
    first0 = out0[0] if isinstance(out0, (tuple, list)) else out0
    out_shape = tuple(first0.shape) if isinstance(first0, torch.Tensor) else None
    attn = attention_blocks(model)
    whole_heads = heads_mode(cfg.prune_heads, attn)
    _refuse_attention(attn, kept, whole_heads, skip)
    if cfg.importance == "taylor":
        _taylor_grads(model, ctx)
    ctx.log(f"{PASS}: tracing {type(model).__name__} into torch-pruning's dependency graph")
    pruner = _build_pruner(model, inputs, cfg, ratio, kept, attn, whole_heads, names)
    ctx.log(f"{PASS}: dependency graph of {len(pruner.DG.module2node):,} nodes built; removing channels")
    info = _Pruned(kept_names, untraced=[n for n, m in weight_layers(model) if m not in pruner.DG.module2node])
    for m in concat_into_grouped(pruner):
        pruner.ignored_layers.extend(m.modules())
        info.unmappable.append(names[id(m)])
    if precheck and not cfg.global_pruning:
        check_ratio_leaves_channels(pruner, ratio, cfg.round_to, names, whole_heads, skip)

    kept_ids = {id(m) for m in pruner.ignored_layers}
    head_blocks = [a for a in attn if not any(id(layer) in kept_ids for layer in a[3])] if whole_heads else []
    heads_init = {id(blk): int(getattr(blk, attr)) for _, blk, attr, _ in head_blocks}
    if head_blocks and prune_heads(pruner, head_blocks, heads_init, ratio, cfg.global_pruning):
        if cfg.importance == "taylor":
            _taylor_grads(model, ctx)  # the removed heads took their gradients with them
    _remove_channels(pruner, cfg, ratio, names, skip)
    model.zero_grad(set_to_none=True)
    _check_pruned(model, inputs, out_shape, skip)
    return info


_SKIP_TRIES = 12


def _verified_skip(first: Refusal, pristine: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune,
                   ctx: PassContext, spent: float) -> PassError:
    """The refusal to raise, with a ``skip`` that was checked to go through, or saying that none was found.

    The suggested skip is tried on a fresh copy; when that run refuses too, the modules its refusal names are
    added and it is tried again (a few times, within a few times the first attempt's duration), so the user is
    never sent round the loop of "skip this" -> "now skip that"."""
    skip = list(dict.fromkeys([*cfg.skip.entries, *first.candidates]))
    if not first.candidates or skip == list(cfg.skip.entries):
        return first
    budget = max(60.0, 4 * spent)
    t0 = time.monotonic()
    err: PassError = first
    widths0 = layer_widths(pristine)
    heads0 = {n: int(getattr(b, a)) for n, b, a, _ in attention_blocks(pristine)}
    for i in range(1, _SKIP_TRIES + 1):
        ctx.log(f"{PASS}: refused; checking that skip = {skip!r} goes through (try {i} of at most {_SKIP_TRIES})")
        trial = copy.deepcopy(pristine)
        tried = cfg.model_copy(update={"skip": LayerSelector(tuple(skip), cfg.skip.predicate)})
        try:
            _prune_at(trial, inputs, tried, ctx, cfg.ratio or 0.0, precheck=True)
        except Refusal as e:
            err = e
            more = [c for c in e.candidates if c not in skip] or [c for c in e.wider if c not in skip][:1]
            if not more or time.monotonic() - t0 > budget:
                break
            skip = list(dict.fromkeys([*skip, *more]))
            continue
        except PassError as e:
            err = e
            break
        heads1 = {n: int(getattr(b, a)) for n, b, a, _ in attention_blocks(trial)}
        if layer_widths(trial) == widths0 and heads1 == heads0:
            return PassError(f"{first.problem}; {first.advice}: no skip helps, since skipping what it names "
                             f"(skip = {skip!r}) leaves nothing to prune at this ratio")
        # A module skipped with its block is named once, by the block (skip covers submodules).
        skip = outermost(skip)
        return PassError(f"{first.problem}; {first.advice}; or list them in skip: skip = {skip!r} (checked: pruning "
                         "goes through with it)")
    why = str(err).split(": ", 1)[-1][:300]
    return PassError(f"{first.problem}; {first.advice}. No skip that goes through was found: with skip = {skip!r} "
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
        except WouldEmpty:
            hi = mid
            continue
        least = min(least, macs)
        if macs <= target:
            best, hi = (m, info, mid), mid
        else:
            lo = mid
    if best is None:
        skipped = ", ".join(cfg.skip.to_json()) or "the head"
        raise PassError(f"{PASS}: could not reach macs_target {cfg.macs_target}: the most pruning that leaves "
                        f"every layer a channel{f' (in multiples of {cfg.round_to})' if cfg.round_to else ''} "
                        f"keeps {least / macs0:.3f} of the MACs (skipped: {skipped}); "
                        "raise macs_target, lower round_to, or skip fewer layers")
    return best[0], best[1], best[2], trials


def _attention_note(model: nn.Module, inputs: Sequence[torch.Tensor], att0: int,
                    att_err: str) -> tuple[str, dict[str, int]]:
    """The note on attention matrix products (not in the MACs figures), and their counts before and after."""
    try:
        att1 = attention_macs(model, inputs) if att0 >= 0 else -1
    except Exception as e:  # the FLOP counter is an extra figure; its failure must not fail the pass
        att1, att_err = -1, (str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
    if att1 < 0:
        return (f"MACs do not count the attention matrix products (q @ k^T, att @ v); counting them failed: "
                f"{att_err}"), {}
    return (f"MACs above exclude the attention matrix products (q @ k^T, att @ v), counted separately: "
            f"{att0:,} -> {att1:,} at this input shape (they grow with the sequence length squared)",
            {"attention_macs_before": att0, "attention_macs_after": att1})


def _blocked_layout_note(model: nn.Module, pruned: list[str], widths: dict[str, Any], cfg: ChannelPrune) -> str | None:
    """A warning when pruned convolutions end at channel counts off the SIMD block: ONNX Runtime's x86 CPU kernels
    run a Conv in their blocked layout (NCHWc) only with channel counts in multiples of 8 (AVX2) or 16 (AVX-512),
    and off it fall back to a generic kernel plus layout reorders. Measured on the digits CNN (22/22/45 channels,
    half the MACs): 0.73x the original's speed at batch 1 on ONNX Runtime; with round_to=16 (16/16/32) 1.3x faster
    (benchmarks/results/demo.md)."""
    if cfg.round_to is not None and cfg.round_to % 8 == 0:
        return None
    modules = dict(model.named_modules())
    odd = [f"{n} ({widths[n][1]})" for n in pruned
           if isinstance(modules.get(n), nn.Conv2d) and widths[n][1] % 8 and modules[n].groups == 1]
    if not odd:
        return None
    return (f"convolutions pruned to channel counts that are not multiples of 8: {', '.join(odd[:6])}"
            f"{' ...' if len(odd) > 6 else ''}; ONNX Runtime's blocked x86 kernels need multiples of 8 (AVX2) or 16 "
            "(AVX-512), and off them a pruned model can run slower than the original: set round_to = 16 (or 8)")


def prune_module(model: nn.Module, inputs: Sequence[torch.Tensor], cfg: ChannelPrune,
                 ctx: PassContext) -> tuple[nn.Module, dict[str, Any]]:
    """Prune (a copy of, for MACs targets) ``model``; return the pruned module and the metadata record."""
    if cfg.importance == "taylor":
        require_labels(ctx, "importance 'taylor' (it ranks channels by loss gradients)", PASS,
                       "or use importance 'l1' / 'l2' / 'bn_scale'")
    _importance(cfg, model)  # refuse an impossible criterion before any work
    cfg.skip.select(torch_layers(model), PASS, eligible=[n for n, _ in weight_layers(model)])  # and a bad skip
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
        pristine = copy.deepcopy(model)  # a refusal's skip is checked on a fresh copy
        t0 = time.monotonic()
        try:
            info = _prune_at(model, inputs, cfg, ctx, cfg.ratio, precheck=True)
        except Refusal as e:
            raise _verified_skip(e, pristine, inputs, cfg, ctx, time.monotonic() - t0) from e
        ratio_used, trials = cfg.ratio, 1
    else:
        model, info, ratio_used, trials = _search_macs(model, inputs, cfg, ctx, macs0)
    attn = attention_blocks(model)
    widths1 = layer_widths(model)
    heads1 = {n: int(getattr(blk, attr)) for n, blk, attr, _ in attn}
    if widths1 == widths0 and heads1 == attn0:
        raise PassError(f"{PASS}: pruning removed no channel of {type(model).__name__} at ratio "
                        f"{ratio_used:.4g}; raise the ratio or skip fewer layers")
    macs1, params1 = count_macs_params(model, inputs)
    diff = shape_diff(before, shape_snapshot(model))
    pruned_layers = [n for n in widths0 if n not in info.kept_names]
    out0 = sum(widths0[n][1] for n in pruned_layers)
    out1 = sum(widths1[n][1] for n in pruned_layers)
    notes = ["channels are physically removed: the exported model is a smaller dense model with fewer MACs on every "
             "target"]
    if (blocked := _blocked_layout_note(model, pruned_layers, widths1, cfg)) is not None:
        notes.append(blocked)
    if attn:
        note, attention_counts = _attention_note(model, inputs, att0, att_err)
        notes.append(note)
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
