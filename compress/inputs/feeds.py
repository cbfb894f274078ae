"""Synthetic model inputs at a shape: what stage 3 times and (without data) scores on."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..core.artifact import Artifact


def own_seq(root: Artifact) -> int | None:
    """The model's own length along its dynamic (non-batch) axes, or None when it has none."""
    return next((s.shape[ax] for s in root.inputs for ax, _ in s.dynamic_axes if 0 < ax < len(s.shape)), None)


def synthetic_feeds(root: Artifact, batch: int, seed: int, seq: int | None = None) -> dict[str, np.ndarray]:
    """Synthetic inputs at ``batch`` (and sequence length ``seq`` along the dynamic axes, if given)."""
    g = np.random.default_rng(seed)
    feeds = {}
    for s in root.inputs:
        shape = (batch, *s.shape[1:])
        if seq is not None and s.dynamic_axes:
            shape = tuple(seq if i in dict(s.dynamic_axes) else n for i, n in enumerate(shape))
            s = dataclasses.replace(s, shape=shape)
        if np.issubdtype(np.dtype(s.dtype), np.floating):
            feeds[s.name] = g.standard_normal(shape).astype(s.dtype)
        else:  # token ids within the vocabulary, masks of ones (see torch_io.sample_inputs)
            from .torch_io import sample_inputs

            feeds[s.name] = sample_inputs((s,), batch=batch, seed=seed)[0].numpy()
    return feeds
