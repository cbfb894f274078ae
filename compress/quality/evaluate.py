"""Accuracy on held-out data and fidelity to the uncompressed model."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..inputs.data import DataBundle, Split


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


def predict_feeds(runner: Any, feeds: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """First output of ``runner`` over several named inputs (matched to the runner's inputs by position)."""
    arrays = list(feeds.values())
    n = len(arrays[0])
    outs = []
    for i in range(0, n, batch_size):
        chunk = {name: a[i:i + batch_size] for name, a in zip(runner.input_names, arrays, strict=False)}
        outs.append(np.asarray(runner.infer(chunk)[0], dtype=np.float32))
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def fidelity(ref: np.ndarray, got: np.ndarray, kind: str = "logits") -> dict[str, Any]:
    """Fidelity of ``got`` to ``ref`` by the comparison that fits the output ``kind`` (see compress.quality.fidelity).

    Logits keep their agreement of top-1 predictions; every kind has max/mean abs diff and cosine.
    """
    from .fidelity import compare_outputs

    return compare_outputs(ref, got, kind)
