"""Checks that an artifact is a usable model of its declared kind (the verify instrument)."""

from __future__ import annotations

import numpy as np
import torch

from .artifact import Artifact
from .errors import PassError
from .torch_io import load_torch, sample_inputs


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
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise PassError(f"verify: ONNX checker rejected the model: {str(e).splitlines()[0]}") from e
    elif art.kind == "compiled":
        if not any(art.path.iterdir()):
            raise PassError(f"verify: compiled artifact {art.path} is empty")
    if not np.isfinite(art.size_bytes()):
        raise PassError("verify: artifact has no size")
