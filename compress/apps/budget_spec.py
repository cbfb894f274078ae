"""The budgets file of ``compress check``: what it may say (``BudgetSpec``, ``BudgetsFile``), its limits
("2 ms", "0.5x torch", "1.05x recorded") and fidelity bounds parsed, and the file loaded and checked against
the recipes it names before anything runs. See ``compress.apps.budget`` for the whole gate."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import RecipeError
from ..reporting.report_schema import latency_key
from ..stages.recipe import read_toml

# Exit codes of `compress check`, documented in the CLI help and README.
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INCONCLUSIVE, EXIT_SKIPPED = 0, 1, 2, 3, 4

LATENCY = ("p50", "p90", "p99", "mean")
METRICS = (*LATENCY, "accuracy_drop", "size", "peak_memory")
_UNITS: dict[str, dict[str, float]] = {
    "latency": {"us": 1e-3, "ms": 1.0, "s": 1000.0},
    "bytes": {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3},
    "points": {"points": 1.0, "point": 1.0, "pt": 1.0, "%": 1.0},
}
_KIND = {**dict.fromkeys(LATENCY, "latency"), "size": "bytes", "peak_memory": "bytes", "accuracy_drop": "points"}
_SHOW = {"latency": "ms", "bytes": "B", "points": "points"}
GENERATION = "causal-lm"  # the "output kind" of the figures of a causal LM's generation record


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BudgetSpec(_Strict):
    model: str
    # Empty: the first target measured by default that is not the reference (TargetCaps), set on loading.
    target: str = ""
    # A budget is either metric + max, or fidelity (e.g. "cosine_worst >= 0.97"); checked on loading.
    metric: Literal["p50", "p90", "p99", "mean", "accuracy_drop", "size", "peak_memory"] | None = None
    max: str | None = None
    fidelity: str | None = None
    batch: int = Field(1, ge=1)
    # Token models: the sequence length (one of measure.seq_lens, added to it when missing); None: the model's own.
    seq: int | None = Field(None, ge=1)
    variant: str | None = None  # default: the recipe's compressed model, or the original when it has no passes
    name: str | None = None
    # A budget that cannot be judged here (no recorded baseline, reference or target unavailable) fails the
    # check (exit 4) unless skipping is allowed: for this budget, the whole file, or --allow-skip.
    allow_skip: bool = False

    def title(self) -> str:
        if self.fidelity is not None:
            return self.name or f"{self.model}/{self.variant or 'model'}/{self.target}/fidelity"
        seq = f"s{self.seq}" if self.seq is not None else ""
        return self.name or f"{self.model}/{self.variant or 'model'}/{self.target}/{self.metric}@b{self.batch}{seq}"

    def latency_key(self, seq_own: int | None = None) -> str:
        """The key of this budget's shape in a report's latency tables (the model's own length: plain batch)."""
        return latency_key(self.batch, None if self.seq is None or self.seq == seq_own else self.seq)


class BudgetsFile(_Strict):
    models: dict[str, str]
    budget: list[BudgetSpec]
    confidence: float = Field(0.95, gt=0.5, lt=1)
    resamples: int = Field(2000, ge=100, le=100000)
    rounds: int | None = Field(None, ge=5, description="interleaved timing rounds (overrides the recipes)")
    # The gate fails closed: a budget it cannot judge fails (exit 4) unless skipping is allowed (here, per
    # budget, or --allow-skip). ``fail_on_unavailable`` is the older name of the default, kept for old files.
    allow_skip: bool = False
    fail_on_unavailable: bool = False


@dataclass(frozen=True)
class Limit:
    value: float  # in the metric's base unit (ms, bytes, points) or a ratio
    ratio_to: str | None  # None (absolute), a target name, "original" or "recorded"
    text: str


def parse_limit(text: str, metric: str, where: str) -> Limit:
    s = text.strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[x×]\s*([A-Za-z0-9_.\-]+)", s)
    if m:
        if metric not in LATENCY and m.group(2) != "original":
            raise RecipeError(f"{where}: ratio limits ({s!r}) apply to latency metrics; use an absolute value "
                              f"for {metric}")
        return Limit(float(m.group(1)), m.group(2), s)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z%]*)", s)
    if not m:
        raise RecipeError(f"{where}: max = {s!r} is not a number with a unit (e.g. \"2 ms\", \"0.5x torch\")")
    units = _UNITS[_KIND[metric]]
    if not m.group(2):
        raise RecipeError(f"{where}: max = {s!r} has no unit; for {metric} use one of {', '.join(units)}")
    if m.group(2) not in units:
        raise RecipeError(f"{where}: unit {m.group(2)!r} does not fit {metric}; use one of {', '.join(units)}")
    return Limit(float(m.group(1)) * units[m.group(2)], None, s)


