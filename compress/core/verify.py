"""Checks that an artifact is a usable model of its declared kind (the verify instrument)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import PassError
from ..inputs.torch_io import load_torch, sample_inputs
from .artifact import Artifact


def verify_artifact(art: Artifact) -> None:
    if art.kind == "pytorch":
        module = load_torch(art)
        with torch.inference_mode():
            out = module(*sample_inputs(art.inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if not torch.isfinite(o.float()).all():
                raise PassError("verify: the model's output holds NaN or Inf on a sample input")
    elif art.kind == "onnx":
        import onnx

        path = art.path / "model.onnx"
        if not path.exists():
            raise PassError(f"verify: {path} is missing")
        if art.known_facts().decoder is not None:
            _verify_decoder(art)
            return
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise PassError(f"verify: ONNX checker rejected the model: {str(e).splitlines()[0]}") from e
    elif art.kind == "compiled":
        if not any(art.path.iterdir()):
            raise PassError(f"verify: compiled artifact {art.path} is empty")
    if not np.isfinite(art.size_bytes()):
        raise PassError("verify: artifact has no size")


def _verify_decoder(art: Artifact) -> None:
    """A decoder with its KV cache uses ONNX Runtime's fused operators (some registered in the default domain,
    which onnx.checker does not know), so it is verified by what its consumers do: ONNX Runtime loads it
    and one prefill over a few tokens gives finite logits."""
    from ..measuring.generation import OrtLMRunner

    try:
        runner = OrtLMRunner(art.path, 1)
        logits = runner.logits(np.arange(4, dtype=np.int64) % max(art.known_facts().decoder.vocab, 1))  # type: ignore[union-attr]
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise PassError(f"verify: ONNX Runtime cannot run the decoder: {str(e).splitlines()[0][:300]}") from e
    if not np.isfinite(logits).all():
        raise PassError("verify: the decoder's logits hold NaN or Inf on a sample input")
