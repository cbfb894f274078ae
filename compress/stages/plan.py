"""Stage 1 of a run: the plan. Everything that can be checked is checked here, before any pass runs:
the output folder, the targets and their settings, the metric, every chain (each pass accepts what
the one before produced), the model, the data, its labels and what the passes need of it.

The plan holds no measurement: ``compress.stages.execute`` runs its chains, ``compress.measuring.measurement`` times
and scores what they made, ``compress.stages.pipeline`` writes the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.artifact import ONNX, PYTORCH, Artifact
from ..core.cache import Cache
from ..core.config import PassConfig, TargetConfig
from ..core.manager import Instrument, PassContext, PassManager, VerifyInstrument
from ..core.protocols import Target
from ..core.registry import default_targets, get_pass, lowering_pass, make_target
from ..errors import RecipeError
from ..inputs.data import DataBundle, load_data
from ..inputs.models import load_model
from . import preflight
from .recipe import Recipe, load_recipe

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
    targets: list[Target]
    unavailable: dict[str, str]  # target name -> why it cannot run here (asked once, here; stage 3 reads it)
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


def _lm_text(rec: Recipe, root: Artifact, say: Callable[[str], None]) -> Any:
    """A causal LM's text (held-out and calibration windows), or None for any other model."""
    from ..inputs.causal_lm import BUILTIN_TEXT, CAUSAL_LM, lm_text
    from ..inputs.models import hf_dir

    if root.metadata.get("task") != CAUSAL_LM:
        return None
    folder = hf_dir(root)
    if folder is None:
        raise RecipeError("a causal LM needs its Hugging Face folder (hf:DIR or a .gguf file) for its tokenizer")
    src = rec.data.source if rec.data.source not in ("random", "builtin:digits") else BUILTIN_TEXT
    m = rec.measure
    text = lm_text(folder, src, m.lm_window, m.lm_eval_tokens, m.lm_calib_tokens)
    have = int(text.eval.size + text.calib.size)
    if have < m.lm_prompt * m.lm_batch:  # the timed prompts are cut from the text: refused before any export
        raise RecipeError(f"measure.lm_prompt = {m.lm_prompt} x measure.lm_batch = {m.lm_batch} needs "
                          f"{m.lm_prompt * m.lm_batch} tokens of text; {text.source} gives {have}: lower them or "
                          "give more text")
    say(f"data: {text.note}")
    return text


def with_lowering(passes: list[PassConfig], need_onnx: bool,
                  start_kind: str = PYTORCH) -> tuple[list[PassConfig], bool]:
    """Insert the lowering pass (PyTorch -> ONNX) only where a PyTorch artifact meets an ONNX consumer: before
    the first pass that consumes ONNX, or at the end when a target needs ONNX. A chain that starts from an
    ONNX model (``start_kind``) gets none. Returns the chain and whether a pass was inserted; a chain that
    cannot be satisfied is left for ``PassManager.validate`` to refuse with its reason."""
    lowering = lowering_pass()
    if any(get_pass(p.kind).caps.lowers_to_onnx for p in passes):
        return passes, False
    kind = start_kind
    for i, p in enumerate(passes):
        info = get_pass(p.kind)
        if info.consumes == ONNX and kind == PYTORCH:
            return [*passes[:i], lowering.config_cls(), *passes[i:]], True
        if info.consumes != kind:
            return passes, False  # PassManager.validate says why
        kind = info.produces
    return ([*passes, lowering.config_cls()], True) if (need_onnx and kind == PYTORCH) else (passes, False)


def _for_chain(instruments: Sequence[Instrument], name: str) -> list[Instrument]:
    """Instruments that keep per-chain state (``for_chain``) get their own copy for chain ``name``."""
    return [i.for_chain(name) for i in instruments]


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
        from ..reporting.report_files import check_free_space

        preflight.check_out_dir(out)
        check_free_space(out)  # the report set's size is roughly known: refuse now, not after measuring
    target_cfgs: list[TargetConfig] = list(rec.targets) or default_targets()
    targets, unavailable = _targets(target_cfgs)
    if rec.measure.metric:
        from ..quality.fidelity import load_metric

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
    need_onnx = any(t.caps.consumes == ONNX for t in targets)
    chains, base, auto_export = _chains(chains_in, root, need_onnx, instruments, rec.model.source)
    text = _lm_text(rec, root, say)
    data = None if text is not None else load_data(rec.data, root.inputs[0].shape, root.inputs,
                                                   model_source=rec.model.source)
    if data is not None and data.note:
        say(f"data: {data.note}")
    n_classes = preflight.model_classes(root, data) if text is None else None
    preflight.check_labels(data, n_classes)
    _check_work(rec, target_cfgs, chains, root, data, text)
    ctx = PassContext(cache=cache, data=data, seed=rec.seed, progress=progress, log=say, text=text)
    return Plan(rec, out, write, cache, say, progress, target_cfgs, targets, unavailable, chains, base, auto_export,
                root, data, n_classes, ctx, dict(extra_models or {}), threads)


