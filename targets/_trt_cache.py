"""The TensorRT target's pure-Python half: build settings, profiles, engine cache and trust checks.

Nothing here imports TensorRT or CUDA, so all of it is tested on machines without a GPU.

An engine is native code compiled for one TensorRT version and one GPU architecture. Each engine
this tool builds is stored with a JSON sidecar (``engine.json``) that records the engine file's
SHA-256, the TensorRT version, the GPU's compute capability and the build settings. Before an
engine is deserialized, the sidecar is checked against the file and against this machine, so a
swapped file, or an engine from another TensorRT version or GPU, is refused with the reason instead
of being handed to TensorRT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.core.artifact import InputSpec, sha256_file, sha256_json
from compress.errors import BuildError, InputError

ENGINE = "model.engine"
SIDECAR = "engine.json"
SIDECAR_FORMAT = 1
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class ForeignEngine(InputError):
    """An engine built by another TensorRT version or for another GPU architecture."""


# -- profiles -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One input's optimization-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, d: Mapping[str, Sequence[int]]) -> Profile:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))

    def admits(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True))


def onnx_graph_info(model_path: Path) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """Per graph input, its dims (None where symbolic), and a count of every op type (subgraphs included).

    Weights are not loaded: only the graph structure is needed.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    dims: dict[str, list[int | None]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims[inp.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in inp.type.tensor_type.shape.dim]
    ops: dict[str, int] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return dims, ops


def derive_profiles(
    inputs: Sequence[InputSpec],
    onnx_dims: Mapping[str, Sequence[int | None]] | None,
    *,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
    min_shapes: Mapping[str, Sequence[int]] | None = None,
    opt_shapes: Mapping[str, Sequence[int]] | None = None,
    max_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Profile]:
    """Optimization-profile shapes (min/opt/max) for every input.

    Dims the ONNX graph fixes stay fixed. The batch dim (axis 0), when symbolic, spans
    ``min_batch..max_batch`` with ``opt_batch`` (default: the recipe's batch, clamped into range).
    Any other symbolic dim takes the recipe's value unless ``*_shapes`` overrides give a range. A full
    per-input override (``min_shapes = {input = [1, 3, 224, 224]}``) replaces the derived shape and
    is checked against the graph: fixed dims must match, ranks must agree, min <= opt <= max.
    Without ``onnx_dims`` (graph unreadable), every dim is treated as fixed to the input spec.
    """
    overrides = {"min": dict(min_shapes or {}), "opt": dict(opt_shapes or {}), "max": dict(max_shapes or {})}
    names = {s.name for s in inputs}
    for which, table in overrides.items():
        unknown = sorted(set(table) - names)
        if unknown:
            raise InputError(f"target 'tensorrt': {which}_shapes names input(s) {unknown} the model does not have; "
                             f"its inputs are {sorted(names)}")
    if not 1 <= min_batch <= max_batch:
        raise InputError(f"target 'tensorrt': need 1 <= min_batch <= max_batch, got min_batch={min_batch}, "
                         f"max_batch={max_batch}")
    out: dict[str, Profile] = {}
    if onnx_dims is not None and set(onnx_dims) != names:
        raise InputError(f"target 'tensorrt': the ONNX graph's inputs {sorted(onnx_dims)} differ from the artifact's "
                         f"input specs {sorted(names)}; re-export the model so they agree")
    for spec in inputs:
        graph = list(onnx_dims[spec.name]) if onnx_dims is not None else list(spec.shape)
        if len(graph) != len(spec.shape):
            raise InputError(f"target 'tensorrt': input '{spec.name}' has rank {len(graph)} in the ONNX graph but "
                             f"{len(spec.shape)} in the recipe's input shape {list(spec.shape)}")
        derived: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for axis, (g, r) in enumerate(zip(graph, spec.shape, strict=True)):
            if g is not None:
                lo = opt = hi = g
            elif axis == 0:
                opt = opt_batch if opt_batch is not None else min(max(r, min_batch), max_batch)
                lo, hi = min_batch, max_batch
            else:
                lo = opt = hi = r
            derived["min"].append(lo)
            derived["opt"].append(opt)
            derived["max"].append(hi)
        chosen = {w: tuple(int(v) for v in overrides[w].get(spec.name, derived[w])) for w in ("min", "opt", "max")}
        _check_profile(spec.name, graph, chosen)
        out[spec.name] = Profile(chosen["min"], chosen["opt"], chosen["max"])
    return out


def _check_profile(name: str, graph: Sequence[int | None], shapes: Mapping[str, tuple[int, ...]]) -> None:
    for which, shape in shapes.items():
        if len(shape) != len(graph):
            raise InputError(f"target 'tensorrt': {which}_shapes for '{name}' has rank {len(shape)} "
                             f"({list(shape)}) but the input has rank {len(graph)}")
        for axis, (s, g) in enumerate(zip(shape, graph, strict=True)):
            if s < 1:
                raise InputError(f"target 'tensorrt': {which} shape of '{name}' has {s} at axis {axis}; dims must be "
                                 ">= 1")
            if g is not None and s != g:
                raise InputError(f"target 'tensorrt': {which} shape of '{name}' sets axis {axis} to {s}, but the "
                                 f"ONNX graph fixes it to {g}; only symbolic dims can vary (re-export with a "
                                 "dynamic dim to change it)")
    lo, opt, hi = shapes["min"], shapes["opt"], shapes["max"]
    for axis in range(len(graph)):
        if not lo[axis] <= opt[axis] <= hi[axis]:
            raise InputError(f"target 'tensorrt': profile of '{name}' needs min <= opt <= max at axis {axis}, got "
                             f"min={list(lo)}, opt={list(opt)}, max={list(hi)}")


# -- build settings and the engine cache key --------------------------------------------------------


def resolve_settings(
    *,
    precision: str,
    strongly_typed: bool | None,
    sparse_weights: bool | None,
    tf32: bool,
    workspace_mb: int | None,
    optimization_level: int,
    profiles: Mapping[str, Profile],
    qdq_nodes: int,
    pruned_2to4: bool,
    dynamic: bool,
) -> tuple[dict[str, Any], list[str]]:
    """Turn the config plus what the model holds into the settings an engine is built with (and notes).

    These settings, not the raw config, go into the engine cache key: two configs that resolve to the
    same build share an engine.
    """
    notes: list[str] = []
    if precision == "auto":
        precision = "int8" if qdq_nodes else "fp32"
    if precision == "int8" and not qdq_nodes:
        raise BuildError("target 'tensorrt': precision = 'int8' needs an explicitly quantized ONNX model "
                         "(QuantizeLinear/DequantizeLinear nodes, as the quantization passes make); this model has "
                         "none. TensorRT's implicit INT8 calibration is deprecated since 10.1 and not offered; add "
                         "a quantization pass before export, or use precision = 'fp16'")
    if precision == "fp32" and qdq_nodes:
        raise BuildError(f"target 'tensorrt': the ONNX model is explicitly quantized ({qdq_nodes} Q/DQ nodes), so "
                         "TensorRT builds it in INT8; set precision = 'int8' (or 'auto'), or 'fp16' for INT8 with "
                         "FP16 for the layers left unquantized")
    if strongly_typed is None:
        # Strong typing takes each tensor's precision from the graph: right for Q/DQ models (TensorRT's
        # recommended path for explicit quantization), impossible for an FP32 graph built in FP16.
        strongly_typed = precision == "int8"
    if strongly_typed and precision == "fp16":
        raise BuildError("target 'tensorrt': strongly_typed = true takes precision from the ONNX tensor types, so "
                         "precision = 'fp16' cannot lower an FP32 graph; set strongly_typed = false, or export an "
                         "FP16 model and use precision = 'fp32'")
    if sparse_weights is None:
        sparse_weights = pruned_2to4
    elif sparse_weights and not pruned_2to4:
        notes.append("sparse_weights is on but prune.2to4 did not run: TensorRT only uses sparse kernels for "
                     "weights that already follow the 2:4 pattern")
    if sparse_weights:
        notes.append("2:4 sparse weights enabled (BuilderFlag.SPARSE_WEIGHTS); TensorRT picks sparse kernels only "
                     "where they are faster, on Ampere (sm_80) or newer")
    if precision == "fp16":
        notes.append("built with FP16 kernels allowed: outputs differ from FP32 by FP16 rounding")
    settings = {
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "sparse_weights": bool(sparse_weights),
        "tf32": bool(tf32),
        "workspace_bytes": workspace_mb * (1 << 20) if workspace_mb else None,
        "optimization_level": optimization_level,
        "dynamic": dynamic,
        "qdq": qdq_nodes > 0,
        "profiles": {k: v.to_json() for k, v in sorted(profiles.items())},
    }
    return settings, notes


def engine_key(onnx_digest: str, settings: Mapping[str, Any], trt_version: str, compute_capability: str) -> str:
    """Full SHA-256 over what decides an engine's bytes: the model, the build, TensorRT and the GPU architecture."""
    return sha256_json({
        "format": SIDECAR_FORMAT,
        "onnx": onnx_digest,
        "settings": dict(settings),
        "tensorrt": trt_version,
        "compute_capability": compute_capability,
    })


# -- sidecar and trust -------------------------------------------------------------------------------


def write_sidecar(folder: Path, **fields: Any) -> dict[str, Any]:
    """Record the engine's SHA-256 and provenance next to it (``folder/engine.json``)."""
    engine = folder / ENGINE
    data = {"format": SIDECAR_FORMAT, "engine": ENGINE, "engine_sha256": sha256_file(engine), **fields}
    (folder / SIDECAR).write_text(json.dumps(data, indent=2, sort_keys=True))
    return data


def read_sidecar(folder: Path) -> dict[str, Any]:
    path = folder / SIDECAR
    if not path.exists():
        raise InputError(f"{folder} holds no {SIDECAR}: not an engine built by the tensorrt target; refusing to "
                         "load it (an engine is native code). Rebuild from the ONNX model")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}); rebuild the engine") from e
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise InputError(f"{path} has an unknown format; rebuild the engine with this version of the tool")
    return data


