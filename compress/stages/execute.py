"""Stage 2 of a run: execute the plan's chains through the cache. The baseline (the model as it came,
lowered when a target needs ONNX) and every variant become ``Variant`` records: the PyTorch model
and the ONNX model each target will compile, and the step records of the chain that made them."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from ..core.artifact import ONNX, PYTORCH, Artifact
from ..core.cache import Cache
from ..core.manager import PassContext, StepRecord
from ..inputs.data import DataBundle
from ..inputs.torch_io import load_torch, torch_artifact
from .plan import BASELINE, Plan


@dataclass
class Variant:
    """One model to measure: the baseline or a compressed pipeline's output."""

    name: str
    torch_art: Artifact | None
    onnx_art: Artifact | None
    steps: list[StepRecord] = field(default_factory=list)


def train_root(root: Artifact, data: DataBundle, epochs: int, seed: int, ctx: PassContext) -> Artifact:
    """Train the model once on the train split; cached so later runs reuse it."""
    from ..inputs.training import fit

    key = Cache.key(root.digest, "train", 1, {"epochs": epochs, "seed": seed, "data": data.digest})
    hit = ctx.cache.get(key)
    if hit is not None:
        ctx.log(f"train {epochs} epochs: cache hit")
        return hit
    ctx.log(f"train {epochs} epochs on {data.name} (once; cached afterwards)")
    model = copy.deepcopy(load_torch(root))
    curve = fit(model, data, epochs, lr=3e-3, seed=seed, progress=ctx.progress, desc="train", heartbeat=ctx.log)
    art = torch_artifact(model, root, ctx, metadata={"train": {"epochs": epochs, "val_top1_curve": curve}})
    art.parent, art.producer = root.digest, f"train{{epochs={epochs}}}"
    return ctx.cache.put(key, art)


def execute(plan: Plan) -> list[Variant]:
    """Train the root if the recipe asks, then run the baseline's and every variant's chain. The plan is read,
    never written: the chains run in a context of their own that knows the (trained) model they start from."""
    from ..core.config import format_pipeline

    rec, root = plan.recipe, plan.root
    if rec.model.train_epochs:
        assert plan.data is not None  # the plan refused training without labelled data
        root = train_root(root, plan.data, rec.model.train_epochs, rec.seed, plan.ctx)
    ctx = dataclasses.replace(plan.ctx, original=root, _dirs=[])
    for name, pm in plan.chains.items():
        plan.say(f"pipeline {name}: {format_pipeline(pm.steps, plan.target_cfgs)}")
    base_art, base_steps = plan.base.run(root, ctx)
    variants = [Variant(BASELINE, root if root.kind == PYTORCH else None,
                        base_art if base_art.kind == ONNX else None, base_steps)]
    for name, pm in plan.chains.items():
        out, steps = pm.run(root, ctx)
        torch_art = root if root.kind == PYTORCH else None
        for r in steps:  # the last PyTorch model of the chain (what a PyTorch target measures)
            if r.artifact is not None and r.artifact.kind == PYTORCH:
                torch_art = r.artifact
        variants.append(Variant(name, torch_art, out if out.kind == ONNX else None, steps))
    for name, art in plan.extra_models.items():
        variants.append(Variant(name, None, art))
    return variants
