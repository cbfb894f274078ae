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

This file is the target as the recipe sees it (settings, availability, compile, runner); the engine
build is in ``_trt_build``, the runner in ``_trt_runner``, the CUDA calls in ``_trt_cuda``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from compress.core.artifact import ONNX, Artifact, sha256_files
from compress.core.capabilities import TargetCaps
from compress.core.config import TargetConfig
from compress.core.registry import register_target
from compress.errors import InputError, TargetUnavailable

from ._trt_build import build_engine, major_version
from ._trt_cache import (
    ENGINE,
    QDQ_OPS,
    SIDECAR,
    EngineCache,
    Profile,
    check_engine,
    derive_profiles,
    engine_key,
    is_cache_entry,
    is_within,
    onnx_graph_info,
    read_sidecar,
    resolve_settings,
    write_sidecar,
)
from ._trt_cuda import cuda_device
from ._trt_runner import TrtRunner
from .base import TargetBase, module_version

if TYPE_CHECKING:
    pass

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
    if major_version(version) < MIN_TRT_MAJOR:
        return None, f"tensorrt {version} is too old; this target needs TensorRT {MIN_TRT_MAJOR} or newer"
    return tensorrt, None


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
        _, reason = cuda_device(self.config.device)
        return reason

    def _environment(self) -> dict[str, Any]:
        """TensorRT version and GPU facts; raises TargetUnavailable with the reason when absent."""
        trt_mod, reason = import_tensorrt()
        if reason is not None:
            raise TargetUnavailable(reason)
        info, reason = cuda_device(self.config.device)
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
        """The tolerance class the build is judged at (``quality.parity``): INT8 for Q/DQ builds; FP16 when FP16
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

