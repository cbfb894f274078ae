"""The search space of ``compress search``: a recipe whose pass and target settings may be open (ranges,
choices, optional passes), every value a trial could take validated up front with the pass's own typed
config; the search's own settings (``SearchSpec``) and the metrics a trial yields."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InputError, RecipeError
from ..stages.recipe import Recipe, _resolve_paths, read_toml, recipe_from_dict

# Metrics a trial yields; all are minimized (accuracy as a drop, fidelity as a loss).
METRICS: dict[str, str] = {
    "latency_ratio": "p50 latency of the trial / the original model on the search target (paired rounds)",
    "p50_ms": "p50 latency in ms on the search target at the search batch size",
    "accuracy_drop": "top-1 of the original minus the trial's, in points (needs labelled data)",
    "fidelity_loss": "1 - agreement of the trial's predictions with the original model's",
    "size_mb": "size of the compiled model in MB",
    "macs_ratio": "multiply-accumulates of the trial's model / the original's (channel pruning; 1.0 without it)",
    "params_ratio": "parameters of the trial's model / the original's (channel pruning; 1.0 without it)",
    # A causal language model's figures (the report's generation record, compress.measuring.measure_lm), against
    # the original model on the reference target (PyTorch eager), paired rounds.
    "decode_time_ratio": "causal LM: time per decoded token of the trial / the original's (1 / decode_speedup)",
    "ttft_ratio": "causal LM: time to first token of the trial / the original's",
    "perplexity_rise": "causal LM: perplexity on held-out text / the original's - 1",
    "kl": "causal LM: mean per-token KL(original || trial) on held-out text, nats",
}
# What a causal-LM run measures, and what any other run measures: an objective or constraint on a figure the
# space's runs do not produce is refused before any trial (every trial would fail on it).
LM_METRICS = ("decode_time_ratio", "ttft_ratio", "perplexity_rise", "kl", "size_mb", "macs_ratio")
OTHER_METRICS = tuple(m for m in METRICS if m not in LM_METRICS or m in ("size_mb", "macs_ratio"))
LM_DEFAULT_OBJECTIVES = ["decode_time_ratio", "perplexity_rise"]
# Timed metrics and the key of their 95% interval in a trial's metrics.
TIMED = {"latency_ratio": "latency_ratio_ci", "p50_ms": "p50_ci", "decode_time_ratio": "decode_time_ratio_ci",
         "ttft_ratio": "ttft_ratio_ci"}
# Metrics the untrained probe of a trial measures (its structure without its training, see
# probe_recipe): training changes weights, not shapes, so these are known before it runs.
PROBE_METRICS = ("latency_ratio", "p50_ms", "size_mb", "macs_ratio", "params_ratio", "decode_time_ratio",
                 "ttft_ratio")

_CONSTRAINT = re.compile(r"^\s*(<=|<)\s*([-+0-9.eE]+)\s*$")


class SearchSpec(BaseModel):
    """The ``[search]`` table of a space."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trials: int = Field(20, ge=1, le=100_000)
    timeout_s: float | None = Field(None, gt=0, description="stop starting trials after this long")
    objectives: list[str] = Field(default_factory=lambda: ["latency_ratio", "accuracy_drop"], min_length=1)
    constraints: dict[str, str] = Field(default_factory=dict, description='e.g. { accuracy_drop = "<= 1.0" }')
    target: str | None = Field(None, description="target whose latency counts; default the first target")
    batch: int = Field(1, ge=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    early_pruning: bool = Field(True, description="probe each trial's structure untrained first and prune it "
                                "when it cannot meet a constraint or is dominated (see probe_recipe)")
    probe_margin: float = Field(0.05, ge=0, le=1, description="a timed probe is trusted to this fraction: it "
                                "prunes only when its interval is this far beyond the limit")
    draft: bool = Field(False, description="causal LM: each trial's model drafts for the original by speculative "
                        "decoding on the targets that offer it (their draft setting); the objectives are then the "
                        "original's generation speed with that draft, its output unchanged")
    retime_front: bool = Field(True, description="time the feasible front's models again together in one run at "
                               "the end (interleaved), and pick the best on those figures")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in METRICS]
        if bad:
            raise ValueError(f"unknown objective(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        return v

    @field_validator("constraints")
    @classmethod
    def _known_constraints(cls, v: dict[str, str]) -> dict[str, str]:
        for k, expr in v.items():
            if k not in METRICS:
                raise ValueError(f"constraint on unknown metric {k!r}; choose from {', '.join(METRICS)}")
            if not isinstance(expr, str) or not _CONSTRAINT.match(expr):
                raise ValueError(f"constraint {k} = {expr!r}: write it as \"<= NUMBER\"")
        return v

    def limits(self) -> dict[str, float]:
        out = {}
        for k, expr in self.constraints.items():
            m = _CONSTRAINT.match(expr)
            assert m is not None  # checked by the validator
            out[k] = float(m.group(2))
        return out


@dataclass(frozen=True)
class Param:
    """One open value: ``pass_index`` -1 for the target table; ``key`` None for a pass's on/off switch."""

    name: str
    section: str  # "passes" | "targets"
    index: int
    key: str | None
    kind: Literal["float", "int", "choice", "optional"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass
class Space:
    base: dict[str, Any]  # the recipe dict with every open value removed
    params: list[Param]
    search: SearchSpec
    source: str
    folder: Path = Path(".")  # file paths in the space are relative to it, as in a recipe

    def first_point(self) -> dict[str, Any]:
        """Every open value at its first value (passes on): a point to validate the space's fixed part with."""
        return {p.name: True if p.kind == "optional" else (p.choices[0] if p.kind == "choice" else p.low)
                for p in self.params}

    def recipe(self, values: dict[str, Any], name: str | None = None) -> Recipe:
        """The plain recipe of one point of the space (named ``name``: a trial, the best). With ``[search] draft``
        the point's model drafts for the original: every target that offers speculative decoding gets
        ``draft = name`` (a point without passes is the original, generating plainly)."""
        from ..core.registry import get_target_config

        d = json.loads(json.dumps(self.base))
        for p in self.params:
            if p.key is not None and p.name in values:
                d[p.section][p.index][p.key] = values[p.name]
        # An optional pass runs unless the point switches it off (its "enabled" parameter).
        keep = [i for i in range(len(d.get("passes", []))) if values.get(f"passes[{i + 1}].enabled", True)]
        d["passes"] = [d["passes"][i] for i in keep]
        if name is not None:
            d["name"] = name
            for t in d.get("targets", []) if self.search.draft and d["passes"] else ():
                if "draft" in get_target_config(t["kind"]).model_fields:
                    t["draft"] = name
        return _resolve_paths(recipe_from_dict(d, where=self.source), self.folder)


def _numeric(cls: type[BaseModel], key: str) -> bool:
    f = cls.model_fields.get(key)
    ann = str(f.annotation) if f is not None else ""
    return any(t in ann for t in ("int", "float")) and "tuple" not in ann and "list" not in ann


def _open_value(where: str, cls: type[BaseModel], key: str, v: Any) -> dict[str, Any] | None:
    """The range/choice a value declares, or None for a fixed value."""
    if isinstance(v, dict) and "choices" in v:
        if set(v) != {"choices"} or not isinstance(v["choices"], list) or not v["choices"]:
            raise RecipeError(f"{where}: {key} = {{ choices = [...] }} needs a non-empty list and nothing else")
        return {"kind": "choice", "choices": tuple(v["choices"])}
    if isinstance(v, dict) and {"low", "high"} <= set(v):
        extra = set(v) - {"low", "high", "log"}
        if extra:
            raise RecipeError(f"{where}: {key}: unknown range key(s) {', '.join(sorted(extra))}; use low, high, log")
        lo, hi = v["low"], v["high"]
        return _range(where, key, lo, hi, bool(v.get("log", False)))
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in v) and _numeric(cls, key):
        return _range(where, key, v[0], v[1], False)
    return None


def _range(where: str, key: str, lo: Any, hi: Any, log: bool) -> dict[str, Any]:
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)):
        raise RecipeError(f"{where}: {key}: a range needs two numbers, got {lo!r} and {hi!r}")
    if not lo < hi:
        raise RecipeError(f"{where}: {key} = [{lo}, {hi}] is an empty range; the first value must be below the "
                          "second (write a single value to fix it)")
    if log and lo <= 0:
        raise RecipeError(f"{where}: {key}: a log range needs a positive low end, got {lo}")
    kind = "int" if isinstance(lo, int) and isinstance(hi, int) and not log else "float"
    return {"kind": kind, "low": lo, "high": hi, "log": log}


