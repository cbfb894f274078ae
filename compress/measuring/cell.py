"""A cell of stage 3: one (variant, target) pair and what was measured on it, in the report's own types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.artifact import ONNX, Artifact
from ..core.capabilities import TargetCaps
from ..reporting.report_schema import BatchLatency, LatencyRatio
from .compare import CellRef


@dataclass
class Cell:
    """One (variant, target) pair and everything measured on it."""

    variant: str
    target: str
    status: str = "ok"  # ok | unavailable | failed | skipped (nothing new to measure)
    reason: str | None = None
    compiled: Artifact | None = None
    build_s: float | None = None
    cache_hit: bool = False
    latency: dict[str, BatchLatency] = field(default_factory=dict)  # latency key ("B", "B/sS") -> figures
    accuracy: float | None = None
    fidelity: dict[str, Any] | None = None
    size_bytes: int | None = None
    parity: dict[str, Any] | None = None  # compiled model vs its input model (for Q/DQ: vs the simulated model)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    identical_to: CellRef | None = None  # the cell whose compiled artifact has the same digest (timed once)
    ratios: dict[str, LatencyRatio] = field(default_factory=dict)  # latency key -> ratio to the baseline
    reference: bool = False  # a stored baseline artifact, timed only (no accuracy)
    caps: TargetCaps = field(default_factory=lambda: TargetCaps(consumes=ONNX))  # what the target declares
    # The remote device the cell ran on (a TVM RPC device, named by its runner); None: this machine. Its latency
    # is judged on the device's own clock and never divided by a figure from another device (measuring.compare).
    device: str | None = None
    # A causal LM's figures (compress.measuring.measure_lm): perplexity, KL, agreement, time to first token, decode
    # tokens/s and their paired ratios to the reference cell. None for any other model.
    generation: dict[str, Any] | None = None
    guard: dict[str, Any] | None = None  # the accuracy guard's breach (quality.accuracy_guard), None: within
    artifact_dir: str | None = None  # the compiled model's folder in the run folder (compress.reporting.run_artifacts)

    @property
    def ref(self) -> CellRef:
        return CellRef(self.variant, self.target)

    @property
    def compiled_digest(self) -> str | None:
        return self.compiled.digest if self.compiled is not None else None


@dataclass
class Live:
    """The processes behind stage 3's cells while it measures, kept apart from the cells (which are data): each
    built cell's runner, and for a baseline the maker of a second runner of its build (the A/A session)."""

    runners: dict[CellRef, Any] = field(default_factory=dict)
    spawns: dict[CellRef, Any] = field(default_factory=dict)

    def __getitem__(self, cell: Cell) -> Any:
        return self.runners[cell.ref]

    def close(self, cell: Cell) -> None:
        runner = self.runners.pop(cell.ref, None)
        if runner is not None:
            runner.close()

    def close_all(self) -> None:
        for ref in list(self.runners):
            self.runners.pop(ref).close()
        self.spawns.clear()
