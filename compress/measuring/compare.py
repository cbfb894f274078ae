"""How two measured cells compare: the one home of that decision.

Which clock a cell's latency is read on (a remote device's own, else the host's), whether two cells were
timed on the same device (a ratio across devices is refused), whether they are the same build (identity by
compiled digest: an identical build is labelled, never raced against itself), and the paired ratio with its
interval (a block bootstrap over the rounds both ran, widened by the between-session A/A offset). Stage 3
(``compress.measuring.measurement``), the report, the budget gate, the search and the views ask here and decide none
of this themselves, so a fix to any of it lands once (``tests/test_architecture.py`` keeps it so).

Cells are named by :class:`CellRef`, never by ``"variant/target"`` strings built in one place and parsed back
in another; the report keeps the string form (``str(ref)``) where its schema has it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..reporting.report_schema import (
    BatchLatency,
    DeviceLatency,
    IdenticalRatio,
    LatencyRatio,
    MeasuredRatio,
    NoRatio,
    RatioCI,
)
from .stats import bootstrap_stat, describe_ratio, ratio_ci, ratio_verdict, split_half_aa, widen


@dataclass(frozen=True, order=True)
class CellRef:
    """One (variant, target) cell of a run."""

    variant: str
    target: str

    def __str__(self) -> str:  # the report's spelling (ResultCell.identical_to, timing candidates)
        return f"{self.variant}/{self.target}"

    @classmethod
    def of(cls, cell: Any) -> CellRef:
        """The reference of anything with ``variant`` and ``target`` (a stage-3 cell, a report's cell)."""
        return cls(str(cell.variant), str(cell.target))

    @classmethod
    def parse(cls, text: str) -> CellRef:
        """The reference a report spells ``"variant/target"`` (a target name holds no slash)."""
        variant, sep, target = text.rpartition("/")
        if not sep or not variant or not target:
            raise ValueError(f"not a cell reference 'variant/target': {text!r}")
        return cls(variant, target)


class Timed(Protocol):
    """What a comparison reads of a cell: a stage-3 ``Cell`` and a report's ``ResultCell`` both have it."""

    variant: str
    target: str
    device: str | None  # the remote device it was timed on; None: this machine

    @property
    def latency(self) -> Mapping[str, BatchLatency]: ...

    @property
    def compiled_digest(self) -> str | None: ...


@dataclass(frozen=True)
class Clock:
    """A cell's latency at one shape, on the clock its figures are judged on."""

    stats: BatchLatency | DeviceLatency  # p50_ms, p90_ms, ... of that clock
    samples: list[float]  # one per timed round, in round order (empty: this clock kept none)
    aa_session: RatioCI | None  # the baseline's second session on that clock, where it was timed
    device: str | None  # the remote device whose own clock this is; None: the host's

    def figure(self, name: str) -> float | None:
        """A statistic of this clock by its schema name (``p50_ms``, ``cv``, ``throughput`` ...)."""
        v = getattr(self.stats, name, None)
        return float(v) if v is not None else None


def clock(cell: Timed, at: str) -> Clock | None:
    """The cell's latency at ``at`` on its clock: a remote device's own (its host figures include the network
    round trip), else the host's; None when the cell was not timed at ``at``."""
    lat = cell.latency.get(at)
    if lat is None:
        return None
    dev = lat.device
    if cell.device is not None and dev is not None:
        return Clock(dev, list(dev.samples_ms or []), dev.aa_session, cell.device)
    return Clock(lat, list(lat.samples_ms), lat.aa_session, None)


def same_build(a: Timed, b: Timed) -> bool:
    """Byte-identical compiled models (same digest): racing them only measures noise and order."""
    return a is b or (a.compiled_digest is not None and a.compiled_digest == b.compiled_digest)


def same_device(a: Timed, b: Timed) -> bool:
    """Timed on the same device (both on this machine, or both on one remote device)."""
    return a.device == b.device


def two_devices(a: Timed, b: Timed, what: str = "the baseline") -> str:
    """Why a ratio of cells from two devices is refused, in one line."""
    return (f"no ratio: timed on {a.device or 'this machine'}, {what} on {b.device or 'this machine'}; figures "
            "from two devices are not a same-run comparison")


IDENTICAL_TEXT = describe_ratio(None, identical=True)
_REFERENCE = object()  # widen_by's default: the reference cell's own A/A session


def compare(a: Timed, b: Timed, at: str, metric: str = "p50", confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0, widen_by: Any = _REFERENCE, what: str = "the baseline") -> LatencyRatio:
    """``metric`` of ``a``'s latency over ``b``'s at ``at``, paired over the rounds both ran, as the report
    types it: refused (``NoRatio`` "not comparable") for cells of two devices or a remote cell without its
    device's figures; ``IdenticalRatio`` for the same build; else ``MeasuredRatio`` with its interval widened
    by the between-session A/A offset of ``widen_by`` (a cell; default ``b``; None: not widened)."""
    if not same_device(a, b):
        return NoRatio(verdict="not comparable", text=two_devices(a, b, what))
    if same_build(a, b):
        return IdenticalRatio(ratio=1.0, low=1.0, high=1.0, identical=True, verdict="identical", text=IDENTICAL_TEXT)
    ca, cb = clock(a, at), clock(b, at)
    if ca is None or cb is None:
        return NoRatio(verdict="not enough rounds", text=f"no ratio: not both timed at {at}")
    if a.device is not None and (ca.device is None or cb.device is None or not ca.samples or not cb.samples):
        return NoRatio(verdict="not comparable", text=f"no ratio: no figures from {a.device}'s own clock")
    noise = cb if widen_by is _REFERENCE else (clock(widen_by, at) if widen_by is not None else None)
    aa = noise.aa_session.model_dump() if noise is not None and noise.aa_session is not None else None
    try:
        r = widen(ratio_ci(ca.samples, cb.samples, metric, confidence, resamples, seed=seed), aa, confidence)
    except ValueError as e:
        return NoRatio(verdict="not enough rounds", text=f"no ratio: {e}")
    return MeasuredRatio(**r.to_json(), identical=False, verdict=ratio_verdict(r),  # type: ignore[arg-type]
                         text=describe_ratio(r) + (" (device clock)" if a.device is not None else ""))


def statistic(cell: Timed, at: str, metric: str, confidence: float = 0.95,
              resamples: int = 2000) -> tuple[float, float, float]:
    """(value, low, high) of ``metric`` of the cell's latency at ``at`` on its clock, bootstrapped."""
    ck = clock(cell, at)
    if ck is None or not ck.samples:
        raise ValueError(f"{CellRef.of(cell)} has no latency samples at {at}")
    return bootstrap_stat(ck.samples, metric, confidence, resamples)


def to_numbers(cell: Timed, at: str, recorded: Mapping[str, Any], metric: str, confidence: float = 0.95,
               resamples: int = 2000) -> RatioCI | NoRatio:
    """The cell's latency over numbers recorded in another run (``recorded["samples_ms"]``, timed on
    ``recorded["device"]``, absent: this machine), unpaired: the weaker comparison, when the recorded build is
    gone. Numbers from another device are refused, as a cell from one is."""
    if recorded.get("device") != cell.device:
        return NoRatio(verdict="not comparable", text=(
            f"no ratio: timed on {cell.device or 'this machine'}, the recorded numbers on "
            f"{recorded.get('device') or 'this machine'}; figures from two devices are not comparable"))
    ck = clock(cell, at)
    if ck is None:
        raise ValueError(f"{CellRef.of(cell)} was not timed at {at}")
    return RatioCI(**ratio_ci(ck.samples, list(recorded["samples_ms"]), metric, confidence, resamples,
                              paired=False).to_json())


def sample_ratio(num: list[float], den: list[float], metric: str = "p50", seed: int = 0) -> RatioCI:
    """``metric`` of ``num`` over ``den``, two series timed in the same rounds (a baseline's second session
    against its first, a generation figure against the reference's), paired over the rounds both ran."""
    return RatioCI(**ratio_ci(num, den, metric, seed=seed).to_json())


def host_noise_floor(cell: Timed, at: str, seed: int = 0) -> RatioCI | None:
    """The split-half A/A on the host's clock (kept beside a remote cell's device-clock one)."""
    lat = cell.latency.get(at)
    aa = split_half_aa(lat.samples_ms, seed=seed) if lat is not None else None
    return RatioCI(**aa.to_json()) if aa is not None else None


def device_noise_floor(cell: Timed, at: str, seed: int = 0) -> RatioCI | None:
    """The split-half A/A on the device's clock where the cell kept per-round device samples."""
    lat = cell.latency.get(at)
    dev = lat.device if lat is not None else None
    aa = split_half_aa(dev.samples_ms, seed=seed) if dev is not None and dev.samples_ms else None
    return RatioCI(**aa.to_json()) if aa is not None else None


def shown_samples(cell: Timed, at: str) -> list[float]:
    """The per-round times a plot of the cell shows: its clock's, else (a remote cell that kept no per-round
    device times) its host's."""
    ck = clock(cell, at)
    if ck is None:
        return []
    return ck.samples or list(cell.latency[at].samples_ms)