def check_engine(folder: Path, trt_version: str, compute_capability: str) -> dict[str, Any]:
    """Verify an engine folder before TensorRT sees it; return its sidecar.

    Refuses (InputError) an engine whose bytes differ from what was recorded when it was built, and
    (ForeignEngine) one built by another TensorRT version or for another compute capability.
    """
    data = read_sidecar(folder)
    engine = folder / str(data.get("engine", ENGINE))
    if engine.parent.resolve() != folder.resolve() or not engine.exists():
        raise InputError(f"{folder}: engine file {data.get('engine')!r} is missing; rebuild the engine")
    if sha256_file(engine) != data.get("engine_sha256"):
        raise InputError(f"{engine} does not match the SHA-256 recorded in {folder / SIDECAR} when it was built; "
                         "refusing to load it (rebuild the engine)")
    problems = []
    if data.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {data.get('tensorrt_version')} (this machine has TensorRT {trt_version})")
    if data.get("compute_capability") != compute_capability:
        problems.append(f"compute capability {data.get('compute_capability')} ({data.get('gpu', 'unknown GPU')}; "
                        f"this GPU is {compute_capability})")
    if problems:
        raise ForeignEngine(f"{engine} was built with {' and for '.join(problems)}; TensorRT engines only run on the "
                            "TensorRT version and GPU architecture they were built for, so it must be rebuilt here "
                            "(run again: the engine cache key includes both, so a matching engine is built)")
    return data


