"""Building a TensorRT engine from ONNX: the parser's refusals listed at once, the builder's settings, its log."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import BuildError

from ._trt_cache import Profile, format_rejections, load_bytes, save_bytes_atomic

if TYPE_CHECKING:
    import tensorrt as trt


def major_version(version: str) -> int:
    """The leading number of a TensorRT version string (0 when there is none)."""
    m = re.match(r"\d+", version)
    return int(m.group(0)) if m else 0


def make_logger() -> Any:
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


def dims(shape: tuple[int, ...]) -> trt.Dims:
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

    logger = make_logger()
    builder = trt.Builder(logger)
    flags = 0
    if settings["strongly_typed"]:
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is not None:
            flags |= 1 << int(strong)
        elif major_version(trt.__version__) < 11:  # TensorRT 11 networks are always strongly typed
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
            profile.set_shape(name, dims(p.min), dims(p.opt), dims(p.max))
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
