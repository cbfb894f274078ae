"""The typed schema of ``report.json`` (``compress.report/v1``).

One set of pydantic models describes everything a run reports: ``build_report`` constructs a
:class:`Report` (so a writer that misspells a key fails validation at once, every record being
``extra="forbid"``), ``write_report`` writes it, and every reader in the package (the renderers,
``compress check``, ``compress compare``, ``compress search``) reads its attributes instead of string
keys. ``docs/report.schema.json`` is generated from these models for users who parse report.json
with other tools; ``python -m compress.reporting.report_schema`` rewrites it and ``--check`` says whether the
committed file is current.

Keys that are sometimes absent in report.json (``baseline_label``, a latency's ``aa_session``, the
figures of a parity check that could not run, ...) are optional fields here; :meth:`Report.to_json`
writes exactly the keys that were given (``exclude_unset``), so the file keeps the v1 shape it had
before these models existed. Only the per-pass notes of a variant (``variants.*.passes``) and a
target's settings (``results[].target_config``) are free-form: each pass and target writes its own.

Non-finite figures (an infinite SNR for identical outputs, an infinite smallest detectable
difference from two rounds) are written as the JavaScript constants ``Infinity``/``NaN``, as
Python's ``json`` module reads and writes them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.capabilities import Facts
from ..core.lineage import Lineage
from ..errors import InputError
from ..stages.recipe import MeasureSpec

SCHEMA = "compress.report/v1"
# Where the published schema lives, relative to the repository root.
SCHEMA_FILE = Path("docs") / "report.schema.json"

# Latency and ratio tables are keyed by the batch size as a string ("1", "32"): JSON object keys; at a
# sequence length other than the model's own (measure.seq_lens), "B/sS" ("1/s128").
BatchKey = Annotated[str, Field(pattern=r"^[1-9][0-9]*(/s[1-9][0-9]*)?$")]


def latency_key(batch: int, seq: int | None = None) -> str:
    """The key of one (batch, sequence length) in the latency tables; None: the model's own shape."""
    return str(batch) if seq is None else f"{batch}/s{seq}"


def parse_latency_key(key: str) -> tuple[int, int | None]:
    """(batch, sequence length or None) of a latency key."""
    b, _, s = key.partition("/s")
    return int(b), (int(s) if s else None)
FidelityKind = Literal["logits", "embedding", "regression"]


class _Record(BaseModel):
    """Base of every record we write: unknown keys are refused (a typo in the writer fails tests)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True, validate_assignment=True)


# ----------------------------------------------------------------------------------------- latency


class RatioCI(_Record):
    """A ratio of two latency statistics with its bootstrap interval (``compress.measuring.stats.RatioCI``)."""

    ratio: float
    low: float
    high: float
    rounds: int = Field(description="paired rounds used")
    block: int = Field(description="block length of the bootstrap, in rounds")
    mde: float = Field(description="smallest difference detectable with 80% power, as a fraction")
    paired: bool
    session: float = Field(description="between-session spread added to the interval (log scale)")


class LatencyStats(_Record):
    """Summary of one candidate's timed calls at one batch size (``measuring.measure.summarize``)."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    cv: float = Field(description="coefficient of variation (std / mean)")
    throughput: float = Field(description="samples per second at p50")


class DeviceLatency(LatencyStats):
    """Latency on the device's own clock, and which device that was."""

    measured_on: str | None = Field(None, description="the device the figures came from (a GPU, or an RPC device)")
    samples_ms: list[float] | None = Field(None, description="a remote (RPC) device: its own time of each timed "
                                           "round, in round order; ratios and budgets pair these")
    aa_session: RatioCI | None = Field(None, description="remote baseline: its second session on the device's clock")
    aa: RatioCI | None = Field(None, description="remote baseline: odd rounds against even ones, device clock")


class TimingOrder(_Record):
    method: str
    seed: int
    candidates: list[str]
    rounds: list[list[int]] = Field(description="the order of the candidates (indices) in every round")


class TimingInfo(_Record):
    """How the interleaved measurement went (everything but the samples; ``Timing.meta``)."""

    order: TimingOrder
    warmup: dict[str, int]
    capped: dict[str, str] = Field(description="candidate -> why it got fewer rounds")
    stopped: str
    seconds: float
    rounds: int