def load_space(path: str | Path) -> Space:
    """Read and validate a search space; every value it can produce is checked before any trial."""
    from ..core.registry import get_pass, get_target_config

    p, d = read_toml(path, "search space")
    raw_search = d.pop("search", {})
    if isinstance(raw_search, dict) and "objectives" not in raw_search and _is_causal_lm(d.get("model")):
        # A draft leaves the original's text as it is: its search weighs speed against the draft's size.
        raw_search = {**raw_search, "objectives": ["decode_time_ratio", "size_mb"] if raw_search.get("draft") is True
                      else LM_DEFAULT_OBJECTIVES}
    try:
        search = SearchSpec.model_validate(raw_search)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'search'}: {x['msg']}" for x in e.errors())
        raise RecipeError(f"{p}: [search]: {msgs}") from None
    params: list[Param] = []
    for section in ("passes", "targets"):
        tables = d.get(section, [])
        if not isinstance(tables, list):
            raise RecipeError(f"{p}: '{section}' must be an array of tables ([[{section}]])")
        for i, t in enumerate(tables):
            where = f"{p}: {section}[{i + 1}]"
            if not isinstance(t, dict) or not isinstance(t.get("kind"), str):
                raise RecipeError(f"{where}: expected a table with a 'kind' key")
            try:
                cls: type[BaseModel] = get_target_config(t["kind"]) if section == "targets" \
                    else get_pass(t["kind"]).config_cls
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
            if t.pop("optional", False) is True:
                if section == "targets":
                    raise RecipeError(f"{where}: 'optional' applies to passes; list the targets to measure")
                params.append(Param(f"{section}[{i + 1}].enabled", section, i, None, "optional"))
            for key, v in list(t.items()):
                spec = _open_value(f"{where} ({t['kind']})", cls, key, v)
                if spec is None:
                    continue
                del t[key]
                params.append(Param(f"{section}[{i + 1}].{key}", section, i, key, spec["kind"],
                                    spec.get("low", 0.0), spec.get("high", 0.0), spec.get("log", False),
                                    spec.get("choices", ())))
            _check_values(where, cls, t, [q for q in params if q.section == section and q.index == i])
    space = Space(d, params, search, str(p), p.parent)
    rec = space.recipe(space.first_point())  # the fixed part of the recipe, validated as a recipe
    _check_search_against_recipe(p, search, rec)
    if not params:
        raise RecipeError(f"{p}: nothing to search: give a range ([low, high]), choices ({{ choices = [...] }}) or "
                          "optional = true on a pass")
    return space


