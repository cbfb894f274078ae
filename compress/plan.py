"""Stage 1 of a run: the plan. Everything that can be checked is checked here, before any pass runs:
the output folder, the targets and their settings, the metric, every chain (each pass accepts what
the one before produced), the model, the data, its labels and what the passes need of it.

The plan holds no measurement: ``compress.execute`` runs its chains, ``compress.measurement`` times
and scores what they made, ``compress.pipeline`` writes the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import preflight
from .artifact import ONNX, PYTORCH, Artifact
from .cache import Cache
from .config import PassConfig, TargetConfig
from .data import DataBundle, load_data
from .errors import RecipeError
from .manager import Instrument, PassContext, PassManager, VerifyInstrument
from .models import load_model
from .recipe import Recipe, load_recipe
from .registry import default_targets, get_pass, lowering_pass, make_target

REFERENCE = "recorded"  # the variant name of a stored baseline artifact re-timed in this run
BASELINE = "baseline"


@dataclass
class Plan:
    """A validated run: what will be made and measured, and where."""

    recipe: Recipe
    out: Path
    write: bool
    cache: Cache
    say: Callable[[str], None]
    progress: bool
    target_cfgs: list[TargetConfig]
    targets: list[Any]  # compress.targets.base.Target
    chains: dict[str, PassManager]  # variant name -> its pass chain
    base: PassManager  # the baseline's chain (the lowering alone, when a target needs ONNX)
    auto_export: bool  # the lowering pass was inserted, not written in the recipe
    root: Artifact
    data: DataBundle | None
    n_classes: int | None
    ctx: PassContext
    extra_models: dict[str, Artifact] = field(default_factory=dict)
    threads: int = 1


def _resolve_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def with_lowering(passes: list[PassConfig], need_onnx: bool) -> tuple[list[PassConfig], bool]:
    """Insert the lowering pass (PyTorch -> ONNX) where the chain switches to ONNX, or at the end when a
    target needs ONNX; returns the chain and whether a pass was inserted."""
    lowering = lowering_pass()
    if any(get_pass(p.kind).caps.lowers_to_onnx for p in passes):
        return passes, False
    for i, p in enumerate(passes):
        if get_pass(p.kind).consumes == ONNX:
            return [*passes[:i], lowering.config_cls(), *passes[i:]], True
    return ([*passes, lowering.config_cls()], True) if need_onnx else (passes, False)


def _for_chain(instruments: Sequence[Instrument], name: str) -> list[Instrument]:
    """Instruments that keep per-chain state (``for_chain``) get their own copy for chain ``name``."""
    return [getattr(i, "for_chain")(name) if hasattr(i, "for_chain") else i for i in instruments]  # noqa: B009


def make_plan(
    recipe: Recipe | str | Path,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    variants: dict[str, list[PassConfig]] | None = None,
    write: bool = True,
    extra_models: dict[str, Artifact] | None = None,
    instruments: Sequence[Instrument] = (),
) -> Plan:
    """Validate a run and load what it starts from; raises a one-line error before any pass runs."""
    import torch

    rec = _resolve_recipe(recipe)
    say = log or (lambda m: None)
    out = Path(out_dir) if out_dir else Path("runs") / rec.name
    cache = Cache(Path(cache_dir) if cache_dir else None, log=say)
    threads = rec.measure.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(rec.seed)

    if write:
        preflight.check_out_dir(out)
    target_cfgs: list[TargetConfig] = list(rec.targets) or default_targets()
    targets = [make_target(c) for c in target_cfgs]
    for t in targets:
        check = getattr(t, "check_config", None)
        if check is not None:
            check()  # settings the target's library would reject only at build time
    need_onnx = any(t.caps.consumes == ONNX for t in targets)
    if rec.measure.metric:
        from .fidelity import load_metric

        load_metric(rec.measure.metric)  # a typo in the metric fails now, not after the passes ran
    chains_in = variants if variants is not None else ({rec.name: list(rec.passes)} if rec.passes else {})
    for reserved in (BASELINE, REFERENCE):
        if reserved in chains_in or reserved in (extra_models or {}):
            raise RecipeError(f"{reserved!r} is a reserved variant name; name the variant otherwise")
    root = load_model(rec.model, cache)
    if rec.measure.seq_lens and not any(s.dynamic_axes for s in root.inputs):
        shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in root.inputs)
        raise RecipeError(f"measure.seq_lens = {rec.measure.seq_lens}: the model has no dynamic sequence axis "
                          f"(inputs: {shapes}); sequence lengths apply to token models (e.g. hf:DIR text models)")
    chains: dict[str, PassManager] = {}
    auto_export = False
    lowering_cfg: PassConfig | None = None
    for name, chain in chains_in.items():
        passes, auto = with_lowering(list(chain), need_onnx)
        auto_export |= auto
        lowering_cfg = lowering_cfg or next((p for p in passes if get_pass(p.kind).caps.lowers_to_onnx), None)
        chains[name] = PassManager(passes, [VerifyInstrument(), *_for_chain(instruments, name)])
        chains[name].validate(root.kind)
    if lowering_cfg is None and need_onnx:
        lowering_cfg, auto_export = lowering_pass().config_cls(), True
    base = PassManager([lowering_cfg] if (lowering_cfg and root.kind == PYTORCH) else [],
                       _for_chain(instruments, BASELINE))
    base.validate(root.kind)

    data = load_data(rec.data, root.inputs[0].shape, root.inputs, model_source=rec.model.source)
    if data is not None and data.note:
        say(f"data: {data.note}")
    n_classes = preflight.model_classes(root, data)
    preflight.check_labels(data, n_classes)
    for pm in chains.values():
        preflight.check_data_needed(pm.steps, data, synthetic_ok=any(
            not np.issubdtype(np.dtype(s.dtype), np.floating) for s in root.inputs), inputs=root.inputs)
    if rec.model.train_epochs:
        if root.kind != PYTORCH:
            raise RecipeError("model.train_epochs needs a PyTorch model, not an ONNX file")
        if data is None or not data.labelled:
            raise RecipeError("model.train_epochs needs labelled data (e.g. data = { source = \"builtin:digits\" })")
    ctx = PassContext(cache=cache, data=data, seed=rec.seed, progress=progress, log=say)
    return Plan(rec, out, write, cache, say, progress, target_cfgs, targets, chains, base, auto_export, root, data,
                n_classes, ctx, dict(extra_models or {}), threads)