class BatchLatency(LatencyStats):
    """One cell's latency at one batch size, raw samples included (the budget gate bootstraps them)."""

    samples_ms: list[float]
    timing: TimingInfo
    p50_ci: tuple[float, float] | None = Field(None, description="95% interval of p50 (absent under 2 rounds)")
    aa_session: RatioCI | None = Field(None, description="baseline only: a second session timed beside it")
    aa: RatioCI | None = Field(None, description="baseline only: its odd rounds against its even rounds")
    capped: str | None = Field(None, description="why this cell got fewer rounds than asked")
    device: DeviceLatency | None = Field(None, description="time on the device's own clock (CUDA events, or a "
                                          "remote device through RPC) where the target has it")
    identical_to: str | None = Field(None, description="'variant/target' whose identical build was timed")


class MeasuredRatio(RatioCI):
    """p50 latency against the baseline's on the same target, paired over rounds."""

    identical: Literal[False]
    verdict: Literal["faster", "slower", "no measurable difference"]
    text: str


class IdenticalRatio(_Record):
    """The cell's build is byte-identical to the baseline's: not raced against itself."""

    ratio: float
    low: float
    high: float
    identical: Literal[True]
    verdict: Literal["identical"]
    text: str


class NoRatio(_Record):
    """No ratio: too few common rounds, or the cell and the baseline were timed on different devices."""

    verdict: Literal["not enough rounds", "not comparable"]
    text: str


LatencyRatio = Annotated[MeasuredRatio | IdenticalRatio | NoRatio, Field(discriminator="verdict")]


# -------------------------------------------------------------------------------- accuracy, parity


class Fidelity(_Record):
    """The cell's output against the original model's (``compress.quality.fidelity.compare_outputs``)."""

    kind: FidelityKind
    headline: Literal["agreement", "cosine_mean", "snr_db"] = Field(description="the figure tables show")
    cosine: float
    max_abs_diff: float
    mean_abs_diff: float
    agreement: float | None = Field(None, description="logits: argmax agreement")
    # top-k overlap for k = min(5, classes), k >= 2: one of these keys.
    top2_overlap: float | None = None
    top3_overlap: float | None = None
    top4_overlap: float | None = None
    top5_overlap: float | None = None
    cosine_mean: float | None = Field(None, description="embedding: per-sample cosine, mean")
    cosine_worst: float | None = Field(None, description="embedding: per-sample cosine, worst")
    rel_error: float | None = Field(None, description="regression: |ref - got| / |ref|")
    snr_db: float | None = Field(None, description="regression: signal to noise ratio")
    degenerate: str | None = Field(None, description="why the reference output cannot show fidelity")
    metric: dict[str, float] | None = Field(None, description="the recipe's measure.metric, by name")


class Tolerance(_Record):
    """Bounds a parity check held a model to (``compress.quality.parity.Tolerance``); null = not checked."""

    atol: float | None
    rtol: float
    min_cosine: float | None
    min_agreement: float | None


class Parity(_Record):
    """A compiled target against its input ONNX model (``compress.quality.parity.target_parity``).

    When the reference could not run (``ok`` null) only the verdict fields are present."""

    ok: bool | None = Field(description="true: within tolerance; false: breached; null: not checked")
    flagged: bool
    precision: str = Field(description="the precision whose tolerance applied: fp32, fp16, int8")
    reference: str
    inputs: str
    reason: str | None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    max_abs_ref: float | None = None
    cosine: float | None = None
    agreement: float | None = None
    kind: FidelityKind | None = None
    cosine_worst: float | None = None
    samples: int | None = None
    agreement_checked: bool | None = None
    tolerance: Tolerance | None = None
    top1_reference: float | None = None
    top1_deployed: float | None = None
    top1_simulated: float | None = None


