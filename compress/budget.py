"""The budget gate: ``compress check BUDGETS.toml``.

A budgets file names models (recipes) and the limits each must meet per target::

    models = { digits = "examples/digits.toml" }
    confidence = 0.95

    [[budget]]
    model = "digits"
    target = "onnxruntime"
    metric = "p50"            # p50 | p90 | p99 | mean | accuracy_drop | size | peak_memory
    max = "0.5x torch"        # "2 ms", "0.5x torch" (same run), "1.1x original", "1.05x recorded"

    [[budget]]
    model = "encoder"
    fidelity = "cosine_worst >= 0.97"   # instead of metric/max: a bound on a fidelity figure

Fidelity budgets bound a figure of the cell's fidelity to the original model (compress.fidelity):
``agreement`` / ``topK_overlap`` (logits), ``cosine_mean`` (alias ``cosine``) / ``cosine_worst``
(embeddings), ``snr_db`` / ``rel_error`` (regression), ``metric`` or ``metric.NAME`` (the recipe's
``measure.metric``). Fidelity is deterministic (same data, same outputs), so it is decided on the
value itself, without an interval. A figure the model's output kind does not produce is a usage
error before anything runs.

Verdicts are noise-aware: latency limits are decided on a bootstrap confidence
interval, so a budget passes only when the whole interval is within the limit,
fails only when all of it is beyond, and is *inconclusive* otherwise.

Verdicts are honest about what happened: a model under budget that failed to build,
failed to run, or whose deployed kernels disagree with its simulation *fails*; only a
target that cannot run on this machine is *skipped*. ``x recorded`` re-times the
baseline's kept artifact in the same run (paired); numbers recorded on another day are
the fallback when the artifact is gone, and the verdict says it is the weaker one.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .artifact import sha256_json
from .compare import CellRef, clock, compare, same_device, statistic, to_numbers
from .errors import InputError, RecipeError
from .recipe import read_toml
from .report_schema import IdenticalRatio, MeasuredRatio, NoRatio, Report, ResultCell, latency_key
from .stats import verdict

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


# Fidelity figures a budget can bound: the output kind that produces each (compress.fidelity.compare_outputs)
# and which way is better. top2..top5_overlap follow agreement; "metric"/"metric.NAME" are the user's.
FIDELITY_FIGURES: dict[str, tuple[str, str]] = {
    "agreement": ("logits", ">="), "cosine_mean": ("embedding", ">="), "cosine_worst": ("embedding", ">="),
    "snr_db": ("regression", ">="), "rel_error": ("regression", "<="),
    **{f"top{k}_overlap": ("logits", ">=") for k in range(2, 6)},
    # Causal language models (compress.measure_lm), the cell's generation record: quality on held-out text
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
    from .registry import manifest

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
    from .cache import Cache
    from .measurement import planned_output_kind
    from .models import load_model
    from .recipe import load_recipe

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


# ----------------------------------------------------------------- baselines


def fingerprint_key(machine: dict[str, Any], threads: int | str) -> str:
    """Baselines match on the CPU, libraries and the *thread setting* ("auto" for 0: the count a
    run picks under load may differ, and both sides of a re-timed comparison use the same)."""
    cpu = machine["cpu"]
    return sha256_json({"cpu": cpu["model"], "isa": cpu["isa"], "cores": cpu["affinity_cores"], "threads": threads,
                        "libs": machine["libraries"], "gpu": machine.get("gpu")})


class BaselineStore:
    """Recorded measurements keyed by model, variant, target, batch and machine fingerprint."""

    SCHEMA = "compress.baseline/v1"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        if path.exists():
            try:
                d = json.loads(path.read_text())
                if d.get("schema") != self.SCHEMA or not isinstance(d.get("entries"), dict):
                    raise ValueError(f"schema is {d.get('schema')!r}, expected {self.SCHEMA!r}")
                self.entries = d["entries"]
            except (ValueError, AttributeError) as e:
                raise InputError(f"{path}: baseline file is corrupt ({e}); refusing to use or overwrite it. "
                                 "Fix it, or move it away and run with --update-baseline") from e

    @staticmethod
    def key(model: str, variant: str, target: str, batch: int | str, fp: str) -> str:
        # batch: a batch size, or a report's latency key ("1", "1/s128")
        return f"{model}|{variant}|{target}|b{batch}|{fp}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry

    @property
    def artifact_dir(self) -> Path:
        """Baseline artifacts live beside the baseline file (commit both), one folder per digest."""
        return self.path.with_name(self.path.name.removesuffix(".json") + ".artifacts")

    def keep_artifact(self, compiled: Path) -> dict[str, str] | None:
        """Copy a compiled artifact into the baseline folder; return where and its content hash."""
        from .artifact import Artifact, sha256_files

        try:
            art = Artifact.load(compiled)
        except (OSError, ValueError, KeyError):
            return None
        dest = self.artifact_dir / art.digest
        if not dest.exists():
            tmp = self.artifact_dir / f".tmp-{art.digest}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(compiled, tmp)
            tmp.replace(dest)
        return {"dir": art.digest, "files_sha256": sha256_files(dest)}

    def load_artifact(self, entry: dict[str, Any]) -> tuple[Any, str | None]:
        """The stored artifact of an entry, verified against its recorded content hash, or why not."""
        from .artifact import Artifact, sha256_files

        info = entry.get("artifact")
        if not info:
            return None, "the baseline was recorded before artifacts were kept (numbers only)"
        d = self.artifact_dir / info["dir"]
        if not d.is_dir():
            return None, f"the baseline artifact {d} is gone"
        if sha256_files(d) != info["files_sha256"]:
            return None, f"the baseline artifact {d} changed on disk (content hash differs); not used"
        try:
            return Artifact.load(d), None
        except (OSError, ValueError, KeyError) as e:
            return None, f"the baseline artifact {d} is unreadable ({e})"

    def references(self, model: str, rec: Any, budgets: list[BudgetSpec], fp: str,
                   say: Callable[[str], None]) -> dict[str, Any]:
        """Stored baseline artifacts that 'x recorded' budgets need, by target, to re-time in this run."""
        out: dict[str, Any] = {}
        for b in budgets:
            if b.max is None or b.metric is None or b.target in out or \
                    parse_limit(b.max, b.metric, b.title()).ratio_to != "recorded":
                continue
            variant = b.variant or (rec.name if rec.passes else "baseline")
            entry = self.get(self.key(model, variant, b.target, b.latency_key(), fp))
            if entry is None:
                continue
            art, why = self.load_artifact(entry)
            if art is None:
                entry["artifact_missing"] = why
                say(f"recorded baseline for {model}/{variant}/{b.target}: {why}; falling back to recorded numbers")
            else:
                out[b.target] = art
        return out

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"schema": self.SCHEMA, "entries": self.entries}, indent=1, sort_keys=True))
        tmp.replace(self.path)


# ------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    budget: str
    model: str
    variant: str
    target: str
    metric: str
    limit: str
    status: str  # pass | fail | inconclusive | skipped
    value: float | None = None
    low: float | None = None
    high: float | None = None
    unit: str = ""
    detail: str = ""
    at: str | None = None  # latency budgets: the report's latency key (batch) read; compress.history tracks it
    allow_skip: bool = False  # a skip of this budget does not fail the check
    seconds: float = 0.0  # this budget's share of its model's measuring time (JUnit's per-case time)

    def line(self) -> str:
        if self.value is None:
            got = "-"
        elif self.low is not None and self.high is not None:
            got = f"{self.value:.4g} {self.unit} [{self.low:.4g}, {self.high:.4g}]"
        else:
            got = f"{self.value:.4g} {self.unit}"
        detail = f" - {self.detail}" if self.detail else ""
        return f"{self.status.upper():12s} {self.budget}: {got} (limit {self.limit}){detail}"


def evaluate_budget(b: BudgetSpec, report: Report, bf: BudgetsFile, store: BaselineStore | None,
                    fp: str, memory: Callable[[ResultCell, int], int] | None = None) -> Verdict:
    """Decide one budget from a run's report (raw latency samples included)."""
    variants = [v for v in report.variants if v not in ("baseline", "recorded")]
    variant = b.variant or (variants[0] if variants else "baseline")
    v, bound, lim = _new_verdict(b, variant)
    cell = report.cell(variant, b.target)
    if cell is None:
        v.status = "fail"
        v.detail = f"variant {variant!r} on {b.target!r} was not measured (variants: {', '.join(report.variants)})"
        return v
    if not _judgeable(v, b, cell):
        return v
    if bound is not None:
        return _fidelity_verdict(v, bound, cell, report)
    assert lim is not None and b.metric is not None
    if _KIND[b.metric] == "latency":
        return _latency_verdict(v, b, lim, cell, report, bf, store, fp)
    return _value_verdict(v, b, lim, cell, report, memory)


