"""Shared fixtures: small models and a private cache per test."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

from compress.core.cache import Cache
from compress.core.capabilities import TargetCaps
from compress.core.config import PassConfig, TargetConfig
from compress.core.manager import PassContext
from compress.core.protocols import DeviceClockRunner
from compress.core.registry import register_pass, register_target
from compress.inputs.torch_io import clone_module, torch_artifact

# The repository root on the path: tests and recipes name test factories as ``tests.user_models:...``,
# whichever test file pytest happens to collect first.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# One intra-op thread: the suite's models are tiny, and on a shared 2-core runner torch's
# thread pool spends more time spinning against other processes than computing.
torch.set_num_threads(1)


class ScaleWeights(PassConfig):
    """Test-only pass: multiplies every weight by a factor (a torch -> torch pass with no library)."""

    kind: Literal["test.scale"] = "test.scale"
    factor: float = 1.0
    fail: bool = False


@register_pass(ScaleWeights, consumes="pytorch", produces="pytorch")
def _scale(art, cfg: ScaleWeights, ctx):  # type: ignore[no-untyped-def]
    if cfg.fail:
        raise RuntimeError("boom on purpose")
    m = clone_module(art)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(cfg.factor)
    return torch_artifact(m, art, ctx, metadata={"test.scale": {"factor": cfg.factor, "notes": ["scaled"]}})


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


@pytest.fixture
def ctx(cache: Cache) -> PassContext:
    return PassContext(cache=cache, progress=False)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


FAST_MEASURE = {"batch_sizes": [1], "warmup": 1, "min_runs": 3, "min_time_s": 0.0, "max_time_s": 5.0}


class MissingConfig(TargetConfig):
    """Test-only target that is never installed."""

    kind: Literal["test.missing"] = "test.missing"


@register_target(MissingConfig)
class MissingTarget:
    name = "test.missing"
    caps = TargetCaps(consumes="onnx")

    def __init__(self, config: MissingConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        return "test.missing is not installed (pip install nothing-real)"

    def fingerprint(self) -> dict:
        return {}


class DeviceClockConfig(TargetConfig):
    """Test-only target: ONNX Runtime, plus a fake device clock like TensorRT's CUDA-event timings."""

    kind: Literal["test.devclock"] = "test.devclock"


@register_target(DeviceClockConfig)
class DeviceClockTarget:
    name = "test.devclock"
    caps = TargetCaps(consumes="onnx", device_timing=True)
    DEVICE_MS = 0.25  # every call "takes" this long on the device

    def __init__(self, config: DeviceClockConfig) -> None:
        from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget

        self.config = config
        self._ort = OnnxRuntimeTarget(OnnxRuntimeConfig())

    def unavailable_reason(self) -> str | None:
        return None

    def fingerprint(self) -> dict:
        return {}

    def compile(self, art, ctx):  # type: ignore[no-untyped-def]
        return self._ort.compile(art, ctx)

    def runner(self, compiled, threads: int = 0):  # type: ignore[no-untyped-def]
        inner = self._ort.runner(compiled, threads)

        class Clocked(DeviceClockRunner):
            def __init__(self) -> None:
                self.input_names = inner.input_names
                self.device_ms: list[float] = []

            def infer(self, feeds):  # type: ignore[no-untyped-def]
                self.device_ms.append(DeviceClockTarget.DEVICE_MS)
                return inner.infer(feeds)

            def close(self) -> None:
                inner.close()

        return Clocked()


# The two x86 INT8 branches of PLATFORM.md, forced through COMPRESS_ISA so that a test depending on
# the host's ISA runs both on any CPU (the suite once passed on a VNNI Xeon and failed on a Zen 3).
ISA_CHOICES = {"novnni": "avx,avx2,f16c,fma", "vnni": "avx,avx2,avx512_vnni,avx512f,f16c,fma"}
SCHEME_FOR_ISA = {"novnni": "u8s8_reduce_range", "vnni": "u8s8"}

# Every other test sees the same CPU on every x86 machine: the AVX2-only one, whose scheme (7-bit
# weights) is exact on both kinds of hardware. Tests that are about the ISA force each choice
# (``forced_isa``); the detection itself is tested with the variables removed.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ["COMPRESS_ISA"] = ISA_CHOICES["novnni"]
    os.environ["COMPRESS_ARCH"] = "x86_64"


@pytest.fixture(params=sorted(ISA_CHOICES))
def forced_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test as on an x86 CPU without VNNI, then as on one with it."""
    monkeypatch.setenv("COMPRESS_ISA", ISA_CHOICES[request.param])
    monkeypatch.setenv("COMPRESS_ARCH", "x86_64")
    return str(request.param)


def host_int8_kernels_exact(scheme: str) -> bool:
    """Whether this machine's real integer kernels compute ``scheme`` without u8 x s8 saturation.

    Full 8-bit weights (u8s8) are exact only where the detected CPU has VNNI (or is not x86): a test
    forcing u8s8 on an AVX2-only CPU checks the simulated model, and the deployed kernels only where
    they can be right. 7-bit weights (reduce-range) are exact everywhere.
    """
    from compress.core.fingerprint import detected_cpu
    from compress.core.int8_scheme import VNNI_FLAGS

    if scheme != "u8s8" or platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return any(f in detected_cpu()["isa"] for f in VNNI_FLAGS)


def weight_ints(art: Any) -> list[Any]:
    """The INT8 weight initializers feeding DequantizeLinear in an exported QDQ model (as numpy arrays)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(art.path / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[0]]) for n in m.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
