"""Fidelity that fits the output: how close a compressed model's output is to the original's.

Argmax agreement only means something for class logits. An embedding or hidden
state is compared by cosine similarity per sample (mean and worst), a regression
output by relative error and SNR. The kind is declared by the user or inferred
from the output's name and shape. A reference output that is constant (the same
for every input) or all zero makes every comparison pass vacuously, so it is
flagged instead of reported as perfect fidelity.

A user metric (``pkg.module:fn``) is called as ``fn(ref, got, labels)`` with the
reference and compressed outputs (numpy, first output) and the labels or None;
it returns a float (higher is better) or a dict of named floats.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from ..errors import InputError, RecipeError

# Inputs fidelity is measured on when a run has no data (seeded synthetic values, compress.measuring.measurement).
SYNTHETIC_SAMPLES = 64

OutputKind = Literal["logits", "embedding", "regression"]
KINDS: tuple[str, ...] = ("logits", "embedding", "regression")

# Name fragments of outputs that are not class scores (Hugging Face and sentence-transformers names).
_EMBED_HINTS = ("hidden", "embed", "pool", "feature", "sentence", "token_emb", "last_hidden")
_LOGIT_HINTS = ("logit", "class", "prob", "score")
_REGRESS_HINTS = ("regress", "pred_value", "depth", "box")


def infer_kind(ref: np.ndarray, name: str | None = None, declared: str = "auto") -> tuple[str, str]:
    """(kind, why) for one output: declared by the user, else from its name, else from its shape."""
    if declared != "auto":
        if declared not in KINDS:
            raise RecipeError(f"output kind {declared!r} not understood; use auto, {', '.join(KINDS)}")
        return declared, "declared in the recipe (measure.output_kind)"
    low = (name or "").lower()
    if any(h in low for h in _EMBED_HINTS):
        return "embedding", f"output named {name!r}"
    if any(h in low for h in _LOGIT_HINTS):
        return "logits", f"output named {name!r}"
    if any(h in low for h in _REGRESS_HINTS):
        return "regression", f"output named {name!r}"
    if ref.ndim >= 3:
        # (batch, tokens, features) or a feature map: not one class score vector per sample.
        return "embedding", f"output of shape {tuple(ref.shape[1:])} per sample (hidden states / feature map)"
    if ref.ndim <= 1 or ref.shape[1] == 1:
        return "regression", "one value per sample"
    return "logits", "one score vector per sample (set measure.output_kind = \"embedding\" if it is not)"


def degenerate(ref: np.ndarray) -> str | None:
    """Why a reference output cannot show fidelity (all zero / non-finite / the same for every input), or None."""
    a = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1) if np.ndim(ref) else np.zeros((1, 1))
    if a.size == 0:
        return "empty output"
    if not np.isfinite(a).all():
        return "the original model's output holds NaN or Inf"
    scale = float(np.abs(a).max())
    if scale == 0.0:
        return "the original model's output is all zero (e.g. random weights); fidelity would pass vacuously"
    if len(a) > 1 and float(np.ptp(a, axis=0).max()) <= 1e-6 * scale:
        return ("the original model's output is the same for every input (constant); fidelity would pass "
                "vacuously; train or load real weights, or give real data")
    return None


def _per_sample_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per sample; for (batch, tokens, features) per token, then averaged over the tokens."""
    if a.ndim >= 3:
        a2 = a.reshape(a.shape[0], -1, a.shape[-1])
        b2 = b.reshape(b.shape[0], -1, b.shape[-1])
        num = (a2 * b2).sum(-1)
        den = np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1)
        cos = np.where(den > 0, num / np.where(den > 0, den, 1), (np.abs(a2 - b2).max(-1) == 0).astype(np.float64))
        return np.asarray(cos.mean(1))
    f2, g2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    num2 = (f2 * g2).sum(1)
    den2 = np.linalg.norm(f2, axis=1) * np.linalg.norm(g2, axis=1)
    return np.asarray(np.where(den2 > 0, num2 / np.where(den2 > 0, den2, 1),
                               (np.abs(f2 - g2).max(1) == 0).astype(np.float64)))