def _new_verdict(b: BudgetSpec, variant: str) -> tuple[Verdict, FidelityBound | None, Limit | None]:
    """The budget's verdict before anything is judged (skipped), with its parsed bound or limit."""
    if b.fidelity is not None:
        bound = parse_fidelity(b.fidelity, b.title())
        title = b.name or f"{b.model}/{variant}/{b.target}/{bound.figure}"
        return (Verdict(title, b.model, variant, b.target, bound.figure, b.fidelity, "skipped",
                        unit="dB" if bound.figure == "snr_db" else ""), bound, None)
    assert b.metric is not None and b.max is not None  # load_budgets refuses a budget without them
    lim = parse_limit(b.max, b.metric, b.title())
    title = b.name or f"{b.model}/{variant}/{b.target}/{b.metric}@b{b.batch}" + (
        f"s{b.seq}" if b.seq is not None else "")
    v = Verdict(title, b.model, variant, b.target, b.metric, b.max, "skipped", unit=_SHOW[_KIND[b.metric]])
    return v, None, lim


def _judgeable(v: Verdict, b: BudgetSpec, cell: ResultCell) -> bool:
    """Whether the cell can be judged at all; when not, ``v`` says why (skipped or failed)."""
    if cell.status == "unavailable":
        # The only honest skip: this machine cannot run the target (library missing, no device).
        v.detail = f"{b.target} unavailable here: {cell.reason}"
        return False
    if cell.status == "skipped":
        v.detail = f"{b.target} not measured: {cell.reason}"
        return False
    if cell.status != "ok":
        # A failed build, a failed inference or a parity breach of the model under budget is a
        # failure: a gate that skips it goes green on a model that does not even compile.
        v.status = "fail"
        v.detail = f"{b.target} {cell.status}: {cell.reason}"
        return False
    qp = cell.quant_parity
    if qp is not None and qp.flagged:
        tol = qp.tolerance.model_dump() if qp.tolerance is not None else None
        v.status = "fail"
        v.detail = (f"deployed model on {b.target} disagrees with its simulation (agreement "
                    f"{100 * (qp.agreement or 0):.1f}%, tolerance {tol})")
        return False
    return True


