"""What the core asks of a target and of its runners, declared (Polygraphy's runner contract): the core calls
these members and nothing else; a ``getattr`` probe for an undeclared one would be a second, hidden contract.

``TargetBase`` and ``DeviceClockRunner`` carry the defaults of the optional members. The built-in targets
derive from them; a plugin's target class that does not gets ``TargetBase``'s defaults at registration
(``compress.core.registry.register_target``), so every registered target answers the whole protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .artifact import Artifact
from .capabilities import TargetCaps
from .config import TargetConfig


class Runner(Protocol):
    input_names: list[str]

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


class DeviceRunner(Runner, Protocol):
    """The runner of a target whose ``caps.device_timing`` is true: it keeps the device's own time per call."""

    device_ms: list[float]  # ms on the device's clock, one per call (the measurement clears it per shape)
    device_name: str  # the device the times came from, for the report
    remote: bool  # a remote device (TVM RPC): its host wall times include the network round trip
    device_notes: Sequence[str]  # what the report says about that device (versions checked, ...)


class Target(Protocol):
    name: str
    caps: TargetCaps  # what it consumes and runs (compress.core.capabilities)
    config: TargetConfig

    def unavailable_reason(self) -> str | None: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def compile(self, art: Artifact, ctx: Any) -> Artifact: ...

    def runner(self, compiled: Artifact, threads: int = 0) -> Runner: ...

    def check_config(self) -> None:
        """Refuse settings the target's library would reject only at build time (the plan asks, before any
        pass runs)."""

    def parity_precision(self, art: Artifact, precision: str) -> str:
        """The precision class a build of ``art`` (of ``precision``) is judged at by the parity check: coarser
        where the target runs coarser kernels (TensorRT building FP32 with TF32 or FP16 kernels)."""

    def parity_batch(self) -> int:
        """The largest batch the parity check feeds a build that takes any batch."""


class GeneratingTarget(Target, Protocol):
    """A target whose ``caps.generates`` is true: it runs a decoder language model's generate loop."""

    def lm_runner(self, art: Artifact, threads: int) -> Any: ...  # compress.measuring.generation.LMRunner


PARITY_BATCH = 16


class TargetBase:
    """The defaults of a target's optional members (see ``Target``)."""

    def check_config(self) -> None:
        return None

    def parity_precision(self, art: Artifact, precision: str) -> str:
        return precision

    def parity_batch(self) -> int:
        return PARITY_BATCH


OPTIONAL_TARGET_MEMBERS = ("check_config", "parity_precision", "parity_batch")


class DeviceClockRunner:
    """The defaults of a device-timing runner's members (see ``DeviceRunner``): a GPU of this machine timed with
    CUDA events. ``device_ms`` is the runner's own list."""

    device_name: str = "this machine's GPU (CUDA events)"
    remote: bool = False
    device_notes: Sequence[str] = ()