def compare_outputs(ref: np.ndarray, got: np.ndarray, kind: str = "logits", top_k: int = 5) -> dict[str, Any]:
    """The comparison that fits ``kind``, plus the shared figures (global cosine, abs diffs).

    ``headline`` names the figure a report shows for this output: ``agreement`` for
    logits, ``cosine_mean`` for embeddings, ``snr_db`` for regression.
    """
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"fidelity: outputs of shapes {a.shape} and {b.shape} cannot be compared")
    diff = np.abs(a - b)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    out: dict[str, Any] = {
        "kind": kind,
        "cosine": float((a.ravel() @ b.ravel()) / denom) if denom > 0 else float(np.array_equal(a, b)),
        "max_abs_diff": float(diff.max(initial=0.0)),
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
    }
    if kind == "logits" and a.ndim >= 2:
        fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
        out["agreement"] = float((fa.argmax(1) == fb.argmax(1)).mean())
        k = min(top_k, fa.shape[1])
        if k > 1:
            ta = np.argsort(-fa, axis=1)[:, :k]
            tb = np.argsort(-fb, axis=1)[:, :k]
            out[f"top{k}_overlap"] = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]))
        out["headline"] = "agreement"
    elif kind == "embedding":
        cos = _per_sample_cosine(a, b) if len(a) else np.ones(1)
        out["cosine_mean"] = float(cos.mean())
        out["cosine_worst"] = float(cos.min())
        out["headline"] = "cosine_mean"
    else:
        err = float(np.linalg.norm(a - b))
        sig = float(np.linalg.norm(a))
        out["rel_error"] = err / sig if sig > 0 else (0.0 if err == 0 else float("inf"))
        out["snr_db"] = float(20 * np.log10(sig / err)) if err > 0 and sig > 0 else (
            float("inf") if err == 0 else float("-inf"))
        out["headline"] = "snr_db"
    why = degenerate(a)
    if why is not None:
        out["degenerate"] = why
    return out


def headline(fid: dict[str, Any] | None) -> str:
    """The one figure a results table shows for a fidelity record."""
    if not fid:
        return "-"
    key = fid.get("headline", "agreement")
    if key not in fid:
        key = "agreement" if "agreement" in fid else "cosine"
    v = fid.get(key)
    if v is None:
        return "-"
    if key == "agreement":
        s = f"agree {100 * v:.1f}%"
    elif key == "cosine_mean":
        s = f"cos {v:.4f} (worst {fid.get('cosine_worst', v):.4f})"
    elif key == "snr_db":
        s = f"SNR {v:.1f} dB"
    else:
        s = f"{key} {v:.4g}"
    if "metric" in fid and isinstance(fid["metric"], dict):
        s += "; " + ", ".join(f"{k} {val:.4g}" for k, val in fid["metric"].items())
    if fid.get("degenerate"):
        s += " (DEGENERATE)"
    return s


def load_metric(spec: str) -> Callable[..., Any]:
    """Resolve a user metric ``pkg.module:fn``; refuse anything else with one clear line."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise RecipeError(f"metric {spec!r}: expected package.module:function, e.g. mytask.metrics:recall_at_5")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RecipeError(f"metric {spec!r}: cannot import {mod_name!r} ({e}); is the package on PYTHONPATH?") from e
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise RecipeError(f"metric {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn  # type: ignore[no-any-return]


def run_metric(fn: Callable[..., Any], spec: str, ref: np.ndarray, got: np.ndarray,
               labels: np.ndarray | None) -> dict[str, float]:
    """Call a user metric; its result as ``{name: value}``; a bad return type is one clear error."""
    try:
        val = fn(ref, got, labels)
    except Exception as e:  # the user's code: report where it failed, not a traceback
        raise InputError(f"metric {spec!r} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from e
    name = spec.partition(":")[2]
    if isinstance(val, (int, float, np.floating, np.integer)) and not isinstance(val, bool):
        return {name: float(val)}
    if isinstance(val, dict) and all(isinstance(v, (int, float, np.floating, np.integer)) for v in val.values()):
        return {str(k): float(v) for k, v in val.items()}
    raise InputError(f"metric {spec!r} returned {type(val).__name__}; return a float or a dict of floats")