def _value_verdict(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report,
                   memory: Callable[[ResultCell, int], int] | None) -> Verdict:
    """Accuracy drop, size or peak memory: decided on the value."""
    if b.metric == "accuracy_drop":
        base = report.cell("baseline", b.target)
        if cell.accuracy_top1 is None or base is None or base.accuracy_top1 is None:
            v.detail = "accuracy not measured (the recipe has no labelled data)"
            return v
        v.value = 100 * (base.accuracy_top1 - cell.accuracy_top1)
    elif b.metric == "size":
        if cell.size_bytes is None:
            v.detail = "size not measured"
            return v
        v.value = float(cell.size_bytes)
    else:
        if memory is None:
            v.detail = "peak memory not measured"
            return v
        v.value = float(memory(cell, b.batch))
    v.status = "pass" if v.value <= lim.value else "fail"
    return v


def _latency_verdict(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report, bf: BudgetsFile,
                     store: BaselineStore | None, fp: str) -> Verdict:
    """A latency budget, decided on its interval: absolute, or a ratio (``compress.compare``) to another cell
    of the run, to the recorded baseline re-timed in it, or to numbers recorded on another day."""
    at = v.at = b.latency_key(report.measurement.seq_own)
    lat = cell.latency.get(at)
    if lat is None:
        v.status = "fail"
        if b.seq is not None and at != str(b.batch):
            v.detail = (f"batch {b.batch} at sequence length {b.seq} was not measured on {b.target} (see the "
                        "cell's notes: a build fixed to one length runs only that); the budget cannot be verified")
            return v
        v.detail = (f"batch {b.batch} was not measured on {b.target}; the budget cannot be verified "
                    "(add it to the recipe's measure.batch_sizes, or export with a dynamic batch)")
        return v
    notes: list[str] = [f"fewer rounds: {lat.capped}"] if lat.capped else []
    if cell.device is not None:
        ck = clock(cell, at)
        if ck is None or ck.device is None or not ck.samples:
            v.status = "fail"
            v.detail = (f"{b.target} ran on {cell.device} but the report holds no figures from its clock at "
                        f"batch {b.batch}; the budget cannot be verified")
            return v
        # The host figures of a remote cell include the network round trip: the device's are its latency.
        notes.append(f"on {cell.device}'s own clock")
    if lim.ratio_to is None:
        v.value, v.low, v.high = statistic(cell, at, v.metric, bf.confidence, bf.resamples)
    else:
        decided = (_to_recorded(v, b, lim, cell, report, bf, store, fp, notes) if lim.ratio_to == "recorded"
                   else _to_other(v, b, lim, cell, report, bf, notes))
        if decided is not None:
            return decided
    assert v.low is not None and v.high is not None  # set by the statistic or the ratio above
    v.status = verdict(v.low, v.high, lim.value)
    if v.status == "inconclusive":
        notes.insert(0, f"the {int(bf.confidence * 100)}% interval straddles the limit; measurement too noisy to "
                     "decide (raise rounds, quiet the machine)")
    v.detail = "; ".join(notes)
    return v


