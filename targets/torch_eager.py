"""The eager PyTorch reference target."""

from __future__ import annotations

import shutil
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from compress.core.artifact import PYTORCH, Artifact
from compress.core.capabilities import TargetCaps
from compress.core.config import TargetConfig
from compress.core.fingerprint import cpu_info
from compress.core.registry import register_target
from compress.inputs.torch_io import load_torch, set_eval

from .base import TargetBase, module_version


class TorchConfig(TargetConfig):
    """Eager PyTorch on the CPU: the reference every other target is compared with."""

    kind: Literal["torch"] = "torch"
    threads: int = Field(0, ge=0, description="0 = the measurement setting")


class TorchRunner:
    def __init__(self, module: torch.nn.Module, input_names: list[str], threads: int) -> None:
        self.module = set_eval(module)
        self.input_names = input_names
        self.threads = threads

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    def close(self) -> None:
        pass


@register_target(TorchConfig)
class TorchTarget(TargetBase):
    name = "torch"
    # The eager model is the reference: any batch, measured by default, nothing to check it against.
    caps = TargetCaps(consumes=PYTORCH, reference=True, any_batch=True, default=True, generates=True,
                      requires=("torch",), install="pip install torch")

    def __init__(self, config: TorchConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        return None

    def fingerprint(self) -> dict[str, Any]:
        return {"torch": module_version("torch"), "cpu": cpu_info()["model"], "isa": cpu_info()["isa"]}

    def compile(self, art: Artifact, ctx: Any) -> Artifact:
        out = ctx.new_dir("torch")
        for name in ("source.json", "model.pt"):
            shutil.copy2(art.path / name, out / name)
        return Artifact("compiled", out, art.digest, art.inputs, metadata={"target": "torch", "format": "torch"})

    def lm_runner(self, compiled: Artifact, threads: int) -> Any:
        """Greedy generation with the model's own KV cache (the reference for decoder language models)."""
        from compress.measuring.generation import TorchLMRunner

        tmp = Artifact(PYTORCH, compiled.path, compiled.digest, compiled.inputs)
        return TorchLMRunner(load_torch(tmp), self.config.threads or threads, name=self.name)

    def runner(self, compiled: Artifact, threads: int = 0) -> TorchRunner:
        tmp = Artifact(PYTORCH, compiled.path, compiled.digest, compiled.inputs)
        return TorchRunner(load_torch(tmp), [s.name for s in compiled.inputs], self.config.threads or threads)
