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

Fidelity budgets bound a figure of the cell's fidelity to the original model (compress.quality.fidelity):
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

The gate's parts, one job each: the budgets file (``compress.apps.budget_spec``), the recorded baselines
(``compress.apps.baseline_store``), one budget's verdict (``compress.apps.budget_verdict``) and the check that
measures and decides them all (``compress.apps.budget_check``). This module is their public face.
"""

from __future__ import annotations

from .baseline_store import BaselineStore, fingerprint_key
from .budget_check import CheckResult, assert_budgets, check
from .budget_spec import (
    EXIT_FAIL,
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_SKIPPED,
    EXIT_USAGE,
    FIDELITY_FIGURES,
    GENERATION,
    LATENCY,
    METRICS,
    BudgetsFile,
    BudgetSpec,
    FidelityBound,
    Limit,
    check_fidelity_budgets,
    load_budgets,
    parse_fidelity,
    parse_limit,
)
from .budget_verdict import Verdict, evaluate_budget, junit_xml, overall_exit

__all__ = [
    "EXIT_FAIL", "EXIT_INCONCLUSIVE", "EXIT_PASS", "EXIT_SKIPPED", "EXIT_USAGE", "FIDELITY_FIGURES", "GENERATION",
    "LATENCY", "METRICS", "BaselineStore", "BudgetSpec", "BudgetsFile", "CheckResult", "FidelityBound", "Limit",
    "Verdict", "assert_budgets", "check", "check_fidelity_budgets", "evaluate_budget", "fingerprint_key",
    "junit_xml", "load_budgets", "overall_exit", "parse_fidelity", "parse_limit",
]