def _paired(v: Verdict, lim: Limit, cell: ResultCell, other: ResultCell, report: Report, bf: BudgetsFile,
            what: str, notes: list[str]) -> Verdict | MeasuredRatio:
    """The cell's latency over ``other``'s, paired in this run (``compress.compare``), widened by the
    between-session offset of the baseline on the budget's target: the ratio with its interval (``v``'s figures
    set), or the verdict when it is decided without one (an identical build) or cannot be computed."""
    assert v.at is not None
    r = compare(cell, other, v.at, v.metric, bf.confidence, bf.resamples, widen_by=report.cell("baseline", v.target),
                what=what)
    if isinstance(r, IdenticalRatio):
        v.value = v.low = v.high = 1.0
        v.status = "pass" if lim.value >= 1.0 else "fail"
        v.detail = f"identical build to {what} (same digest): not raced against itself"
        return v
    if isinstance(r, NoRatio):
        if not same_device(cell, other):
            return _across_devices(v, cell, other, what)
        v.status = "fail" if r.verdict == "not comparable" else "inconclusive"
        v.detail = f"{r.text}; the budget cannot be verified"
        return v
    if r.session:
        notes.append(f"interval widened by the between-session A/A offset ({100 * r.session:.1f}%)")
    v.value, v.low, v.high = r.ratio, r.low, r.high
    return r


def _to_other(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report, bf: BudgetsFile,
              notes: list[str]) -> Verdict | None:
    """A ratio to another cell of the run: the baseline on this target ("x original") or this variant on
    another target ("x TARGET")."""
    assert lim.ratio_to is not None and v.at is not None
    other = report.cell(v.variant if lim.ratio_to != "original" else "baseline",
                        b.target if lim.ratio_to == "original" else lim.ratio_to)
    if other is None or other.status != "ok" or v.at not in other.latency:
        v.detail = f"reference {lim.ratio_to} unavailable: {other.reason if other else 'not measured'}"
        if other is not None and other.status == "failed":
            v.status = "fail"  # the reference failing to build/run is a broken build, not a skip
        return v
    v.unit = f"x {lim.ratio_to}"
    r = _paired(v, lim, cell, other, report, bf, lim.ratio_to, notes)
    if isinstance(r, Verdict):
        return r
    notes.append(f"paired over {r.rounds} rounds; smallest detectable difference ~{100 * r.mde:.0f}%")
    return None