def _targets(cfgs: list[TargetConfig]) -> tuple[list[Target], dict[str, str]]:
    """The recipe's targets, their settings checked, and why each that cannot run here cannot; a run none of
    whose targets can run here is refused now, before any pass runs."""
    targets = [make_target(c) for c in cfgs]
    for t in targets:
        t.check_config()  # settings the target's library would reject only at build time
    unavailable = {t.name: reason for t in targets if (reason := t.unavailable_reason()) is not None}
    if targets and len(unavailable) == len(targets):
        why = "; ".join(f"{name}: {reason}" for name, reason in unavailable.items())
        raise RecipeError(f"no target of the recipe can run on this machine ({why}); pick a target that can "
                          "(compress targets lists them)")
    return targets, unavailable


def _chains(chains_in: dict[str, list[PassConfig]], root: Artifact, need_onnx: bool,
            instruments: Sequence[Instrument], source: str) -> tuple[dict[str, PassManager], PassManager, bool]:
    """Each variant's pass chain (the lowering inserted where a PyTorch model meets an ONNX consumer) and the
    baseline's, validated on the root model's kind; and whether a lowering was inserted."""
    chains: dict[str, PassManager] = {}
    auto_export = False
    lowering_cfg: PassConfig | None = None
    for name, chain in chains_in.items():
        passes, auto = with_lowering(list(chain), need_onnx, root.kind)
        auto_export |= auto
        lowering_cfg = lowering_cfg or next((p for p in passes if get_pass(p.kind).caps.lowers_to_onnx), None)
        chains[name] = PassManager(passes, [VerifyInstrument(), *_for_chain(instruments, name)])
        chains[name].validate(root.kind)
    if root.kind == ONNX and any(pm.steps for pm in chains.values()):
        # A runtime's saved build (ONNX Runtime's NCHWc layout operators) is not a model passes can rewrite.
        layout = [op for op in root.known_facts().required_ops if op.split(":")[0].endswith(".nchwc")]
        if layout:
            raise RecipeError(f"model {source}: saved after a runtime's layout optimizations "
                              f"({', '.join(layout[:3])}), which passes cannot rewrite; give the portable "
                              "model instead (artifacts/VARIANT/onnx/model.onnx in a run folder, or the ONNX "
                              "export you started from)")
    if lowering_cfg is None and need_onnx and root.kind == PYTORCH:
        lowering_cfg, auto_export = lowering_pass().config_cls(), True
    base = PassManager([lowering_cfg] if (lowering_cfg and root.kind == PYTORCH) else [],
                       _for_chain(instruments, BASELINE))
    base.validate(root.kind)
    return chains, base, auto_export


def _check_work(rec: Recipe, target_cfgs: list[TargetConfig], chains: dict[str, PassManager], root: Artifact,
                data: DataBundle | None, text: Any) -> None:
    """What the passes and targets need of the model and the data, refused before any work."""
    for tc in target_cfgs:  # a speculative-decoding draft names a variant of this run
        spec = tc.speculative_draft()
        draft = spec.variant if spec else None
        if draft is not None and draft not in chains:
            raise RecipeError(f"target {tc.kind}: draft = {draft!r} names no variant of this run (variants: "
                              f"{', '.join(chains) or 'none'}); name the variant whose build drafts")
    for pm in chains.values():  # settings a pass can judge on the root model alone: refused before any work
        for step in pm.steps:
            step.preflight(root, text)
    for pm in chains.values() if text is None else ():
        preflight.check_data_needed(pm.steps, data, synthetic_ok=any(
            not np.issubdtype(np.dtype(s.dtype), np.floating) for s in root.inputs), inputs=root.inputs)
    if rec.model.train_epochs:
        if root.kind != PYTORCH:
            raise RecipeError("model.train_epochs needs a PyTorch model, not an ONNX file")
        if data is None or not data.labelled:
            raise RecipeError("model.train_epochs needs labelled data (e.g. data = { source = \"builtin:digits\" })")