class BatchDecode(_Record):
    """Decode speed at measure.lm_batch > 1 (same-length prompts, interleaved rounds paired with the reference)."""

    batch: int
    decode_tokens_per_s: float | None = Field(None, description="tokens/s summed over the batch, from the median "
                                              "time per decode step")
    decode_tokens_per_s_low: float | None = None
    decode_tokens_per_s_high: float | None = None
    decode_speedup: RatioCI | None = Field(None, description="decode tokens/s / the reference's at this batch "
                                           "(paired)")
    unavailable: str | None = Field(None, description="why this cell was not timed at this batch")


class Generation(_Record):
    """A causal language model's figures (``compress.measuring.measure_lm``): quality on held-out text against the
    reference cell (the original model on the reference target), and generation speed from interleaved
    rounds with paired ratios to that cell."""

    perplexity: float | None = Field(None, description="exp(mean negative log-likelihood) over held-out windows")
    perplexity_rise: float | None = Field(None, description="perplexity / the reference's - 1")
    eval_tokens: int | None = None
    kl: float | None = Field(None, description="mean per-token KL(reference || this), nats")
    top1_agreement: float | None = Field(None, description="next-token argmax agreement with the reference")
    greedy_agreement: float | None = Field(None, description="greedy tokens equal to the reference's, up to "
                                           "the first divergence, as a fraction of the generated tokens")
    greedy_prompts: int | None = Field(None, description="held-out prompts greedy agreement is averaged over")
    greedy_identical_prompts: int | None = Field(None, description="prompts whose greedy tokens all equal the "
                                                 "reference's")
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    batch: int | None = None
    rounds: int | None = None
    ttft_ms: float | None = Field(None, description="time to first token, median over rounds")
    ttft_ms_low: float | None = None
    ttft_ms_high: float | None = None
    decode_tokens_per_s: float | None = Field(None, description="tokens/s after the first, from the median "
                                              "time per token")
    decode_tokens_per_s_low: float | None = None
    decode_tokens_per_s_high: float | None = None
    ttft_ratio: RatioCI | None = Field(None, description="time to first token / the reference's (paired)")
    decode_speedup: RatioCI | None = Field(None, description="decode tokens/s / the reference's (paired)")
    draft_acceptance: float | None = Field(None, description="speculative decoding (a target's draft setting): "
                                           "drafted tokens the model accepted / drafted tokens")
    tokens_per_verifier_pass: float | None = Field(None, description="speculative decoding: tokens emitted per "
                                                   "forward pass of the model")
    batch_decode: BatchDecode | None = Field(None, description="decode speed at measure.lm_batch (> 1)")
    peak_rss_bytes: int | None = Field(None, description="peak resident memory a fresh process added by loading "
                                       "this cell and generating (128-token prompt, 32 new tokens), above the "
                                       "libraries every probe imports first")
class AccuracyGuard(_Record):
    """A variant that fell more than the bound below the original (``compress.quality.accuracy_guard``)."""

    figure: Literal["top-1", "agreement", "cosine"]
    original: float = Field(description="the original model's figure on the same target, in points (percent)")
    value: float
    drop_pt: float
    bound_pt: float = Field(description="measure.max_accuracy_drop")
    text: str = Field(description="what the table's status column shows, e.g. 'ACCURACY -43.7 pt'")


class ResultCell(_Record):
    """One (variant, target) pair and everything measured on it."""

    variant: str
    target: str
    status: Literal["ok", "unavailable", "failed", "skipped"]
    reason: str | None
    compiled_digest: str | None
    compiled_path: str | None
    target_config: dict[str, Any] = Field(description="the target's settings (each target has its own)")
    build_s: float | None
    build_cache_hit: bool
    size_bytes: int | None
    accuracy_top1: float | None
    fidelity: Fidelity | None
    parity: Parity | None
    quant_parity: Parity | None = Field(description="INT8 cells: the parity record again (deployed vs simulated)")
    latency: dict[BatchKey, BatchLatency]
    notes: list[str]
    identical_to: str | None
    ratio_to_baseline: dict[BatchKey, LatencyRatio]
    reference: bool = Field(description="a stored baseline artifact re-timed in this run (variant 'recorded')")
    device: str | None = Field(None, description="the remote device the cell was timed on (TVM RPC); null: this "
                               "machine. Its ratios and budgets use that device's clock (latency.B.device) and "
                               "are never computed against a figure from another device")
    generation: Generation | None = Field(None, description="causal language models: perplexity, agreement and "
                                          "generation speed")
    artifact_dir: str | None = Field(None, description="the compiled model's folder, relative to the run folder "
                                     "(artifacts/VARIANT/TARGET: a link into the cache, or a copy)")
    accuracy_guard: AccuracyGuard | None = Field(None, description="set when the accuracy guard marked the cell: "
                                                 "measured (status ok), but it lost more than the bound")