def _to_recorded(v: Verdict, b: BudgetSpec, lim: Limit, cell: ResultCell, report: Report, bf: BudgetsFile,
                 store: BaselineStore | None, fp: str, notes: list[str]) -> Verdict | None:
    """A ratio to the recorded baseline: its kept artifact re-timed in this run (paired), else the numbers
    recorded on another day (unpaired: the weaker comparison, said so)."""
    assert v.at is not None
    ref = report.cell("recorded", b.target)
    rec = store.get(BaselineStore.key(b.model, v.variant, b.target, v.at, fp)) if store else None
    if ref is not None and (rec is None or (rec.get("artifact") or {}).get("dir") != ref.compiled_digest):
        # One stored artifact is re-timed per target; this one is another budget's baseline.
        if rec is not None:
            rec.setdefault("artifact_missing", "this target's re-timed baseline artifact belongs to "
                                               "another variant's budget")
        ref = None
    if ref is not None and ref.status == "ok" and not same_device(ref, cell):
        return _across_devices(v, cell, ref, "the recorded baseline")
    if ref is not None and ref.status == "ok" and v.at in ref.latency:
        v.unit = "x recorded"
        r = _paired(v, lim, cell, ref, report, bf, "the recorded baseline", notes)
        if isinstance(r, Verdict):
            return r
        notes.append(f"baseline artifact {str(ref.compiled_digest)[:12]} re-timed in this run, "
                     f"paired over {r.rounds} rounds; smallest detectable difference ~{100 * r.mde:.0f}%")
        return None
    if store is None:
        v.detail = "no baseline file given"
        return v
    if rec is None:
        v.detail = (f"no recorded baseline for this machine fingerprint ({fp[:12]}); "
                    "run compress check --update-baseline on this machine first")
        return v
    got = to_numbers(cell, v.at, rec, v.metric, bf.confidence, bf.resamples)
    if isinstance(got, NoRatio):
        v.status = "fail"
        v.detail = (f"{b.target} ran on {cell.device or 'this machine'}, its baseline was recorded on "
                    f"{rec.get('device') or 'this machine'}: figures from two devices are not "
                    "comparable; run compress check --update-baseline against this device")
        return v
    v.value, v.low, v.high = got.ratio, got.low, got.high
    v.unit = "x recorded (numbers only)"
    why = (ref.reason if ref is not None and ref.status != "ok"
           else rec.get("artifact_missing") or "the baseline artifact is gone")
    notes.append(f"WEAKER comparison: against numbers recorded {rec.get('recorded', '?')}, unpaired, "
                 f"because {why}; run --update-baseline to store the artifact")
    if rec.get("digest") != cell.compiled_digest:
        notes.append("baseline was recorded for a different build of this model")
    return None


def _fidelity_source(report: Report) -> str:
    """What a run's fidelity was measured on, for the verdict."""
    from .fidelity import SYNTHETIC_SAMPLES

    if report.data is None:
        return f"{SYNTHETIC_SAMPLES} synthetic inputs (the recipe has no data)"
    return f"the validation split ({report.data.val} samples of {report.data.source})"


def _across_devices(v: Verdict, cell: ResultCell, other: ResultCell, what: str) -> Verdict:
    """A latency ratio between cells timed on two devices is refused: it would not be a same-run comparison."""
    v.status = "fail"
    v.detail = (f"{CellRef.of(cell)} was timed on {cell.device or 'this machine'} and {what} on "
                f"{other.device or 'this machine'}: a ratio across devices is not a same-run comparison; budget an "
                "absolute latency (e.g. '5 ms') or a ratio to a cell on the same device ('x original')")
    return v


