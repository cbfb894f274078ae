"""Refusals of ``prune.channels`` a user can act on: what failed, where, and which layers to skip.

Each refusal names the modules whose skipping may let the pruning go through (checked by a trial run before the
user is told, see ``prune_channels._verified_skip``). Private to ``passes/``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compress.errors import PassError

from ._prune_heads import heads_to_keep

PASS = "prune.channels"


def locate_failure(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[str, str, str | None, str]:
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


def concat_into_grouped(pruner: Any) -> list[nn.Module]:
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

class Refusal(PassError):
    """A refusal that names the modules whose skipping may let the pruning go through.

    ``problem`` says what went wrong and where; ``advice`` what else to try; ``candidates`` the modules
    to add to ``skip`` (checked by trial pruning before the user is told, see ``prune_channels._verified_skip``)."""

    def __init__(self, problem: str, advice: str, candidates: Sequence[str] = (), wider: Sequence[str] = ()) -> None:
        self.problem, self.advice, self.candidates = problem, advice, list(dict.fromkeys(candidates))
        self.wider = list(wider)  # kept next when keeping the candidates changes nothing (the same module fails)
        skip = f"; or list them in skip: skip = {self.candidates!r}" if self.candidates else ""
        super().__init__(f"{problem}; {advice}{skip}")


class WouldEmpty(Refusal):
    """A ratio that would remove every channel (or head) of some layer."""


class GraphExplodes(Refusal):
    """torch-pruning's dependency search from one layer does not end (it loops through the graph)."""


# A pruning group larger than this many dependencies per graph node is a search that loops (FocalNet's
# modulation: the search re-visits the same layers with ever new index sets and runs for hours).
_GROUP_LIMIT_PER_NODE = 8
_GROUP_LIMIT_MIN = 2000


@contextmanager
def bounded_search(names: dict[int, str]) -> Iterator[None]:
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
            # explodes in turn), so the block is what to skip.
            block = label.rpartition(".")[0] if id(root) in names else ""
            raise GraphExplodes(
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


def modules_in_traceback(e: BaseException, names: dict[int, str]) -> list[str]:
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


def check_ratio_leaves_channels(pruner: Any, ratio: float, round_to: int | None, names: dict[int, str],
                                 prune_heads: bool, skip: Sequence[str] = ()) -> None:
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
                if heads_to_keep(heads, ratio) < 1:
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
        raise WouldEmpty(problem, f"{advice}: no skip helps at this ratio, since skipping these layers leaves "
                          "nothing to prune")
    raise WouldEmpty(problem, advice, [*skip, *labels])