# Fidelity figures a budget can bound: the output kind that produces each (compress.quality.fidelity.compare_outputs)
# and which way is better. top2..top5_overlap follow agreement; "metric"/"metric.NAME" are the user's.
FIDELITY_FIGURES: dict[str, tuple[str, str]] = {
    "agreement": ("logits", ">="), "cosine_mean": ("embedding", ">="), "cosine_worst": ("embedding", ">="),
    "snr_db": ("regression", ">="), "rel_error": ("regression", "<="),
    **{f"top{k}_overlap": ("logits", ">=") for k in range(2, 6)},
    # Causal language models (compress.measuring.measure_lm), the cell's generation record: quality on held-out text
    # is deterministic; the two speed ratios are decided on their paired interval like latency limits.
    **{f: (GENERATION, op) for f, op in (("perplexity", "<="), ("perplexity_rise", "<="), ("kl", "<="),
                                          ("top1_agreement", ">="), ("greedy_agreement", ">="),
                                          ("decode_speedup", ">="), ("ttft_ratio", "<="))},
}
_FIGURE_ALIASES = {"cosine": "cosine_mean"}  # the per-sample cosine the report shows, not the global one
_FRACTIONS = ("agreement", "top2_overlap", "top3_overlap", "top4_overlap", "top5_overlap", "top1_agreement",
              "greedy_agreement", "perplexity_rise")
_RATIOS = ("decode_speedup", "ttft_ratio")


@dataclass(frozen=True)
class FidelityBound:
    figure: str  # a key of the cell's fidelity record, or "metric" / "metric.NAME"
    op: str  # ">=" or "<="
    value: float
    text: str

    @property
    def kind(self) -> str | None:
        """The output kind whose fidelity has this figure (None: the user's metric, any kind)."""
        return FIDELITY_FIGURES[self.figure][0] if self.figure in FIDELITY_FIGURES else None

    def holds(self, got: float) -> bool:
        return got >= self.value if self.op == ">=" else got <= self.value


def parse_fidelity(text: str, where: str) -> FidelityBound:
    """``"cosine_worst >= 0.97"``, ``"agreement >= 99%"``, ``"snr_db >= 30 dB"``, ``"metric.recall_at_5 >= 0.8"``."""
    s = text.strip()
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_.\-]*)\s*(>=|<=)\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|dB|x)?", s)
    figures = [*FIDELITY_FIGURES, "metric", "metric.NAME"]
    if not m:
        raise RecipeError(f"{where}: fidelity = {s!r} is not 'FIGURE >= VALUE' (e.g. \"cosine_worst >= 0.97\"); "
                          f"figures: {', '.join(figures)}")
    fig, op, num, unit = m.group(1), m.group(2), float(m.group(3)), m.group(4)
    fig = _FIGURE_ALIASES.get(fig, fig)
    if fig not in FIDELITY_FIGURES and fig != "metric" and not (fig.startswith("metric.") and len(fig) > 7):
        raise RecipeError(f"{where}: fidelity figure {m.group(1)!r} not understood; use one of {', '.join(figures)}")
    if fig in FIDELITY_FIGURES and op != FIDELITY_FIGURES[fig][1]:
        better = "higher" if FIDELITY_FIGURES[fig][1] == ">=" else "lower"
        raise RecipeError(f"{where}: {fig} is better {better}; bound it with {FIDELITY_FIGURES[fig][1]} "
                          f"(fidelity = \"{fig} {FIDELITY_FIGURES[fig][1]} {m.group(3)}\")")
    if unit == "x" and fig not in _RATIOS:
        raise RecipeError(f"{where}: 'x' applies to {' and '.join(_RATIOS)}, not {fig}")
    if unit == "%":
        if fig not in _FRACTIONS:
            raise RecipeError(f"{where}: '%' applies to agreement and top-k overlap, not {fig}")
        num /= 100
    elif unit == "dB" and fig != "snr_db":
        raise RecipeError(f"{where}: 'dB' applies to snr_db, not {fig}")
    if fig in (*_FRACTIONS, "cosine_mean", "cosine_worst"):
        lo = 0.0 if fig in _FRACTIONS else -1.0
        if not lo <= num <= 1.0:
            hint = f"; write {num / 100:g} or {num:g}%" if fig in _FRACTIONS and 1 < num <= 100 else ""
            raise RecipeError(f"{where}: {fig} lies in [{lo:g}, 1], so {fig} {op} {m.group(3)} cannot be decided"
                              f"{hint}")
    return FidelityBound(fig, op, num, s)