def _generation_verdict(v: Verdict, bound: FidelityBound, cell: ResultCell) -> Verdict:
    """A causal LM's figure: quality decided on the value; a speed ratio on its paired interval (pass when all
    of it holds the bound, fail when none of it does, inconclusive otherwise)."""
    g = cell.generation
    v.status = "fail"
    if g is None:
        v.detail = "this cell has no generation figures (it was not measured as a causal language model)"
        return v
    got = getattr(g, bound.figure, None)
    if got is None:
        v.detail = (f"this cell has no {bound.figure} (the reference cell is not compared with itself)"
                    if bound.figure in _RATIOS else f"this cell has no {bound.figure}")
        return v
    if bound.figure in _RATIOS:
        v.value, v.low, v.high = float(got.ratio), float(got.low), float(got.high)
        lo_ok, hi_ok = bound.holds(v.low), bound.holds(v.high)
        v.status = "pass" if lo_ok and hi_ok else "fail" if not lo_ok and not hi_ok else "inconclusive"
        v.detail = f"paired ratio to the reference cell over {got.rounds} interleaved generation rounds"
        return v
    v.value = float(got)
    v.status = "pass" if bound.holds(v.value) else "fail"
    v.detail = f"on {g.eval_tokens} held-out tokens against the reference cell; deterministic: decided on the value"
    return v


def _fidelity_verdict(v: Verdict, bound: FidelityBound, cell: ResultCell, report: Report) -> Verdict:
    """Decide a fidelity bound on the value itself: the same data gives the same outputs (no interval)."""
    if bound.kind == GENERATION:
        return _generation_verdict(v, bound, cell)
    fid = cell.fidelity
    v.status = "fail"
    if fid is None:
        v.detail = ("fidelity was not measured on this cell (no reference output: the original model did not "
                    "run on any target)")
        return v
    if fid.degenerate:
        # A constant or all-zero reference passes any fidelity bound vacuously: that is no evidence.
        v.detail = f"fidelity cannot be judged: {fid.degenerate}"
        return v
    value: float | None
    if bound.figure == "metric" or bound.figure.startswith("metric."):
        got = fid.metric or {}
        name = bound.figure.partition(".")[2]
        if not got:
            v.detail = "the recipe's measure.metric gave no figure on this cell"
            return v
        if not name and len(got) != 1:
            v.detail = f"measure.metric returned several figures ({', '.join(got)}); name one: metric.NAME"
            return v
        if name and name not in got:
            v.detail = f"measure.metric returned {', '.join(got)}, not {name!r}"
            return v
        value = got[name] if name else next(iter(got.values()))
    else:
        value = getattr(fid, bound.figure, None)
        if value is None:
            have = [k for k in FIDELITY_FIGURES if getattr(fid, k, None) is not None]
            v.detail = f"this cell's {fid.kind} fidelity has no {bound.figure} (it has {', '.join(have) or 'none'})"
            return v
    v.value = float(value)
    v.status = "pass" if bound.holds(v.value) else "fail"
    v.detail = (f"{fid.kind} fidelity to the original model on {_fidelity_source(report)}; deterministic: decided "
                "on the value, no interval")
    return v


def overall_exit(verdicts: list[Verdict], allow_skip: bool = False) -> int:
    """The check's exit code. It fails closed: a budget that could not be judged (skipped: no recorded
    baseline, a reference or target unavailable here) is exit 4 unless skipping is allowed for it."""
    st = {v.status for v in verdicts}
    if "fail" in st:
        return EXIT_FAIL
    if any(v.status == "skipped" and not (allow_skip or v.allow_skip) for v in verdicts):
        return EXIT_SKIPPED
    if "inconclusive" in st:
        return EXIT_INCONCLUSIVE
    return EXIT_PASS


