"""The Target and Runner protocols (Polygraphy's lesson).

A target compiles an artifact (ONNX, or torch for the eager reference) into a
compiled artifact and hands back a runner. Heavy libraries are imported lazily
inside each target, so the package imports on a machine without them and the
target reports itself unavailable with the reason.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from compress.core.artifact import Artifact, InputSpec
from compress.core.capabilities import TargetCaps
from compress.core.config import TargetConfig
from compress.errors import InputError


class Runner(Protocol):
    input_names: list[str]

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    # Targets whose caps say device_timing: the device time of every call, in ms (kept per call).
    # device_ms: list[float]

    def close(self) -> None: ...


class Target(Protocol):
    name: str
    caps: TargetCaps  # what it consumes and runs (compress.core.capabilities)
    config: TargetConfig

    def unavailable_reason(self) -> str | None: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def compile(self, art: Artifact, ctx: Any) -> Artifact: ...

    def runner(self, compiled: Artifact, threads: int = 0) -> Runner: ...


class GeneratingTarget(Target, Protocol):
    """A target whose ``caps.generates`` is true: it runs a decoder language model's generate loop."""

    def lm_runner(self, art: Artifact, threads: int) -> Any: ...  # compress.measuring.generation.LMRunner


def module_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def static_feeds(inputs: tuple[InputSpec, ...], feeds: dict[str, np.ndarray], who: str) -> list[np.ndarray]:
    """The feeds of a build compiled for fixed shapes, in input order and dtype; a missing input or another
    shape is refused in one line (``who`` names the runner)."""
    out = []
    for spec in inputs:
        if spec.name not in feeds:
            raise InputError(f"{who}: missing input '{spec.name}' (expects {[s.name for s in inputs]})")
        x = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
        if tuple(x.shape) != tuple(spec.shape):
            raise InputError(f"{who}: input '{spec.name}' has shape {tuple(x.shape)}, but the library was compiled "
                             f"for {tuple(spec.shape)} (TVM builds static shapes); recompile for it")
        out.append(x)
    return out

