"""The CUDA calls the TensorRT target makes: device facts, memory, streams, events (cuda-python or torch)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from compress.errors import BuildError, TargetUnavailable


class Cuda:
    """The few CUDA runtime calls the runner needs, through cuda-python (preferred) or PyTorch."""

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.backend = ""
        self._rt: Any = None
        self._torch: Any = None
        self._keep: dict[int, Any] = {}  # torch backend: pointer -> tensor that owns the memory
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # older cuda-python
            self._rt = cudart
            self.backend = "cuda-python"
        except ImportError:
            import torch

            self._torch = torch
            self.backend = "torch"

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, name = self._rt.cudaGetErrorName(err)
            raise BuildError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name} ({int(err)})")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def device_info(self) -> dict[str, Any]:
        """Name, compute capability and driver; raises TargetUnavailable without a usable device."""
        if self._rt is not None:
            err, count = self._rt.cudaGetDeviceCount()
            if int(err) != 0 or count == 0:
                _, name = self._rt.cudaGetErrorName(err)
                raise TargetUnavailable(f"no CUDA device (cudaGetDeviceCount: {name!s}, {count} devices)")
            if self.device >= count:
                raise TargetUnavailable(f"no CUDA device {self.device} (this machine has {count})")
            prop = self._ok(self._rt.cudaGetDeviceProperties(self.device))
            driver = self._ok(self._rt.cudaDriverGetVersion())
            name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
            return {"gpu": name, "compute_capability": f"{prop.major}.{prop.minor}", "cuda_driver": int(driver)}
        torch = self._torch
        if not torch.cuda.is_available():
            raise TargetUnavailable(
                f"no CUDA device (cuda-python is not installed and torch {torch.__version__} sees no GPU; "
                f"torch CUDA build: {torch.version.cuda or 'none'})")
        if self.device >= torch.cuda.device_count():
            raise TargetUnavailable(f"no CUDA device {self.device} (this machine has {torch.cuda.device_count()})")
        major, minor = torch.cuda.get_device_capability(self.device)
        return {"gpu": torch.cuda.get_device_name(self.device), "compute_capability": f"{major}.{minor}",
                "cuda_driver": "unknown (via torch)"}

    # Buffers are raw device pointers (ints) in both backends; torch tensors are kept alive in _keep.
    def malloc(self, nbytes: int) -> int:
        if self._rt is not None:
            return int(self._ok(self._rt.cudaMalloc(max(nbytes, 1))))
        t = self._torch.empty(max(nbytes, 1), dtype=self._torch.uint8, device=f"cuda:{self.device}")
        self._keep[int(t.data_ptr())] = t
        return int(t.data_ptr())

    def free(self, ptr: int) -> None:
        if self._rt is not None:
            self._ok(self._rt.cudaFree(ptr))
        else:
            self._keep.pop(ptr, None)

    def stream(self) -> Any:
        if self._rt is not None:
            return self._ok(self._rt.cudaStreamCreate())
        return self._torch.cuda.Stream(device=self.device)

    def stream_handle(self, stream: Any) -> int:
        return int(stream) if self._rt is not None else int(stream.cuda_stream)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        if self._rt is not None:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))
        else:
            self._view(dst, src.nbytes).copy_(self._torch.from_numpy(src.view(np.uint8).reshape(-1)))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        if self._rt is not None:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))
        else:
            self._torch.from_numpy(dst.view(np.uint8).reshape(-1)).copy_(self._view(src, dst.nbytes))

    def _view(self, ptr: int, nbytes: int) -> Any:
        return self._keep[ptr][:nbytes]

    def event(self) -> Any:
        if self._rt is not None:
            return self._ok(self._rt.cudaEventCreate())
        return self._torch.cuda.Event(enable_timing=True)

    def record(self, event: Any, stream: Any) -> None:
        if self._rt is not None:
            self._ok(self._rt.cudaEventRecord(event, stream))
        else:
            event.record(stream)

    def synchronize(self, stream: Any) -> None:
        if self._rt is not None:
            self._ok(self._rt.cudaStreamSynchronize(stream))
        else:
            stream.synchronize()

    def destroy(self, stream: Any, *events: Any) -> None:
        if self._rt is not None:
            for ev in events:
                self._ok(self._rt.cudaEventDestroy(ev))
            self._ok(self._rt.cudaStreamDestroy(stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self._rt is not None:
            return float(self._ok(self._rt.cudaEventElapsedTime(start, end)))
        return float(start.elapsed_time(end))


@lru_cache(maxsize=8)
def cuda_device(device: int) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return Cuda(device).device_info(), None
    except ImportError as e:
        return None, f"no CUDA device (neither cuda-python nor torch is importable: {e})"
    except TargetUnavailable as e:
        return None, str(e)
