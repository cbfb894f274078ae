"""Accuracy on held-out data and fidelity to the uncompressed model."""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import DataBundle, Split


def predict(runner: Any, data: DataBundle, split: Split, batch_size: int) -> np.ndarray:
    """Logits of ``runner`` over a split, batched (``batch_size`` 1 for static-batch models)."""
    name = runner.input_names[0]
    outs = []
    for x, _ in data.batches(split, batch_size):
        outs.append(np.asarray(runner.infer({name: x.numpy()})[0], dtype=np.float32))
    return np.concatenate(outs)


def predict_arrays(runner: Any, xs: np.ndarray, batch_size: int) -> np.ndarray:
    name = runner.input_names[0]
    outs = [np.asarray(runner.infer({name: xs[i:i + batch_size]})[0], dtype=np.float32)
            for i in range(0, len(xs), batch_size)]
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Agreement of top-1 predictions, max/mean abs diff and cosine of the logits."""
    a, b = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(a - b)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return {
        "agreement": float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
        "max_abs_diff": float(diff.max(initial=0.0)),
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "cosine": float((a.ravel() @ b.ravel()) / denom) if denom > 0 else float(np.array_equal(a, b)),
    }