def _unique_names(verdicts: list[Verdict]) -> list[str]:
    """JUnit test case names, one per budget: two budgets on the same figure (``2 ms`` and ``0.5x torch``)
    are told apart by their limit, and by their position if even that is the same (CI views key on names)."""
    names = [v.budget for v in verdicts]
    names = [f"{n} [max {v.limit}]" if names.count(n) > 1 else n for n, v in zip(names, verdicts, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} #{seen[n]}")
    return out


def junit_xml(verdicts: list[Verdict], seconds: float) -> str:
    suite = ET.Element("testsuite", name="compress.check", tests=str(len(verdicts)),
                       failures=str(sum(v.status == "fail" for v in verdicts)),
                       errors=str(sum(v.status == "inconclusive" for v in verdicts)),
                       skipped=str(sum(v.status == "skipped" for v in verdicts)), time=f"{seconds:.3f}",
                       timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    for v, name in zip(verdicts, _unique_names(verdicts), strict=True):
        tc = ET.SubElement(suite, "testcase", classname=f"compress.{v.model}.{v.target}", name=name,
                           time=f"{v.seconds:.3f}")
        msg = v.line()
        if v.status == "fail":
            ET.SubElement(tc, "failure", message=msg, type="BudgetExceeded").text = msg
        elif v.status == "inconclusive":
            ET.SubElement(tc, "error", message=msg, type="Inconclusive").text = msg
        elif v.status == "skipped":
            ET.SubElement(tc, "skipped", message=v.detail or "skipped")
        ET.SubElement(tc, "system-out").text = json.dumps(asdict(v))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


@dataclass
class CheckResult:
    verdicts: list[Verdict]
    exit_code: int
    reports: dict[str, Report] = field(default_factory=dict)
    noise: list[str] = field(default_factory=list)  # per target/batch: A/A spread, smallest detectable difference
    warnings: list[str] = field(default_factory=list)  # machine load seen while measuring
    recorded: list[str] = field(default_factory=list)  # --update-baseline: what was recorded, for which machine, where
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS

    def summary(self) -> str:
        counts = {s: sum(v.status == s for v in self.verdicts)
                  for s in ("pass", "fail", "inconclusive", "skipped", "recorded")}
        lines = [v.line() for v in self.verdicts]
        lines += [f"WARNING {w}" for w in dict.fromkeys(self.warnings)]
        lines += self.noise
        lines += self.recorded
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "recorded"))
        if self.exit_code == EXIT_SKIPPED:
            lines.append("FAILED CLOSED: a budget could not be judged here (see SKIPPED above); record a baseline "
                         "with --update-baseline, make the target available, or allow it with --allow-skip "
                         "(or allow_skip = true in the budgets file or the budget)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"schema": "compress.check/v1", "exit_code": self.exit_code,
                "verdicts": [asdict(v) for v in self.verdicts], "noise": self.noise, "warnings": self.warnings,
                "recorded": self.recorded}


def _recipe_for(rec: Any, budgets: list[BudgetSpec], rounds: int | None) -> Any:
    """The model's recipe with every target and batch size the budgets need."""
    from .registry import default_targets, get_target_config

    targets = list(rec.targets) or default_targets()
    have = {t.kind for t in targets}
    for b in budgets:
        lim = parse_limit(b.max, b.metric, b.title()) if b.max is not None and b.metric is not None else None
        for k in (b.target, lim.ratio_to if lim is not None else None):
            if k and k not in ("original", "recorded") and k not in have:
                targets.append(get_target_config(k)())
                have.add(k)
    batches = sorted({*rec.measure.batch_sizes, *(b.batch for b in budgets if b.fidelity is None)})
    seqs = sorted({*(rec.measure.seq_lens or []), *(b.seq for b in budgets if b.seq is not None)})
    measure = rec.measure.model_copy(update={"batch_sizes": batches, **({"min_runs": rounds} if rounds else {}),
                                             **({"seq_lens": seqs} if seqs else {})})
    return rec.model_copy(update={"targets": targets, "measure": measure})