# -------------------------------------------------------------------------------------- variants


class StepInfo(_Record):
    """One pass of a variant's chain (``compress.core.manager.StepRecord.to_json``)."""

    index: int
    pass_: str = Field(alias="pass")
    text: str
    cache_hit: bool
    seconds: float
    digest: str
    key: str


class ModelSummary(_Record):
    """Params, MACs and sparsity as the variant's pruning passes recorded them (absent: not recorded)."""

    params: int | float | None = None
    macs: int | float | None = None
    macs_before: int | float | None = None
    params_nonzero: int | float | None = None
    weight_sparsity: float | None = None


class VariantInfo(_Record):
    torch_digest: str | None
    onnx_digest: str | None
    steps: list[StepInfo]
    passes: dict[str, dict[str, Any]] = Field(description="what each pass recorded (free-form, per pass)")
    model: ModelSummary
    facts: Facts | None = Field(None, description="what every consumer of the variant's final model must honour "
                                "(precision, quantization, sparsity, required operators, dynamic batch)")


# ---------------------------------------------------------------------------------- the run's facts


class RecipeInfo(_Record):
    name: str
    pipeline: str = Field(description="the one-line form of the passes and targets")
    toml: str = Field(description="the resolved recipe; `compress run` on it repeats the run")


class CpuInfo(_Record):
    model: str
    arch: str
    cores: int
    affinity_cores: int | None
    isa: list[str] = Field(description="this machine's ISA flags (COMPRESS_ISA applied when set); a hardware "
                           "profile's are under machine.profile, never here")
    isa_detected: list[str]
    isa_forced: bool
    isa_forced_by: str | None = Field(None, description="what forced the ISA: 'profile NAME' or the environment")


class ProfileInfo(_Record):
    """The hardware profile the run prepared the model for (compress.stages.profiles)."""

    name: str
    version: int
    source: str
    note: str
    arch: str | None = Field(None, description="the device's architecture (what the model was built for)")
    isa: list[str] | None = Field(None, description="the device's ISA flags, which the passes acted on")
    int8_scheme: str | None = None


class Machine(_Record):
    cpu: CpuInfo
    os: str
    python: str
    libraries: dict[str, str]
    gpu: str | None
    profile: ProfileInfo | None = None


class Measurement(MeasureSpec):
    """The recipe's ``measure`` table, with the thread count the run used."""

    threads: int = Field(ge=1, description="threads the latency was measured with")
    threads_setting: int = Field(ge=0, description="the recipe's measure.threads (0 = auto)")
    seq_own: int | None = Field(None, description="models with a dynamic sequence axis: the model's own length, "
                                "at which the latency keys 'B' were timed (other lengths: 'B/sS')")


class DataInfo(_Record):
    source: str
    labelled: bool
    train: int
    calib: int
    val: int
    digest: str
    note: str


class ContentionReading(_Record):
    seconds: float
    cpus: int
    threads: int
    others_cores: float = Field(description="cores other processes kept busy")
    own_cores: float
    steal_pct: float


class Contention(_Record):
    """The machine's load before and while measuring (``compress.measuring.contention``)."""

    before: ContentionReading | None = None
    during: dict[str, ContentionReading] | None = None
    unavailable: str | None = None
    cpus_online: int | None
    warnings: list[str]


class NoiseEntry(_Record):
    target: str
    batch: int
    seq: int | None = Field(None, description="the sequence length (measure.seq_lens), absent at the model's own")
    aa: RatioCI | None
    aa_kind: Literal["second session", "odd vs even rounds"]
    detectable: float | None = Field(description="smallest latency difference the run could detect (fraction)")