def _check_values(where: str, cls: type[BaseModel], fixed: dict[str, Any], params: list[Param]) -> None:
    """Validate the table with every open value at its first value, then each other value in turn."""
    rep = {q.key: (q.choices[0] if q.kind == "choice" else q.low) for q in params if q.key is not None}

    def probe(table: dict[str, Any], label: str) -> None:
        try:
            cls.model_validate(table)
        except ValidationError as e:
            err = e.errors()[0]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(k for k in cls.model_fields if k != "kind")
                raise RecipeError(f"{where} ({fixed['kind']}): unknown key '{err['loc'][0]}'; allowed keys: "
                                  f"{allowed}") from None
            loc = ".".join(map(str, err["loc"]))
            raise RecipeError(f"{where} ({fixed['kind']}): {label}{loc + ': ' if loc else ''}{err['msg']}") from None

    probe({**fixed, **rep}, "with each open value at its first value, " if rep else "")
    for q in params:
        if q.key is None:
            continue
        for v in (q.choices if q.kind == "choice" else (q.low, q.high)):
            probe({**fixed, **rep, q.key: v}, f"{q.key} = {v!r} (a value of the search space): ")


def _is_causal_lm(model: Any) -> bool:
    """Whether a recipe's model table (or ModelSpec) is a causal language model: task = "causal-lm", or a GGUF file
    (always one)."""
    from ..inputs.causal_lm import CAUSAL_LM

    get = model.get if isinstance(model, dict) else (lambda k: getattr(model, k, None))
    src = str(get("source") or "")
    return get("task") == CAUSAL_LM or src.startswith("gguf:") or src.endswith(".gguf")


def search_target(sp: Space) -> str:
    """The target whose figures count: ``[search] target``; else the first target, or for a causal LM the first
    that is not the reference (its generation figures are ratios to the original on the reference target, and a
    trial's ONNX build does not run on it)."""
    from ..core.registry import make_target

    if sp.search.target is not None:
        return sp.search.target
    targets = sp.recipe(sp.first_point()).targets
    if _is_causal_lm(sp.base.get("model")):
        return next((t.kind for t in targets if not make_target(t).caps.reference), targets[0].kind)
    return targets[0].kind


