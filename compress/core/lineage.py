"""A run's lineage as data (Olive's footprints): every artifact the run used, with its parent, the step that
made it, that step's settings and code identity, and every evaluation of a compiled model (read from the
evaluation cache or made in this run, ``compress.quality.eval_cache``), keyed by the artifact's digest and the
evaluation settings.

Written into report.json (``lineage``, optional in ``compress.report/v1``) and beside it as
``lineage.json``. Search, reports and the gate read the same records: a record names the artifact by
digest, so two runs that made or evaluated the same model show the same node and the same evaluation key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from ..measuring.measurement import Cell
    from ..stages.execute import Variant
    from ..stages.plan import Plan

LINEAGE_FILE = "lineage.json"


class _Rec(BaseModel):
    # As the report's records (compress.reporting.report_schema._Record): unknown keys refused, "pass" by its alias.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)


class ArtifactNode(_Rec):
    """One artifact: the model as it came, a pass's output, or a target's build."""

    digest: str
    kind: str = Field(description="pytorch | onnx | compiled")
    parent: str | None = Field(description="the digest of the artifact it was made from; null: the model as it came")
    step: str = Field(description="what made it: 'source', a pass kind, 'train', or 'compile TARGET'")
    settings: dict[str, Any] = Field(description="that step's settings (a pass's or target's canonical config)")
    code: str | None = Field(None, description="the code identity of the pass or target that made it")
    cache_key: str | None = Field(None, description="its key in the artifact cache (null: not cached by key)")
    variants: list[str] = Field(description="the run's variants whose chain holds it")


class Evaluation(_Rec):
    """One evaluation of a compiled model, keyed by its digest and the evaluation settings."""

    variant: str
    target: str
    what: str = Field(description="accuracy+fidelity (on the evaluation data, against the reference), or parity (a "
                      "build against its input model)")
    artifact: str | None = Field(description="the digest of the compiled model evaluated")
    key: str = Field(description="the evaluation cache key: artifact digest, settings, reference")
    settings: str = Field(description="SHA-256 of the evaluation settings (data digest, batch, target, code, "
                          "library versions)")
    cached: bool = Field(description="true: read from the evaluation cache (a cached evaluation), not run again")
    results: dict[str, Any] = Field(description="the figures the evaluation gave (accuracy_top1 and fidelity, or the "
                                    "parity record)")


class Lineage(_Rec):
    """The graph of the run's artifacts and the evaluations of its compiled models."""

    artifacts: list[ArtifactNode]
    evaluations: list[Evaluation]


def _add(nodes: dict[str, ArtifactNode], variant: str, **node: Any) -> None:
    have = nodes.get(node["digest"])
    if have is None:
        nodes[node["digest"]] = ArtifactNode(variants=[variant], **node)
    elif variant not in have.variants:
        have.variants.append(variant)


def build_lineage(plan: Plan, variants: list[Variant], cells: list[Cell]) -> Lineage:
    """The lineage of one run from its plan, the chains it executed, and its measured cells."""
    from ..stages.plan import BASELINE
    from .registry import code_identity, get_pass

    nodes: dict[str, ArtifactNode] = {}
    root = plan.root
    for v in variants:
        chain = plan.base if v.name == BASELINE else plan.chains.get(v.name)
        if chain is None:  # a ready model measured as it is (compress compare a.onnx b.onnx)
            if v.onnx_art is not None:
                _add(nodes, v.name, digest=v.onnx_art.digest, kind=v.onnx_art.kind, parent=None, step="source",
                     settings={})
            continue
        source = {"source": plan.recipe.model.source}
        if root.parent is not None and root.producer and root.producer.startswith("train"):  # trained by the run
            _add(nodes, v.name, digest=root.parent, kind=root.kind, parent=None, step="source", settings=source)
            _add(nodes, v.name, digest=root.digest, kind=root.kind, parent=root.parent, step="train",
                 settings={"epochs": plan.recipe.model.train_epochs, "seed": plan.recipe.seed})
        else:
            _add(nodes, v.name, digest=root.digest, kind=root.kind, parent=root.parent, step="source", settings=source)
        configs = chain.steps
        for r in v.steps:
            if r.artifact is None:
                continue
            cfg = configs[r.index] if r.index < len(configs) else None
            _add(nodes, v.name, digest=r.digest, kind=r.artifact.kind, parent=r.artifact.parent, step=r.kind,
                 settings=cfg.canonical() if cfg is not None else {"text": r.text}, code=get_pass(r.kind).identity,
                 cache_key=r.key)
    codes = {t.name: code_identity(type(t).__module__) for t in plan.targets}
    for c in cells:
        if c.compiled is not None and not c.reference:
            _add(nodes, c.variant, digest=c.compiled.digest, kind=c.compiled.kind, parent=c.compiled.parent,
                 step=f"compile {c.target}", settings=c.config, code=codes.get(c.target))
    evals = [Evaluation.model_validate(e) for e in plan.cache.evaluations]
    return Lineage(artifacts=list(nodes.values()), evaluations=evals)


def lineage_files(lineage: Lineage | None) -> list[tuple[str, Callable[[Path], Any]]]:
    """``lineage.json`` for the run folder's report set (``reporting.report_files``), written as report.json writes
    its ``lineage`` (keys given only), so the two hold the same record; nothing when the run recorded none."""
    if lineage is None:
        return []
    text = json.dumps(lineage.model_dump(mode="json", by_alias=True, exclude_unset=True), indent=1, default=str)
    return [(LINEAGE_FILE, lambda p: p.write_text(text + "\n"))]


def cell_records(lineage: Lineage | None, variant: str, target: str, digest: str | None) -> dict[str, Any] | None:
    """The lineage records of one measured cell, as ``compress check --update-baseline`` keeps them with a recorded
    baseline: the artifacts from its build back to the model as it came (each with its step, settings and code),
    and its evaluations (accuracy and fidelity, parity) by key. None when the run recorded no lineage."""
    if lineage is None:
        return None
    nodes = {n.digest: n for n in lineage.artifacts}
    path: list[dict[str, Any]] = []
    while digest is not None and digest in nodes and len(path) < len(nodes):
        node = nodes[digest]
        path.append(node.model_dump(mode="json", by_alias=True, exclude={"variants"}))
        digest = node.parent
    evals = [e.model_dump(mode="json", by_alias=True) for e in lineage.evaluations
             if e.variant == variant and e.target == target]
    return {"artifacts": path, "evaluations": evals}