def is_within(path: Path, roots: Iterable[Path]) -> bool:
    p = path.resolve()
    for root in roots:
        r = Path(root).resolve()
        if p == r or r in p.parents:
            return True
    return False


def is_cache_entry(path: Path) -> bool:
    """True for a finished entry of a compress cache (``<root>/objects/<key>`` with its COMPLETE marker)."""
    p = path.resolve()
    return p.parent.name == "objects" and (p / "COMPLETE").is_file() and (p.parent.parent / "tmp").is_dir()


# -- engine and timing caches -------------------------------------------------------------------------


class EngineCache:
    """``<root>/engines/<key>/{model.engine, engine.json}`` and ``<root>/timing/<trt>-sm<cc>.cache``.

    Entries are written to a temporary directory and renamed into place, so a killed build leaves
    no half engine. Timing caches are per TensorRT version and compute capability because TensorRT
    rejects (or mis-applies) tactics timed elsewhere.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.engines = self.root / "engines"
        self.timing = self.root / "timing"
        self.discarded: list[Path] = []  # entries that failed verification in this session (rebuilt)
        try:
            self.engines.mkdir(parents=True, exist_ok=True)
            self.timing.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError(f"cannot create the TensorRT engine cache at {self.root}: {e}; set engine_cache to a "
                             "writable directory") from e

    def entry(self, key: str) -> Path:
        return self.engines / key

    def get(self, key: str, trt_version: str, compute_capability: str) -> Path | None:
        """The verified engine folder for ``key``, or None to build. An engine whose bytes no longer match
        the SHA-256 in its sidecar is removed (and listed in ``discarded``) so it is rebuilt, never loaded."""
        folder = self.entry(key)
        if not (folder / SIDECAR).exists():
            return None
        data = read_sidecar(folder)
        engine = folder / str(data.get("engine", ENGINE))
        if engine.parent.resolve() == folder.resolve() and (
                not engine.exists() or sha256_file(engine) != data.get("engine_sha256")):
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                raise BuildError(f"TensorRT engine cache entry {folder} does not match its recorded SHA-256 and "
                                 "could not be removed; delete it and run again")
            self.discarded.append(folder)
            return None
        check_engine(folder, trt_version, compute_capability)
        return folder

    def put(self, key: str, staged: Path) -> Path:
        dest = self.entry(key)
        if dest.exists():  # built concurrently; the equal key means an equivalent engine
            shutil.rmtree(staged, ignore_errors=True)
            return dest
        os.replace(staged, dest)
        return dest

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="build-", dir=self.engines))

    def timing_cache_path(self, trt_version: str, compute_capability: str) -> Path:
        return self.timing / f"trt-{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def load_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def save_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- parser rejections -----------------------------------------------------------------------------


def format_rejections(trt_version: str, onnx_path: Path, errors: Sequence[Mapping[str, Any]],
                      unsupported_nodes: Sequence[tuple[int, str, str]]) -> str:
    """One message listing every node TensorRT's ONNX parser rejected, with the TensorRT version.

    ``errors`` are the parser's own (node index, name, operator, description); ``unsupported_nodes``
    are (index, name, op type) from the parser's whole-graph support check, which goes on past the
    first failure that stops ``parse``.
    """
    lines = []
    seen: set[int] = set()
    for e in errors:
        idx = int(e.get("node", -1))
        where = f"node {idx} '{e.get('name') or '<unnamed>'}' ({e.get('op') or '?'})" if idx >= 0 else "graph"
        lines.append(f"  - {where}: {e.get('desc', '').strip()}")
        seen.add(idx)
    extra = [(i, n, op) for i, n, op in unsupported_nodes if i not in seen]
    for i, name, op in extra:
        lines.append(f"  - node {i} '{name or '<unnamed>'}' ({op}): not supported")
    ops = sorted({e.get("op") or "?" for e in errors if int(e.get("node", -1)) >= 0} | {op for _, _, op in extra})
    head = (f"TensorRT {trt_version}'s ONNX parser rejected {onnx_path} "
            f"({len(lines)} problem(s){', ops: ' + ', '.join(ops) if ops else ''}):")
    tail = ("Replace or remove these ops before export (or add a TensorRT plugin), or use another target; "
            "newer TensorRT versions support more ONNX ops.")
    return "\n".join([head, *lines, tail])
