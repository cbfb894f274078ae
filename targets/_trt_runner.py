"""Running a TensorRT engine: device buffers, one execution context, one stream, host and GPU time per call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import BuildError, InputError

from ._trt_build import dims, make_logger
from ._trt_cache import Profile
from ._trt_cuda import Cuda
from .base import DeviceClockRunner

if TYPE_CHECKING:
    import tensorrt as trt


class TrtRunner(DeviceClockRunner):
    """Runs a deserialized engine: device buffers, one execution context, one stream.

    ``infer`` copies inputs in, runs ``execute_async_v3`` and copies outputs out. Each call records
    host time (the whole call, copies included) in ``host_ms`` and GPU time of the engine alone,
    between two CUDA events around ``execute_async_v3``, in ``device_ms``.
    """

    def __init__(self, engine_path: Path, sidecar: dict[str, Any], device: int = 0) -> None:
        import tensorrt as trt

        self._trt = trt
        self.cuda = Cuda(device)
        self._logger = make_logger()
        self._runtime = trt.Runtime(self._logger)
        self.engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BuildError(f"TensorRT {trt.__version__} could not deserialize {engine_path}: "
                             f"{'; '.join(self._logger.messages[-5:]) or 'no reason logged'}; rebuild the engine")
        self.context: trt.IExecutionContext | None = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        self._start, self._end = self.cuda.event(), self.cuda.event()
        self.profiles = {k: Profile.from_json(v) for k, v in sidecar["settings"]["profiles"].items()}
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.input_names if is_input else self.output_names).append(name)
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
                        for n in self.input_names + self.output_names}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self.host_ms: list[float] = []
        self.device_ms: list[float] = []

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:  # grow-only: shapes change with the batch, reallocating every call would dominate
            if ptr:
                self.cuda.free(ptr)
            ptr, cap = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, cap)
        return ptr

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.context is None:
            raise InputError("tensorrt runner: already closed")
        t0 = time.perf_counter()
        ctx = self.context
        hosts = []
        for name in self.input_names:
            if name not in feeds:
                raise InputError(f"tensorrt runner: missing input '{name}' (expects {self.input_names})")
            x = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            prof = self.profiles.get(name)
            if prof is not None and not prof.admits(x.shape):
                raise InputError(f"tensorrt runner: input '{name}' has shape {list(x.shape)}, outside the engine's "
                                 f"optimization profile min={list(prof.min)} max={list(prof.max)}; rebuild with "
                                 "min_batch/max_batch or min_shapes/max_shapes covering it")
            if not ctx.set_input_shape(name, dims(tuple(x.shape))):
                raise InputError(f"tensorrt runner: TensorRT refused shape {list(x.shape)} for input '{name}'")
            ptr = self._buffer(name, x.nbytes)
            self.cuda.h2d(ptr, x, self.stream)
            ctx.set_tensor_address(name, ptr)
            hosts.append(x)  # kept alive until the stream is synchronized
        outs = []
        for name in self.output_names:
            d = ctx.get_tensor_shape(name)
            shape = tuple(d[i] for i in range(len(d)))
            if any(s < 0 for s in shape):
                raise BuildError(f"tensorrt runner: output '{name}' has data-dependent shape {list(shape)}, "
                                 "which this runner does not support (needs an output allocator)")
            out = np.empty(shape, dtype=self._dtypes[name])
            ctx.set_tensor_address(name, self._buffer(name, out.nbytes))
            outs.append(out)
        handle = self.cuda.stream_handle(self.stream)
        self.cuda.record(self._start, self.stream)
        if not ctx.execute_async_v3(handle):
            raise BuildError(f"tensorrt runner: execute_async_v3 failed: {'; '.join(self._logger.messages[-5:])}")
        self.cuda.record(self._end, self.stream)
        for name, out in zip(self.output_names, outs, strict=True):
            self.cuda.d2h(out, self._buffers[name][0], self.stream)
        self.cuda.synchronize(self.stream)
        self.device_ms.append(self.cuda.elapsed_ms(self._start, self._end))
        self.host_ms.append((time.perf_counter() - t0) * 1e3)
        del hosts
        return outs

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        if self.context is not None:
            self.cuda.destroy(self.stream, self._start, self._end)
        self.context = None
        self.engine = None
