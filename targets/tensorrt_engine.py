"""NVIDIA TensorRT (10.x) on a CUDA GPU: ONNX -> serialized engine -> execution context.

The build goes through TensorRT's ONNX parser and builder (precision FP32/FP16, INT8 from Q/DQ
nodes, 2:4 sparse weights, strongly typed networks, optimization profiles, workspace limit,
builder optimization level, a timing cache kept on disk). Engines are cached on disk under a key of
(ONNX digest, resolved build settings, TensorRT version, GPU compute capability), each with a JSON
sidecar that is checked before TensorRT deserializes anything (see ``_trt_cache``): an engine is
native code, so one from elsewhere is refused unless ``allow_external_engine`` is set, and one
from another TensorRT version or GPU is refused with the reason.

TensorRT and CUDA are imported lazily. Without the ``tensorrt`` package or a CUDA device,
``unavailable_reason()`` says which, and the rest of a run goes on. Note that installing only the
``tensorrt-stubs`` package leaves an importable, empty ``tensorrt`` namespace package; that is
detected and reported as "not installed" too.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from compress.artifact import ONNX, Artifact, sha256_files
from compress.capabilities import TargetCaps
from compress.config import TargetConfig
from compress.errors import BuildError, InputError, TargetUnavailable
from compress.registry import register_target

from ._trt_cache import (
    ENGINE,
    QDQ_OPS,
    SIDECAR,
    EngineCache,
    Profile,
    check_engine,
    derive_profiles,
    engine_key,
    format_rejections,
    is_cache_entry,
    is_within,
    load_bytes,
    onnx_graph_info,
    read_sidecar,
    resolve_settings,
    save_bytes_atomic,
    write_sidecar,
)
from .base import DeviceClockRunner, TargetBase, module_version

if TYPE_CHECKING:
    import tensorrt as trt

MIN_TRT_MAJOR = 10
INSTALL_HINT = "pip install 'compress-pipeline[tensorrt]' on a machine with an NVIDIA GPU and driver"


class TensorRTConfig(TargetConfig):
    """NVIDIA TensorRT on a CUDA GPU. Engines are cached per TensorRT version and GPU architecture."""

    kind: Literal["tensorrt"] = "tensorrt"
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="auto = int8 when the ONNX model holds Q/DQ nodes, else fp32; int8 needs Q/DQ "
        "(explicit quantization: no calibration here)")
    strongly_typed: bool | None = Field(
        None, description="strongly typed network (precision from the ONNX types); None = on for int8, off otherwise")
    sparse_weights: bool | None = Field(
        None, description="2:4 sparse kernels (SPARSE_WEIGHTS); None = on when the model is 2:4 sparse (prune.2to4)")
    tf32: bool = Field(True, description="allow TF32 for FP32 matmul/conv (TensorRT's default)")
    workspace_mb: int | None = Field(None, gt=0, description="workspace memory pool limit; None = TensorRT default")
    optimization_level: int = Field(3, ge=0, le=5, description="builder optimization level (TensorRT default 3)")
    min_batch: int = Field(1, ge=1, description="optimization profile: smallest batch (when the batch dim is dynamic)")
    opt_batch: int | None = Field(None, ge=1, description="batch the kernels are tuned for; None = the recipe's batch")
    max_batch: int = Field(32, ge=1, description="optimization profile: largest batch")
    min_shapes: dict[str, list[int]] | None = Field(None, description="per-input override of the profile's min shape")
    opt_shapes: dict[str, list[int]] | None = Field(None, description="per-input override of the profile's opt shape")
    max_shapes: dict[str, list[int]] | None = Field(None, description="per-input override of the profile's max shape")
    timing_cache: bool = Field(True, description="reuse and update an on-disk timing cache (faster rebuilds)")
    engine_cache: str | None = Field(None, description="engine + timing cache root; None = <cache>/tensorrt")
    engine: str | None = Field(
        None, description="a prebuilt engine file (or folder with engine.json) to use instead of building; needs "
        "allow_external_engine = true")
    allow_external_engine: bool = Field(
        False, description="allow loading an engine not built into this tool's cache (it is native code: only "
        "enable for engines you trust)")
    device: int = Field(0, ge=0, description="CUDA device index")

    @model_validator(mode="after")
    def _check(self) -> TensorRTConfig:
        if self.engine is not None and not self.allow_external_engine:
            raise ValueError("engine = '...' loads a prebuilt TensorRT engine, which is native code; refused unless "
                             "allow_external_engine = true (only for engines you trust)")
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch ({self.min_batch}) must be <= max_batch ({self.max_batch})")
        if self.opt_batch is not None and not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"opt_batch ({self.opt_batch}) must lie in min_batch..max_batch "
                             f"({self.min_batch}..{self.max_batch})")
        if self.strongly_typed and self.precision == "fp16":
            raise ValueError("strongly_typed = true takes precision from the ONNX tensor types, so precision = 'fp16' "
                             "cannot apply; set strongly_typed = false (or leave it unset)")
        return self


# -- environment ---------------------------------------------------------------------------------


def import_tensorrt() -> tuple[Any, str | None]:
    """The real ``tensorrt`` module, or None and why not."""
    try:
        import tensorrt
    except ImportError as e:
        return None, f"tensorrt is not installed ({e}); {INSTALL_HINT}"
    except OSError as e:  # the wheel is there but libnvinfer / CUDA libraries failed to load
        return None, f"tensorrt is installed but its native libraries failed to load ({e})"
    if not hasattr(tensorrt, "Builder"):
        # tensorrt-stubs alone installs a 'tensorrt' folder of .pyi files, which Python imports as an
        # empty namespace package.
        return None, f"tensorrt is not installed (only its type stubs are, no runtime module); {INSTALL_HINT}"
    version = str(getattr(tensorrt, "__version__", "0"))
    if _major(version) < MIN_TRT_MAJOR:
        return None, f"tensorrt {version} is too old; this target needs TensorRT {MIN_TRT_MAJOR} or newer"
    return tensorrt, None


def _major(version: str) -> int:
    m = re.match(r"\d+", version)
    return int(m.group(0)) if m else 0


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
def _device_info(device: int) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return Cuda(device).device_info(), None
    except ImportError as e:
        return None, f"no CUDA device (neither cuda-python nor torch is importable: {e})"
    except TargetUnavailable as e:
        return None, str(e)


# -- the build -----------------------------------------------------------------------------------


def _make_logger() -> Any:
    """A TensorRT logger that keeps warnings and errors so a failed build can say why."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING):
                self.messages.append(f"[{severity.name}] {msg}")

    return _Logger()


