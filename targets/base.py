"""The Target and Runner protocols (Polygraphy's lesson).

A target compiles an artifact (ONNX, or torch for the eager reference) into a
compiled artifact and hands back a runner. Heavy libraries are imported lazily
inside each target, so the package imports on a machine without them and the
target reports itself unavailable with the reason.
"""

from __future__ import annotations

import numpy as np

from compress.core.artifact import InputSpec
from compress.core.protocols import DeviceClockRunner, DeviceRunner, GeneratingTarget, Runner, Target, TargetBase
from compress.errors import InputError

# The protocols are the core's (compress.core.protocols): what it asks of a target and its runners, declared.
__all__ = ["DeviceClockRunner", "DeviceRunner", "GeneratingTarget", "Runner", "Target", "TargetBase", "module_version",
           "static_feeds"]


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