def _check_draft_search(p: Path, search: SearchSpec, rec: Recipe, lm: bool) -> None:
    """``[search] draft = true`` needs a causal LM and a target that drafts, whose draft the space leaves open."""
    from ..core.registry import get_target_config

    if not lm:
        raise RecipeError(f"{p}: [search] draft = true: speculative decoding drafts for a causal language model; "
                          "this model is not one (set model.task = \"causal-lm\") or drop draft")
    drafting = [t for t in rec.targets if "draft" in get_target_config(t.kind).model_fields]
    if not drafting:
        raise RecipeError(f"{p}: [search] draft = true: none of the targets ({', '.join(t.kind for t in rec.targets)}) "
                          "generates speculatively; add one that offers a draft setting (onnxruntime)")
    fixed = [t.kind for t in drafting if t.speculative_draft() is not None]
    if fixed:
        raise RecipeError(f"{p}: [search] draft = true makes each trial the draft, and target {fixed[0]} already "
                          "names one; drop its draft setting (draft_k may stay, or be searched)")
    bad = [m for m in [*search.objectives, *search.constraints] if m in ("perplexity_rise", "kl")]
    if bad:
        raise RecipeError(f"{p}: [search] {', '.join(bad)} with draft = true: speculative decoding keeps the "
                          "original's output, so its text quality does not change; use decode_time_ratio, "
                          "ttft_ratio, size_mb or macs_ratio")


def _check_search_against_recipe(p: Path, search: SearchSpec, rec: Recipe) -> None:
    kinds = [t.kind for t in rec.targets]
    if not kinds:
        raise RecipeError(f"{p}: list the target to measure on ([[targets]] kind = \"onnxruntime\")")
    lm = _is_causal_lm(rec.model)
    allowed = LM_METRICS if lm else OTHER_METRICS
    if search.draft:
        _check_draft_search(p, search, rec, lm)
        allowed = tuple(m for m in allowed if m not in ("perplexity_rise", "kl"))
    bad = [m for m in dict.fromkeys([*search.objectives, *search.constraints]) if m not in allowed]
    if bad:
        what = ("a causal language model's run (model.task = \"causal-lm\")" if lm
                else "this model's run (it is not a causal language model)")
        raise RecipeError(f"{p}: [search] {', '.join(bad)}: not measured by {what}; choose from {', '.join(allowed)}")
    if search.target is not None and search.target not in kinds:
        raise RecipeError(f"{p}: [search] target = {search.target!r} is not among the space's targets "
                          f"({', '.join(kinds)})")
    needs_labels = {"accuracy_drop"} & (set(search.objectives) | set(search.constraints))
    if needs_labels and rec.data.source == "random":
        raise RecipeError(f"{p}: accuracy_drop needs labelled data, and the space has none (data.source = "
                          "\"random\"); set data, or use fidelity_loss instead")
    if search.batch not in rec.measure.batch_sizes:
        raise RecipeError(f"{p}: [search] batch = {search.batch} is not among measure.batch_sizes "
                          f"{rec.measure.batch_sizes}")


def corner_points(sp: Space, cap: int = 64) -> list[dict[str, Any]]:
    """Points of the space that reach every extreme: each combination of every open value's ends (a range's low and
    high, each choice, an optional pass on and off) while there are at most ``cap``, else each open value at each of
    its ends with the others at their first value. The checks a pass makes on the model are monotone in a range (a
    block count, a width), so the ends stand for the values between them."""
    import itertools

    ends = {p.name: ((True, False) if p.kind == "optional" else p.choices if p.kind == "choice"
                     else (p.low, p.high)) for p in sp.params}
    if math.prod(len(v) for v in ends.values()) <= cap:
        return [dict(zip(ends, combo, strict=True)) for combo in itertools.product(*ends.values())]
    first = sp.first_point()
    return [{**first, name: v} for name, vals in ends.items() for v in vals]


def check_points(sp: Space, cache_dir: str | Path | None, say: Any = None) -> None:
    """Refuse, before any trial, a point of the space that its model cannot take: each pass's own check on the model
    as it enters the pipeline (``PassConfig.preflight``: blocks to remove against the model's blocks, a width against
    its width, an INT4 group against its layers) and each target's (a speculative draft naming a variant), at every
    corner point (:func:`corner_points`). The model and its data are loaded once, as a run's plan loads them."""
    from ..core.artifact import ONNX
    from ..stages.plan import _chains, _check_work, make_plan

    plan = make_plan(sp.recipe(sp.first_point()), cache_dir=cache_dir, progress=False, write=False,
                     log=say or (lambda m: None))
    need_onnx = any(t.caps.consumes == ONNX for t in plan.targets)
    for values in corner_points(sp):
        rec = sp.recipe(values, name="trial")
        try:
            chains, _, _ = _chains({rec.name: list(rec.passes)}, plan.root, need_onnx, (), rec.model.source)
            _check_work(rec, list(rec.targets), chains, plan.root, plan.data, plan.ctx.text)
        except (RecipeError, InputError) as e:  # the user's settings; a pass's own failure is the trial's
            point = ", ".join(f"{k} = {v!r}" for k, v in values.items())
            raise RecipeError(f"{sp.source}: the space's point {point} cannot run: {str(e).splitlines()[0]}") from None