class Report(_Record):
    """report.json: one run of a recipe (or of ``compress compare``/``check``)."""

    model_config = ConfigDict(title="compress report", json_schema_extra={
        "$schema": "https://json-schema.org/draft/2020-12/schema"})

    schema_id: Literal["compress.report/v1"] = Field(alias="schema", description="schema name and version")
    created: str = Field(json_schema_extra={"format": "date-time"})
    recipe: RecipeInfo
    machine: Machine
    measurement: Measurement
    data: DataInfo | None
    variants: dict[str, VariantInfo] = Field(description="'baseline' first, then each compressed variant")
    results: list[ResultCell]
    notes: list[str]
    contention: Contention | None
    noise: list[NoiseEntry]
    seconds: float
    cache: str
    baseline_label: str | None = Field(None, description="what tables call the baseline (compress compare)")
    lineage: Lineage | None = Field(None, description="the run's artifacts (parent, step, settings, digest) and "
                                    "evaluations keyed by artifact digest and settings (compress.core.lineage)")

    def to_json(self) -> dict[str, Any]:
        """Exactly the dict written to report.json."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def cell(self, variant: str, target: str) -> ResultCell | None:
        return next((r for r in self.results if r.variant == variant and r.target == target), None)

    @property
    def batches(self) -> list[str]:
        """The batch sizes measured, as the keys of the latency tables."""
        return [str(b) for b in self.measurement.batch_sizes]


# ------------------------------------------------------------------------------------ read, publish


def _problem(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc}: {err['msg']}{more}"


def parse_report(data: Any, where: str = "report") -> Report:
    """Validate a report dict; a dict that is not a report, or of another schema version, is one line."""
    if not isinstance(data, dict) or "schema" not in data:
        raise InputError(f"{where}: not a compress report (no 'schema' key); report.json is written by "
                         "compress run, compare and check")
    if data["schema"] != SCHEMA:
        got = data["schema"]
        if isinstance(got, str) and got.startswith("compress.report/"):
            raise InputError(f"{where}: report schema {got!r}, but this version of compress reads {SCHEMA!r}; "
                             "rerun the recipe to get a current report")
        raise InputError(f"{where}: not a compress report (schema {got!r}, expected {SCHEMA!r})")
    try:
        return Report.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{where}: not a valid {SCHEMA} report: {_problem(e)}") from None


def load_report(path: str | Path) -> Report:
    """Read report.json (or any file in its schema) into a :class:`Report`; every failure is one line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such report file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read the report ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not a compress report: not JSON ({e.msg} at line {e.lineno})") from None
    return parse_report(data, str(p))


def _closed_key_patterns(node: Any) -> None:
    """pydantic renders a dict with a key pattern as ``patternProperties`` alone, which lets any other key
    through; pydantic itself refuses them, so the published schema does too."""
    if isinstance(node, dict):
        if "patternProperties" in node and "properties" not in node:
            node.setdefault("additionalProperties", False)
        for v in node.values():
            _closed_key_patterns(v)
    elif isinstance(node, list):
        for v in node:
            _closed_key_patterns(v)


def json_schema() -> dict[str, Any]:
    """The JSON schema of report.json, as published in docs/report.schema.json."""
    schema = Report.model_json_schema(by_alias=True)
    _closed_key_patterns(schema)
    # "$schema" first, as readers of the file expect it.
    return {"$schema": schema.pop("$schema"), **schema}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m compress.reporting.report_schema [PATH] [--check]``: write (or check) the published schema."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m compress.reporting.report_schema",
                                 description=f"Write the JSON schema of report.json ({SCHEMA}).")
    ap.add_argument("path", nargs="?", default=str(SCHEMA_FILE),
                    help=f"where to write it (default {SCHEMA_FILE}, from the repository root)")
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from the models")
    a = ap.parse_args(argv)
    p = Path(a.path)
    text = schema_text()
    if a.check:
        current = p.read_text(encoding="utf-8") if p.is_file() else None
        if current != text:
            print(f"{p} is out of date; regenerate it with python -m compress.reporting.report_schema", file=sys.stderr)
            return 1
        print(f"{p} is current ({SCHEMA})")
        return 0
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    print(f"wrote {p} ({SCHEMA})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