def _dims(shape: tuple[int, ...]) -> trt.Dims:
    import tensorrt as trt

    return trt.Dims(list(shape))


def _parse(builder: trt.Builder, flags: int, logger: trt.ILogger,
           onnx_path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Parse the ONNX model, or raise BuildError listing every node the parser rejects.

    The parser is returned too: it owns the weight memory the network refers to, so it must live
    until the engine is built.
    """
    import onnx
    import tensorrt as trt

    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return network, parser
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append({"node": err.node(), "name": err.node_name(), "op": err.node_operator(), "desc": err.desc()})
    # parse() stops at the first failing node; the whole-graph support check partitions the graph
    # and goes on, so every unsupported node is listed at once.
    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(model.graph.node)
    probe = trt.OnnxParser(builder.create_network(flags), logger)
    unsupported: list[tuple[int, str, str]] = []
    probe.supports_model_v2(onnx_path.read_bytes(), str(onnx_path))
    for s in range(probe.num_subgraphs):
        if not probe.is_subgraph_supported(s):
            for idx in probe.get_subgraph_nodes(s):
                n = nodes[idx] if 0 <= idx < len(nodes) else None
                unsupported.append((int(idx), n.name if n else "?", n.op_type if n else "?"))
    for i in range(probe.num_errors):
        err = probe.get_error(i)
        errors.append({"node": err.node(), "name": err.node_name(), "op": err.node_operator(), "desc": err.desc()})
    unique = list({(e["node"], e["desc"]): e for e in errors}.values())
    raise BuildError(format_rejections(trt.__version__, onnx_path, unique, unsupported))


def build_engine(onnx_path: Path, settings: dict[str, Any], timing_cache_path: Path | None,
                 out_engine: Path, log: Any = None) -> dict[str, Any]:
    """Build and serialize an engine with TensorRT; returns what the sidecar records about its IO."""
    import tensorrt as trt

    logger = _make_logger()
    builder = trt.Builder(logger)
    flags = 0
    if settings["strongly_typed"]:
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is not None:
            flags |= 1 << int(strong)
        elif _major(trt.__version__) < 11:  # TensorRT 11 networks are always strongly typed
            raise BuildError(f"TensorRT {trt.__version__} has no strongly typed networks; set strongly_typed = false")
    network, parser = _parse(builder, flags, logger, onnx_path)

    config = builder.create_builder_config()
    config.builder_optimization_level = int(settings["optimization_level"])
    if settings["workspace_bytes"]:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_bytes"]))
    if not settings["tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)
    precision = settings["precision"]
    if not settings["strongly_typed"]:
        # Weakly typed: precision comes from builder flags (TensorRT 11 drops them: strongly typed only).
        wanted = {"fp16": ["FP16", "INT8"] if settings.get("qdq") else ["FP16"], "int8": ["INT8"]}.get(precision, [])
        for name in wanted:
            flag = getattr(trt.BuilderFlag, name, None)
            if flag is None:
                raise BuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}: its networks are strongly "
                                 "typed, so precision comes from the ONNX types; export an FP16/Q-DQ model and set "
                                 "strongly_typed = true")
            config.set_flag(flag)
    if settings["sparse_weights"]:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)

    if settings["dynamic"]:
        profile = builder.create_optimization_profile()
        for name, shapes in settings["profiles"].items():
            p = Profile.from_json(shapes)
            profile.set_shape(name, _dims(p.min), _dims(p.opt), _dims(p.max))
        config.add_optimization_profile(profile)

    if timing_cache_path is not None:
        tc = config.create_timing_cache(load_bytes(timing_cache_path))
        # ignore_mismatch=False: a cache from another device is refused rather than mis-applied
        # (the path is per TensorRT version and compute capability already).
        if not config.set_timing_cache(tc, False):
            if log is not None:
                log(f"tensorrt: timing cache {timing_cache_path} was refused by TensorRT; starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "\n".join(logger.messages[-20:]) or "(TensorRT logged nothing)"
        raise BuildError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} with "
                         f"{_settings_text(settings)}:\n{detail}")
    build_s = time.perf_counter() - t0
    del parser  # the weights it owned are in the serialized engine now
    out_engine.write_bytes(memoryview(serialized))
    if timing_cache_path is not None:
        save_bytes_atomic(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    engine = trt.Runtime(logger).deserialize_cuda_engine(memoryview(serialized))
    io: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        shape = engine.get_tensor_shape(name)
        entry = {"name": name, "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                 "shape": [shape[j] for j in range(len(shape))]}
        io["inputs" if mode == trt.TensorIOMode.INPUT else "outputs"].append(entry)
    if log is not None:
        log(f"tensorrt: built engine in {build_s:.1f}s ({_settings_text(settings)})")
    return {**io, "build_s": round(build_s, 3), "warnings": logger.messages[-20:]}


def _settings_text(settings: dict[str, Any]) -> str:
    keys = ("precision", "strongly_typed", "sparse_weights", "optimization_level", "workspace_bytes")
    return ", ".join(f"{k}={settings[k]}" for k in keys)


# -- the runner ----------------------------------------------------------------------------------


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
        self._logger = _make_logger()
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
            if not ctx.set_input_shape(name, _dims(tuple(x.shape))):
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


# -- the target ----------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    """Engines can be hundreds of MB; the cache entry and the artifact share one file where possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# Engine cache roots this process built into (or was told about): engines under them are trusted.
_TRUSTED_ROOTS: set[Path] = set()


@register_target(TensorRTConfig)
class TensorRTTarget(TargetBase):
    name = "tensorrt"
    caps = TargetCaps(consumes=ONNX, device_timing=True, sparse_kernels=frozenset({"2:4"}),
                      requires=("tensorrt", "cuda"),
                      install="pip install 'compress-pipeline[tensorrt]' (and an NVIDIA GPU)")

    def __init__(self, config: TensorRTConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        _, reason = import_tensorrt()
        if reason is not None:
            return reason
        _, reason = _device_info(self.config.device)
        return reason

    def _environment(self) -> dict[str, Any]:
        """TensorRT version and GPU facts; raises TargetUnavailable with the reason when absent."""
        trt_mod, reason = import_tensorrt()
        if reason is not None:
            raise TargetUnavailable(reason)
        info, reason = _device_info(self.config.device)
        if reason is not None or info is None:
            raise TargetUnavailable(reason or "no CUDA device")
        return {"tensorrt_version": str(trt_mod.__version__), **info}

    def fingerprint(self) -> dict[str, Any]:
        try:
            env = self._environment()
        except TargetUnavailable as e:
            return {"tensorrt": module_version("tensorrt"), "unavailable": str(e)}
        return {"tensorrt": env["tensorrt_version"], "gpu": env["gpu"],
                "compute_capability": env["compute_capability"], "cuda_driver": env["cuda_driver"],
                "cuda_python": module_version("cuda-python")}

    # -- settings (no TensorRT needed) --

    def settings_for(self, art: Artifact) -> tuple[dict[str, Any], list[str]]:
        """The resolved build settings for an ONNX artifact (what the engine cache key hashes)."""
        onnx_path = art.path / "model.onnx"
        if not onnx_path.exists():
            raise InputError(f"target 'tensorrt': {art.path} holds no model.onnx")
        dims, ops = onnx_graph_info(onnx_path)
        c = self.config
        profiles = derive_profiles(art.inputs, dims, min_batch=c.min_batch, opt_batch=c.opt_batch,
                                   max_batch=c.max_batch, min_shapes=c.min_shapes, opt_shapes=c.opt_shapes,
                                   max_shapes=c.max_shapes)
        dynamic = any(p.min != p.max for p in profiles.values()) or any(
            d is None for ds in dims.values() for d in ds)
        qdq = sum(n for op, n in ops.items() if op in QDQ_OPS)
        settings, notes = resolve_settings(
            precision=c.precision, strongly_typed=c.strongly_typed, sparse_weights=c.sparse_weights, tf32=c.tf32,
            workspace_mb=c.workspace_mb, optimization_level=c.optimization_level, profiles=profiles,
            qdq_nodes=qdq, pruned_2to4=art.known_facts().sparsity == "2:4", dynamic=dynamic)
        return settings, notes

    def parity_batch(self) -> int:
        return self.config.max_batch  # the optimization profile's largest batch

    def parity_precision(self, art: Artifact, model_precision: str) -> str:
        """The tolerance class the build is judged at (``compress.parity``): INT8 for Q/DQ builds; FP16 when FP16
        kernels are allowed or TF32 is on (TF32 keeps FP16's 10-bit mantissa in matmul/conv inputs); else FP32."""
        settings, _ = self.settings_for(art)
        if model_precision == "int8" or settings["precision"] == "int8":
            return "int8"
        if model_precision == "fp16" or settings["precision"] == "fp16" or settings["tf32"]:
            return "fp16"
        return "fp32"

    def cache_root(self, ctx: Any) -> Path:
        if self.config.engine_cache:
            return Path(self.config.engine_cache).expanduser()
        return Path(ctx.cache.root) / "tensorrt"

    # -- compile --

    def compile(self, art: Artifact, ctx: Any) -> Artifact:
        env = self._environment()
        settings, notes = self.settings_for(art)
        trt_version, cc = env["tensorrt_version"], env["compute_capability"]
        cache = EngineCache(self.cache_root(ctx))
        _TRUSTED_ROOTS.update({cache.root.resolve(), Path(ctx.cache.root).resolve()})
        out = ctx.new_dir("tensorrt")
        if self.config.engine is not None:
            sidecar = self._import_external(Path(self.config.engine).expanduser(), out, art, settings, env)
            hit = False
        else:
            key = engine_key(art.digest, settings, trt_version, cc)
            folder = cache.get(key, trt_version, cc)
            for bad in cache.discarded:
                note = (f"TensorRT engine cache entry {bad.name[:16]} did not match its recorded SHA-256; it was "
                        "discarded and rebuilt")
                ctx.log(f"WARNING {note}")
                getattr(ctx.cache, "notes", []).append(note)
            hit = folder is not None
            if folder is None:
                staged = cache.staging_dir()
                try:
                    tc = cache.timing_cache_path(trt_version, cc) if self.config.timing_cache else None
                    io = build_engine(art.path / "model.onnx", settings, tc, staged / ENGINE, ctx.log)
                    write_sidecar(staged, key=key, onnx_digest=art.digest, settings=settings,
                                  tensorrt_version=trt_version, compute_capability=cc, gpu=env["gpu"], **io)
                except BaseException:
                    shutil.rmtree(staged, ignore_errors=True)
                    raise
                folder = cache.put(key, staged)
            for name in (ENGINE, SIDECAR):
                _link_or_copy(folder / name, out / name)
            sidecar = read_sidecar(out)
        batch_dynamic = any(p.min[0] != p.max[0] for p in (Profile.from_json(v)
                                                           for v in sidecar["settings"]["profiles"].values()))
        return Artifact("compiled", out, sha256_files(out), art.inputs, metadata={
            "target": "tensorrt",
            "dynamic_batch": batch_dynamic,
            "tensorrt": {"settings": sidecar["settings"], "tensorrt_version": trt_version, "compute_capability": cc,
                         "gpu": env["gpu"], "engine_cache_hit": hit, "external": bool(sidecar.get("external"))},
            "target_notes": notes,
        }, facts=art.known_facts().evolve(dynamic_batch=batch_dynamic))

    def _import_external(self, src: Path, out: Path, art: Artifact, settings: dict[str, Any],
                         env: dict[str, Any]) -> dict[str, Any]:
        """Copy a user-supplied engine into the artifact, checked as far as its provenance allows."""
        folder = src if src.is_dir() else src.parent
        engine_file = folder / ENGINE if src.is_dir() else src
        if not engine_file.is_file():
            raise InputError(f"target 'tensorrt': engine = '{src}' does not exist")
        # Provenance recorded by a build of this tool is checked; without a sidecar, TensorRT's own
        # header check at deserialization is all that guards against another version or GPU.
        recorded = {"settings": settings, "tensorrt_version": env["tensorrt_version"],
                    "compute_capability": env["compute_capability"], "gpu": env["gpu"]}
        if src.is_dir() or (folder / SIDECAR).exists():
            data = check_engine(folder, env["tensorrt_version"], env["compute_capability"])
            recorded = {k: data.get(k, v) for k, v in recorded.items()}
        shutil.copy2(engine_file, out / ENGINE)
        return write_sidecar(out, key=None, onnx_digest=art.digest, external=True,
                             external_source=str(engine_file.resolve()), **recorded)

    # -- runner --

    def check_trusted(self, compiled: Artifact) -> dict[str, Any]:
        """Refuse engines from outside this tool's caches unless allow_external_engine; return the sidecar."""
        path = Path(compiled.path)
        inside = is_cache_entry(path) or is_within(path, _TRUSTED_ROOTS)
        if not inside and not self.config.allow_external_engine:
            raise InputError(f"{path} is not in this tool's cache: refusing to load a TensorRT engine from elsewhere "
                             "(an engine is native code). Rebuild it from the ONNX model, or set "
                             "allow_external_engine = true for an engine you trust")
        sidecar = read_sidecar(path)
        if sidecar.get("external") and not self.config.allow_external_engine:
            raise InputError(f"{path} holds an external engine ({sidecar.get('external_source')}); refused unless "
                             "allow_external_engine = true")
        return sidecar

    def runner(self, compiled: Artifact, threads: int = 0) -> TrtRunner:
        self.check_trusted(compiled)
        env = self._environment()
        sidecar = check_engine(Path(compiled.path), env["tensorrt_version"], env["compute_capability"])
        return TrtRunner(Path(compiled.path) / sidecar["engine"], sidecar, self.config.device)