def load_budgets(path: str | Path) -> tuple[BudgetsFile, dict[str, Path]]:
    """Read and validate a budgets file; return it and the resolved recipe path of each model."""
    p, raw = read_toml(path, "budgets")
    try:
        bf = BudgetsFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise RecipeError(f"{p}: unknown key '{loc}'") from None
        if err["type"] == "literal_error":
            raise RecipeError(f"{p}: {loc}: unknown metric {err.get('input')!r}; "
                              f"allowed: {', '.join(METRICS)}") from None
        raise RecipeError(f"{p}: {loc}: {err['msg']} (got {err.get('input')!r})") from None
    from ..core.registry import manifest

    known_targets = manifest()["targets"]  # from the plugin manifest: a bad budgets file imports no plugin
    default_target = next((k for k, info in known_targets.items() if info["default"] and not info["reference"]), "")
    bf = bf.model_copy(update={"budget": [b if b.target else b.model_copy(update={"target": default_target})
                                          for b in bf.budget]})
    recipes = {}
    for name, rp in bf.models.items():
        q = Path(rp) if Path(rp).is_absolute() else p.parent / rp
        if not q.exists():
            raise RecipeError(f"{p}: models.{name}: recipe {q} not found")
        recipes[name] = q
    for i, b in enumerate(bf.budget):
        where = f"{p}: budget[{i + 1}]"
        if b.model not in bf.models:
            raise RecipeError(f"{where}: unknown model {b.model!r}; models in this file: {', '.join(bf.models)}")
        if b.target not in known_targets:
            raise RecipeError(f"{where}: unknown target {b.target!r}; known targets: {', '.join(known_targets)}")
        if b.seq is not None and b.metric not in LATENCY:
            raise RecipeError(f"{where}: seq applies to latency metrics ({', '.join(LATENCY)}), not "
                              f"{b.metric or 'fidelity'}")
        if b.fidelity is not None:
            if b.metric is not None or b.max is not None:
                raise RecipeError(f"{where}: give either fidelity = \"FIGURE >= VALUE\" or metric and max, not both")
            parse_fidelity(b.fidelity, where)
            continue
        if b.metric is None or b.max is None:
            raise RecipeError(f"{where}: missing {'metric' if b.metric is None else 'max'}; a budget is metric + max "
                              f"(e.g. metric = \"p50\", max = \"2 ms\") or fidelity = \"cosine_worst >= 0.97\"")
        lim = parse_limit(b.max, b.metric, where)
        if lim.ratio_to not in (None, "original", "recorded") and lim.ratio_to not in known_targets:
            raise RecipeError(f"{where}: {b.max!r} refers to {lim.ratio_to!r}, which is neither a target "
                              f"({', '.join(known_targets)}) nor 'original' or 'recorded'")
        if lim.ratio_to == b.target or (lim.ratio_to == "original" and b.variant == "baseline"):
            what = f"target {b.target}" if lim.ratio_to == b.target else "the original model"
            raise RecipeError(f"{where}: max = {b.max!r} compares {what} with itself (the same cell: the ratio is 1 "
                              "by construction); name another target, 'original' or 'recorded'")
    return bf, recipes


def check_fidelity_budgets(bf: BudgetsFile, recipes: dict[str, Path], where: str | Path,
                           cache_dir: str | Path | None = None) -> None:
    """Refuse, before anything runs, a fidelity budget the run cannot decide: a figure its model's output
    kind does not produce (agreement for an embedding model), or the user metric when the recipe has none."""
    from ..core.cache import Cache
    from ..inputs.models import load_model
    from ..measuring.measurement import planned_output_kind
    from ..stages.recipe import load_recipe

    for model, rpath in recipes.items():
        mine = [(f"{where}: budget[{i + 1}]", b) for i, b in enumerate(bf.budget)
                if b.model == model and b.fidelity is not None]
        if not mine:
            continue
        rec = load_recipe(rpath)
        bounds = [(w, parse_fidelity(b.fidelity or "", w)) for w, b in mine]
        for w, bd in bounds:
            if bd.kind is None and not rec.measure.metric:
                raise RecipeError(f"{w}: {bd.figure} bounds the recipe's measure.metric, but {rpath} names none; "
                                  "set measure.metric = \"package.module:function\"")
        if all(bd.kind is None for _, bd in bounds):
            continue
        src = rec.model.source
        if rec.model.task == GENERATION or src.endswith(".gguf") or src.startswith("gguf:"):
            kind, why = GENERATION, "the model's task (a causal language model)"
        elif all(bd.kind == GENERATION for _, bd in bounds):
            kind, why = "not a causal LM", f"the model's task ({rec.model.task or 'none'})"
        else:
            root = load_model(rec.model, Cache(Path(cache_dir) if cache_dir else None))
            kind, why = planned_output_kind(rec, root)
        for w, bd in bounds:
            if bd.kind is not None and bd.kind != kind:
                figs = dict.fromkeys("topK_overlap" if k.endswith("_overlap") else k
                                     for k, (kd, _) in FIDELITY_FIGURES.items() if kd == kind)
                raise RecipeError(f"{w}: {bd.text!r}: model {model!r} gives {kind} output, whose fidelity has no "
                                  f"{bd.figure} (bound {', '.join(figs)} or metric.NAME); kind from: {why}")