def check(
    path: str | Path,
    baseline: str | Path | None = None,
    update_baseline: bool = False,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    fail_on_unavailable: bool | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    allow_skip: bool | None = None,
) -> CheckResult:
    """Measure every model named in a budgets file and decide each budget."""
    import time

    t0 = time.perf_counter()
    bf, recipes = load_budgets(path)  # a bad budgets file is answered before torch is imported
    from .recipe import load_recipe

    for rpath in recipes.values():
        load_recipe(rpath)  # and so is a bad recipe it names (pass settings included)
    check_fidelity_budgets(bf, recipes, Path(path), cache_dir)

    from .fingerprint import machine_fingerprint
    from .memprobe import measure_peak_memory
    from .pipeline import run
    from .registry import get_target_config
    from .report import noise_lines
    base_path = Path(baseline) if baseline else Path(path).with_suffix(".baseline.json")
    store = BaselineStore(base_path)  # refuses a corrupt file before anything runs
    out = Path(out_dir) if out_dir else Path("runs") / "check"
    say = log or (lambda m: None)
    verdicts: list[Verdict] = []
    reports: dict[str, Report] = {}
    recorded_lines: list[str] = []
    for model, rpath in recipes.items():
        mine = [b for b in bf.budget if b.model == model]
        if not mine:
            continue
        rec = _recipe_for(load_recipe(rpath), mine, bf.rounds)
        fp0 = fingerprint_key(machine_fingerprint(), rec.measure.threads or "auto")
        refs = store.references(model, rec, mine, fp0, say)
        say(f"measuring {model} ({rpath})")
        t_model = time.perf_counter()
        report = run(rec, out_dir=out / model, cache_dir=cache_dir, progress=progress, log=log, references=refs)
        reports[model] = report
        fp = fingerprint_key(report.machine.model_dump(), report.measurement.threads_setting or "auto")

        def memory(cell: ResultCell, batch: int, report: Report = report) -> int:
            cfg = get_target_config(cell.target).model_validate(cell.target_config)
            from .artifact import Artifact

            assert cell.compiled_path is not None  # an "ok" cell has a compiled artifact
            probe = measure_peak_memory(cfg, Artifact.load(Path(cell.compiled_path)), batch,
                                        report.measurement.threads)
            return probe["model_peak_bytes"]

        mine_v = [evaluate_budget(b, report, bf, store, fp, memory) for b in mine]
        share = (time.perf_counter() - t_model) / len(mine_v)
        for b, v in zip(mine, mine_v, strict=True):
            v.allow_skip, v.seconds = b.allow_skip, share
        verdicts += mine_v
        if update_baseline:
            cells = []
            for r in report.results:
                if r.reference or r.status != "ok":
                    continue
                art = store.keep_artifact(Path(r.compiled_path)) if r.compiled_path else None
                for batch in r.latency:
                    ck = clock(r, batch)
                    assert ck is not None  # the cell's own latency key
                    samples, p50 = ck.samples, float(ck.stats.p50_ms)
                    store.put(BaselineStore.key(model, r.variant, r.target, batch, fp), {
                        "digest": r.compiled_digest, "samples_ms": samples, "p50_ms": p50,
                        "recorded": report.created, "machine": report.machine.cpu.model,
                        "artifact": art, **({"device": r.device} if r.device is not None else {})})
                    cells.append(f"{CellRef.of(r)}@b{batch} p50 {p50:.4g} ms")
            where = f"{store.path} (artifacts in {store.artifact_dir}/)"
            recorded_lines.append(f"RECORDED baseline of {model}: {len(cells)} cells ({'; '.join(cells)}) for "
                                  f"machine fingerprint {fp[:12]} ({report.machine.cpu.model}, threads "
                                  f"{report.measurement.threads_setting or 'auto'}) in {where}")
            for v in mine_v:  # a budget against the baseline just recorded: nothing to compare yet, not a skip
                if v.status == "skipped" and v.limit.replace(" ", "").endswith("xrecorded"):
                    v.status = "recorded"
                    v.detail = f"baseline recorded now for fingerprint {fp[:12]} in {store.path}; later checks compare"
    if update_baseline:
        store.save()
    skip_ok = bool(bf.allow_skip if allow_skip is None else allow_skip)
    if fail_on_unavailable:
        skip_ok = False
    res = CheckResult(verdicts, overall_exit(verdicts, skip_ok), reports, recorded=recorded_lines,
                      seconds=time.perf_counter() - t0)
    res.noise = [line for rep in reports.values() for line in noise_lines(rep)]
    res.warnings = [w for rep in reports.values() for w in (rep.contention.warnings if rep.contention else [])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(res.to_json(), indent=2))
    (out / "junit.xml").write_text(junit_xml(verdicts, time.perf_counter() - t0))
    return res


def assert_budgets(path: str | Path, **kwargs: Any) -> CheckResult:
    """pytest-friendly: raise :class:`BudgetExceeded` naming every budget that did not pass."""
    from .errors import BudgetExceeded

    res = check(path, **kwargs)
    if not res.passed:
        bad = [v.line() for v in res.verdicts if v.status != "pass"]
        raise BudgetExceeded("budgets not met:\n" + "\n".join(bad))
    return res
