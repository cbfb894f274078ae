"""Apache TVM (Relax) on the CPU, tuned with MetaSchedule.

ONNX goes through the Relax ONNX frontend, is compiled with ``tvm.compile`` (untuned) or over a
MetaSchedule tuning database (tuned; ``_tvm_tuning.compile_tuned``, with weights prepacked into
the layouts tuning chose), exported as a shared library and run with the Relax VM. Untuned CPU
code is far from usable (PLATFORM.md: ~1,700 ms against ~24 ms for ONNX Runtime on ResNet-18), so
an untuned build says so in its metadata notes.

The tuning database lives on disk (default ``<cache>/tvm-db``), one directory per (TVM version,
target), so a second run of the same model, from any recipe, spends no tuning time, and records
tuned by another TVM version or for another target are never applied (see ``_tvm_tuning``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from compress.artifact import ONNX, Artifact, InputSpec, sha256_file, sha256_files
from compress.capabilities import BundleSpec, TargetCaps
from compress.config import TargetConfig
from compress.errors import BuildError, InputError, RecipeError, TargetUnavailable
from compress.fingerprint import cpu_info
from compress.registry import register_command, register_target

from .base import DeviceClockRunner, TargetBase, module_version, static_feeds

if TYPE_CHECKING:
    from ._tvm_rpc import RpcTvmRunner

# TVM's thread pool pins the calling thread to one core the first time it runs parallel code (its
# threading backend binds threads unless TVM_BIND_THREADS=0), and every thread the process starts later
# inherits that mask. Measured here: after a TVM build or run in the process, os.sched_getaffinity(0)
# went from {0, 1} to {0}, so ONNX Runtime's and PyTorch's pools created afterwards, and the main
# thread that takes part in their work, shared one core: every later figure in the run was wrong.
# Off unless the user asks for it; set before TVM's runtime first reads it.
os.environ.setdefault("TVM_BIND_THREADS", "0")

LIBRARY = "model.so"
MANIFEST = "tvm.json"
# apache-tvm-ffi 0.1.15.x segfaults in tvm.ir.save_json, which every tuning record goes through.
_BAD_FFI_PREFIX = "0.1.15"
# Cross toolchains from Debian's packages (g++-aarch64-linux-gnu etc.), by target triple prefix.
_CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "arm": "arm-linux-gnueabihf-g++", "riscv64": "riscv64-linux-gnu-g++"}
_EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 20, "enable_cpu_cache_flush": False}


class TvmConfig(TargetConfig):
    """Apache TVM (Relax + MetaSchedule). Tuned builds compete with ONNX Runtime; untuned ones do not."""

    kind: Literal["tvm"] = "tvm"
    target: dict[str, Any] | None = Field(
        None, description="TVM target JSON, e.g. {kind='llvm', mcpu='znver3', num-cores=2}, or a TVM tag with "
        "overrides, e.g. {tag='raspberry-pi/4b-aarch64'}; None = the recipe's profile's target, else this host")
    tuning_trials: int = Field(
        256, ge=0, description="MetaSchedule trials in total over all tasks; 0 = untuned (not representative)")
    tuning_time_s: float | None = Field(None, gt=0, description="wall-clock budget for tuning; None = trials only")
    candidate_timeout_s: float = Field(
        60.0, gt=0, description="hard limit on building and timing one tuning candidate; past it the worker process "
        "is killed and replaced (a candidate stuck in LLVM once ran >10 min here)")
    database: str | None = Field(None, description="tuning database root; None = <cache>/tvm-db")
    scheduler: Literal["dominant", "gradient", "round-robin"] = Field(
        "dominant", description="how tuning trials are shared among kernels: dominant = by each kernel's share of "
        "the model's time (every kernel visited once, largest first); gradient/round-robin = MetaSchedule's own")
    reuse_kernels: bool = Field(
        True, description="a model tuned for the first time skips the kernels the shared tuning database already "
        "holds enough trials for (same shape, tuned for another model or recipe)")
    layout: Literal["NCHW", "NHWC"] = Field(
        "NHWC", description="data layout of convolutions (Relax ConvertLayout; transposes at the model's edges); "
        "NHWC won the same-run A/B on MobileNetV2 (benchmarks/results/tvm-levers-nhwc.md); NCHW = as exported. "
        "A graph ConvertLayout cannot handle is built in NCHW, with a note")
    int8_arith: Literal["float", "integer"] = Field(
        "float", description="Q/DQ (INT8) models: float = as TVM's ONNX frontend imports them (dequantized "
        "weights, float convolutions; the faster here); integer = convolutions on the 8-bit values with int32 "
        "sums, exactly ONNX Runtime's QLinearConv arithmetic (targets/_tvm_int8.py), 1.7x slower than float on "
        "MobileNetV2 at 192 trials in a same-run A/B (benchmarks/results/tvm-int8-ops.md)")
    weight_prepack: bool = Field(
        True, description="CPU: let tuning choose a blocked weight layout per kernel, repacked once at build time")
    threads: int = Field(0, ge=0, description="TVM runtime threads; 0 = the measurement setting")
    cc: str | None = Field(None, description="C++ compiler for export_library; None = host g++, or the Debian "
                           "cross compiler (e.g. aarch64-linux-gnu-g++) when the target triple is foreign")
    emulate: Literal["auto", "off", "required"] = Field(
        "auto", description="cross builds: run the library under qemu and compare with ONNX Runtime; auto = when "
        "qemu and the target's TVM runtime are present (else a note says why not), required = fail otherwise")
    cross_runtime: str | None = Field(
        None, description="folder with the target architecture's TVM runtime (compress tvm-runtime ARCH); "
        "None = $COMPRESS_TVM_CROSS_RUNTIME or <cache>/tvm-runtime/ARCH-tvmVERSION")

    rpc: str | None = Field(
        None, description="run and time the build on the device through TVM RPC: 'HOST:PORT' of `python -m "
        "tvm.exec.rpc_server` there, or 'tracker:HOST:PORT/KEY'; the report's device figures then come from it")

    @field_validator("rpc")
    @classmethod
    def _rpc_form(cls, v: str | None) -> str | None:
        if v is not None:
            from ._tvm_rpc import parse_rpc

            parse_rpc(v)
        return v

    def canonical(self) -> dict[str, Any]:
        """Where the build is timed does not change it: ``rpc`` stays out of the cache key."""
        return {k: v for k, v in super().canonical().items() if k != "rpc"}

    def for_profile(self, profile: Any) -> TvmConfig:
        """Compile for the profile's device (its TVM tag / target JSON) unless the recipe names a target."""
        spec = profile.tvm_target_json()
        if self.target is not None or spec is None:
            return self
        return type(self).model_validate({**self.model_dump(), "target": spec})

    @field_validator("target")
    @classmethod
    def _target_has_kind(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("kind"), str) and not isinstance(v.get("tag"), str):
            raise ValueError("a TVM target JSON needs a 'kind' string, e.g. {kind = 'llvm', mcpu = 'znver3'}, or a "
                             "TVM target 'tag', e.g. {tag = 'raspberry-pi/4b-aarch64'}")
        return v


# LLVM CPU names that carry exactly an ISA level, for a host whose ISA is forced (COMPRESS_ISA): the
# detected CPU's own name would let LLVM emit instructions the forced CPU lacks. Most capable first.
_MCPU_BY_ISA: tuple[tuple[tuple[str, ...], str], ...] = (
    (("amx_tile", "amx_int8"), "sapphirerapids"),
    (("avx512_vnni",), "cascadelake"),
    (("avx512f",), "skylake-avx512"),
    (("avx_vnni",), "alderlake"),
    (("avx2", "fma"), "haswell"),
    (("avx",), "sandybridge"),
)


def mcpu_for_isa(isa: list[str], arch: str) -> str | None:
    """An LLVM ``mcpu`` whose features are within ``isa`` (None: leave LLVM's generic CPU)."""
    if arch not in ("x86_64", "amd64"):
        return None
    for needs, mcpu in _MCPU_BY_ISA:
        if all(f in isa for f in needs):
            return mcpu
    return "x86-64"


def _static_folded(model: Any, shapes: dict[str, list[int]]) -> Any:
    """The graph with its inputs fixed to ``shapes`` and the shape arithmetic folded away.

    TVM builds static shapes anyway; a graph with symbolic axes (a transformer's batch and sequence)
    computes its reshapes from Shape/Gather/Concat at run time, and the Relax importer refuses a Reshape
    whose input shape it cannot infer. ONNX Runtime's basic optimizations (constant folding, redundant
    node elimination: standard operators only) fold those once the inputs are static. A graph without
    symbolic input axes is returned as it is.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits and i.name in shapes]
    if all(d.HasField("dim_value") and d.dim_value > 0 for i in graph_inputs for d in i.type.tensor_type.shape.dim):
        return model
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for inp in static.graph.input:
        if inp.name in shapes and inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name], strict=False):
                d.Clear()
                d.dim_value = int(v)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "static.onnx", Path(tmp) / "folded.onnx"
        onnx.save(static, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception:  # ORT cannot load it: let the importer judge the graph as it is
            return static
        folded = onnx.load(str(dst))
    if any(n.domain not in ("", "ai.onnx") for n in folded.graph.node):
        return static  # folding brought in ORT-only operators: TVM could not import those
    return folded


def _arch_of(target_json: dict[str, Any]) -> str:
    """The CPU architecture a build for ``target_json`` runs on (its triple's, else this machine's)."""
    triple = str(target_json.get("mtriple") or "")
    arch = triple.split("-")[0] if triple else str(cpu_info()["arch"])
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch.lower())


def host_target_json() -> dict[str, Any]:
    """The target for this CPU: LLVM's name for the host CPU as mcpu, and the cores we may use.

    With the ISA forced (``COMPRESS_ISA``), mcpu comes from the forced flags instead, so the code
    runs on the CPU the user named and not only on this one.
    """
    from tvm.target import codegen

    info = cpu_info()
    cpu = mcpu_for_isa(info["isa"], str(info["arch"]).lower()) if info["isa_forced"] else \
        codegen.llvm_get_system_cpu()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {"kind": "llvm", "num-cores": cores}
    if cpu and cpu != "generic":
        out["mcpu"] = cpu
    return out


def make_target(spec: dict[str, Any]) -> Any:
    """Build a ``tvm.target.Target``, turning TVM's refusal into a RecipeError naming the key."""
    import tvm

    try:
        target = tvm.target.Target(spec)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # TVM maps its errors onto these
        raise RecipeError(f"target 'tvm': TVM rejected target = {json.dumps(spec)}: {str(e).strip().splitlines()[-1]}; "
                          "give a valid TVM target JSON (e.g. {kind = 'llvm', mcpu = 'znver3'}) or drop "
                          "'target' to use this host") from e
    if target.kind.name == "llvm":
        from tvm.target import codegen

        mcpu = spec.get("mcpu")
        triple = str(spec.get("mtriple") or codegen.llvm_get_system_triple())
        if mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple):
            raise RecipeError(f"target 'tvm': LLVM does not know mcpu = '{mcpu}' for triple {triple}; see "
                              "`llc -mcpu=help`, or drop 'mcpu' (the host's CPU is used when 'target' is unset)")
    return target


def is_foreign(target: Any) -> bool:
    """True when the target's code cannot run on this machine (another CPU architecture or a GPU)."""
    if target.kind.name != "llvm":
        return True
    triple = str(target.attrs.get("mtriple", "") or "")
    return bool(triple) and not triple.startswith(platform.machine())


def unsupported_ops(model: Any) -> list[str]:
    """Every ONNX op (with its domain, count and first node) the Relax frontend has no converter for.

    The frontend's own check stops at the first graph and ignores domains (a custom-domain op with a
    standard name would be converted as if it were standard), so walk all subgraphs too.
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"Constant", "If"}
    missing: Counter[tuple[str, str]] = Counter()
    first: dict[tuple[str, str], str] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            domain = node.domain or "ai.onnx"
            if node.op_type not in known or domain not in ("ai.onnx", "ai.onnx.ml"):
                missing[(domain, node.op_type)] += 1
                first.setdefault((domain, node.op_type), node.name or "<unnamed>")
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return [f"{op} (domain {dom}, {n}x, first node '{first[(dom, op)]}')" for (dom, op), n in sorted(missing.items())]


class TvmRunner(DeviceClockRunner):
    """Runs an exported TVM library with the Relax VM; NumPy in, NumPy out."""

    def __init__(self, lib_path: Path, inputs: tuple[InputSpec, ...], threads: int = 0) -> None:
        import tvm
        from tvm import relax

        if threads:
            # TVM thread pool: (affinity mode 1 = "big" cores, which on a homogeneous CPU is all of them, threads).
            tvm.get_global_func("runtime.config_threadpool")(1, threads)
        self.inputs = inputs
        self.input_names = [s.name for s in inputs]
        self.device_ms: list[float] = []  # stays empty: a local build is timed by the host only
        self._lib = tvm.runtime.load_module(str(lib_path))
        self._dev = tvm.cpu(0)
        self._vm = relax.VirtualMachine(self._lib, self._dev)
        self._tensor = tvm.runtime.tensor

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [self._tensor(x, self._dev) for x in static_feeds(self.inputs, feeds, "tvm runner")]
        out = self._vm["main"](*args)
        return [np.asarray(o.numpy()) for o in _flatten(out)]

    def close(self) -> None:
        self._vm = None
        self._lib = None


def _flatten(out: Any) -> list[Any]:
    if hasattr(out, "numpy"):
        return [out]
    flat: list[Any] = []
    for o in out:
        flat.extend(_flatten(o))
    return flat


def verified_library(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The library in ``folder`` and its manifest, after checking its SHA-256 against the manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"{folder} holds no {MANIFEST}: not a library exported by the tvm target; refusing to load "
                         "a shared library this tool did not build")
    manifest = json.loads(manifest_path.read_text())
    lib = folder / manifest["library"]
    if not lib.exists() or sha256_file(lib) != manifest["library_sha256"]:
        raise InputError(f"{lib} does not match the SHA-256 recorded in {manifest_path} when it was built; "
                         "refusing to load it (rebuild with the tvm target)")
    return lib, manifest


def load_exported(folder: Path, threads: int = 0) -> TvmRunner:
    """Load a library this target exported (``folder`` holds ``model.so`` and ``tvm.json``).

    The library's SHA-256 must match the one recorded when it was built: loading a shared library
    runs its code, so a swapped or foreign ``.so`` is refused rather than executed.
    """
    lib, manifest = verified_library(folder)
    if manifest.get("foreign"):
        # Its outputs may have been checked under qemu at build time; latency under emulation means nothing.
        built_for = manifest["target"].get("mtriple") or manifest["target"].get("kind")
        raise TargetUnavailable(f"cross-compiled for {built_for}: cannot run on this "
                                f"{platform.machine()} machine; measure it on the device (its outputs are checked "
                                "under emulation at build time when qemu is present)")
    return TvmRunner(lib, tuple(InputSpec.from_json(s) for s in manifest["inputs"]), threads)


@register_target(TvmConfig)
class TvmTarget(TargetBase):
    name = "tvm"
    # Device timing: a remote device (rpc) reports its own clock per call; a local build reports none.
    caps = TargetCaps(consumes=ONNX, device_timing=True, requires=("tvm",),
                      install="pip install 'compress-pipeline[tvm]'",
                      bundle=BundleSpec("model.so", "apache-tvm", "a compiled TVM library is loaded by the runtime "
                                        "of the TVM version that compiled it", pinned=("apache-tvm-ffi",)))

    def __init__(self, config: TvmConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        try:
            import tvm  # noqa: F401
        except ImportError as e:
            return f"apache-tvm is not installed ({e}); pip install 'compress-pipeline[tvm]'"
        ffi = module_version("apache-tvm-ffi")
        if ffi.startswith(_BAD_FFI_PREFIX):
            return (f"apache-tvm-ffi {ffi} segfaults in tvm.ir.save_json, which tuning needs; "
                    "pip install apache-tvm-ffi==0.1.14.post1")
        if self.config.tuning_trials > 0:
            try:
                import xgboost  # noqa: F401
            except ImportError:
                return "MetaSchedule's cost model needs xgboost; pip install xgboost-cpu (or set tuning_trials = 0)"
        return None

    def check_config(self) -> None:
        """Before any pass runs: let TVM judge a given target JSON (RecipeError naming it), and with ``rpc``
        check that the device answers and runs a library this TVM builds (TargetUnavailable, one line)."""
        if self.config.target is None and self.config.rpc is None:
            return
        try:
            import tvm  # noqa: F401
        except ImportError:  # unavailable_reason says why; nothing to check the JSON against
            return
        target = make_target(dict(self.config.target or host_target_json()))
        if self.config.rpc is not None:
            import tempfile

            from ._tvm_rpc import check_device, parse_rpc

            with tempfile.TemporaryDirectory() as tmp:
                check_device(parse_rpc(self.config.rpc), target,
                             lambda ex, path: self._export(ex, path, target, is_foreign(target)), Path(tmp))

    def fingerprint(self) -> dict[str, Any]:
        info = cpu_info()
        return {"apache-tvm": module_version("apache-tvm"), "apache-tvm-ffi": module_version("apache-tvm-ffi"),
                "xgboost": module_version("xgboost-cpu") if module_version("xgboost") == "absent"
                else module_version("xgboost"),
                "target": self.config.target or "host", "cpu": info["model"], "isa": info["isa"],
                "cores": info["affinity_cores"]}

    # -- compile ---------------------------------------------------------------------------------

    def compile(self, art: Artifact, ctx: Any) -> Artifact:
        import onnx
        from google.protobuf.message import DecodeError

        cfg = self.config
        log = ctx.log if getattr(ctx, "progress", True) else (lambda _msg: None)
        reason = self.unavailable_reason()
        if reason:
            raise TargetUnavailable(f"target 'tvm': {reason}")
        t_all = time.perf_counter()
        try:
            model = onnx.load(str(art.path / "model.onnx"))
        except (OSError, ValueError, DecodeError) as e:
            raise InputError(f"target 'tvm': cannot read {art.path / 'model.onnx'}: {e}") from e
        missing = unsupported_ops(model)
        if missing:
            raise BuildError(f"target 'tvm': the TVM {module_version('apache-tvm')} Relax ONNX frontend has no "
                             f"converter for {len(missing)} op(s) in this model: {'; '.join(missing)}. Remove or "
                             "replace them before export, or use another target (onnxruntime)")

        spec = cfg.target or host_target_json()
        target = make_target(spec)
        foreign = is_foreign(target)
        if foreign and cfg.tuning_trials > 0 and cfg.rpc is None:
            raise RecipeError(f"target 'tvm': cannot tune for {json.dumps(spec)} on this {platform.machine()} machine "
                              "(candidates must run where they are measured); set rpc to the device's TVM RPC server "
                              "to tune there, set tuning_trials = 0 for a cross build, or build on the device")
        # Where the build is timed is said by the measurement (rpc is not part of this build's cache key).
        notes: list[str] = []
        quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
                        for n in model.graph.node)

        mod, params = self._import(model, art)
        tuning: dict[str, Any] = {"trials_requested": cfg.tuning_trials, "time_budget_s": cfg.tuning_time_s}
        layout: str = cfg.layout
        try:
            # Bound and laid out once: task extraction and the build must see the same module.
            bound, layout, int8 = self._bound(mod, params, notes, quantized)
            if cfg.tuning_trials == 0:
                notes.append("UNTUNED: compiled without MetaSchedule tuning; TVM's untuned CPU code is far "
                             "slower than a tuned build (ResNet-18: ~1,700 ms vs ~24 ms ONNX Runtime) and its "
                             "latency is not representative of TVM. Set tuning_trials > 0")
                log("tvm: tuning_trials = 0: untuned build (not representative)")
                import tvm

                ex = tvm.compile(bound, target=target)
                tuning["status"] = "untuned"
            else:
                ex, tuning = self._compile_tuned(bound, target, ctx, log, notes, tuning)
                tuning["layout"] = layout
        except (RecipeError, BuildError, TargetUnavailable):
            raise
        except Exception as e:  # TVM surfaces C++ failures as RuntimeError, ValueError, InternalError, ...
            what = "quantized (QDQ) model" if quantized else "model"
            hint = ("; TVM could not lower its quantize/dequantize ops for this target: use the onnxruntime target "
                    "for the quantized model" if quantized else "")
            raise BuildError(f"target 'tvm': TVM failed to compile this {what} for {json.dumps(spec)}: "
                             f"{type(e).__name__}: {_first_line(e)}{hint}") from e

        out = ctx.new_dir("tvm")
        t0 = time.perf_counter()
        self._export(ex, out / LIBRARY, target, foreign)
        export_s = time.perf_counter() - t0
        emulated = self._emulated_check(out / LIBRARY, art, target, quantized, ctx, log, notes) if foreign else None
        manifest = {
            "producer": "compress targets/tvm_compiler.py",
            "library": LIBRARY,
            "library_sha256": sha256_file(out / LIBRARY),
            "inputs": [s.to_json() for s in art.inputs],
            "target": json.loads(str(target)),
            "foreign": foreign,
            "tvm": module_version("apache-tvm"),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        # TVM builds the static shapes of art.inputs (tuning needs them), so the ONNX model's dynamic
        # batch does not carry over: the compiled artifact's facts say so (the metadata keeps a copy).
        meta: dict[str, Any] = {"target": "tvm", "dynamic_batch": False, "target_notes": list(notes), "tvm": {
            "target": manifest["target"], "tuned": tuning.get("status") != "untuned", "layout": layout,
            "label": "untuned" if tuning.get("status") == "untuned" else "tuned",
            "tuning": tuning, "library_sha256": manifest["library_sha256"],
            "quantized": quantized, "int8": int8, "cross_compiled": foreign, "export_s": round(export_s, 3),
            "compile_s": round(time.perf_counter() - t_all, 3),
            "static_input_shapes": [list(s.shape) for s in art.inputs],
            "emulated_check": emulated,
            "notes": notes,
        }}
        return Artifact("compiled", out, sha256_files(out), art.inputs, metadata=meta,
                        facts=art.known_facts().evolve(dynamic_batch=False, arch=_arch_of(manifest["target"])))

    def _import(self, model: Any, art: Artifact) -> tuple[Any, dict[Any, Any]]:
        from tvm.relax.frontend import detach_params
        from tvm.relax.frontend.onnx import from_onnx

        shapes = {s.name: list(s.shape) for s in art.inputs}
        dtypes = {s.name: s.dtype for s in art.inputs}
        model = _static_folded(model, shapes)
        try:
            mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
        except Exception as e:  # the frontend raises whatever its converters raise
            raise BuildError(f"target 'tvm': the Relax ONNX frontend failed on this model: "
                             f"{type(e).__name__}: {_first_line(e)}") from e
        mod, detached = detach_params(mod)
        # Weights come back as a list in parameter order, after the graph inputs.
        n_in = len(art.inputs)
        weights = dict(zip(mod["main"].params[n_in:], detached.get("main", []), strict=True))
        return mod, weights

    def _bound(self, mod: Any, params: dict[Any, Any], notes: list[str],
               quantized: bool) -> tuple[Any, str, dict[str, Any] | None]:
        """The weights bound as constants, a Q/DQ model's convolutions on integers (``int8_arith``) and
        convolutions in the configured layout. Also returns the layout used (NCHW, with a note, when
        ConvertLayout fails on this graph) and, for a Q/DQ model, what ran on integers."""
        import tvm
        from tvm import relax

        from ._tvm_int8 import integer_convolutions
        from ._tvm_tuning import layout_passes

        bound = relax.transform.BindParams("main", params)(mod) if params else mod
        int8: dict[str, Any] | None = None
        if quantized:
            int8 = {"arith": self.config.int8_arith}
            if self.config.int8_arith == "integer":
                bound, counts = integer_convolutions(bound)
                int8["integer_convolutions"] = counts.pop("integer", 0)
                int8["float_convolutions"] = counts
                if counts:
                    notes.append(f"INT8: {sum(counts.values())} dequantized convolution(s) left in float: "
                                 + ", ".join(f"{why} ({n})" for why, n in sorted(counts.items())))
        layout = self.config.layout
        if layout == "NCHW":
            return bound, layout, int8
        try:
            return tvm.transform.Sequential(layout_passes(layout))(bound), layout, int8
        except Exception as e:  # TVM's ConvertLayout fails on some graphs (e.g. ONNX Min/Max over a stack)
            notes.append(f"layout {layout} could not be applied ({_first_line(e)}); built in NCHW, as exported")
            return bound, "NCHW", int8

    def _compile_tuned(self, bound: Any, target: Any, ctx: Any, log: Any,
                       notes: list[str], tuning: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import tvm
        from tvm.s_tir import meta_schedule as ms

        from ._tvm_tuning import (
            TuneStats,
            TuningDatabase,
            compile_tuned,
            import_cpu_tensor_intrinsics,
            make_tuner_parts,
            model_key,
            prepare_passes,
            tvm_logs_to,
        )
        from ._tvm_worker import shared_worker

        cfg = self.config
        prepack = cfg.weight_prepack and target.kind.name == "llvm"
        if target.kind.name == "llvm":
            import_cpu_tensor_intrinsics()
        root = Path(cfg.database) if cfg.database else Path(ctx.cache.root) / "tvm-db"
        t0 = time.perf_counter()
        with target:
            prepared = tvm.transform.Sequential(prepare_passes(target, prepack))(bound)
        tasks = ms.relax_integration.extract_tasks(prepared, target)
        if not tasks:
            raise BuildError("target 'tvm': MetaSchedule found no tunable task in this model")
        # Records timed on a device are another database than records timed here (same target JSON or not).
        timed_on = "local"
        if cfg.rpc is not None:
            from ._tvm_rpc import parse_rpc

            a = parse_rpc(cfg.rpc)
            timed_on = f"rpc:{a.key}" if a.key is not None else f"rpc:{a.host}:{a.port}"
        db = TuningDatabase.open(root, target, log, timed_on)
        notes.extend(db.notes)
        key = model_key(tasks)
        with db.locked():
            db.verify_records(target, log)
            notes.extend(n for n in db.notes if n not in notes)
            spent = db.spent(key)
            left_trials = cfg.tuning_trials - int(spent["trials"])
            left_time = None if cfg.tuning_time_s is None else cfg.tuning_time_s - float(spent["seconds"])
            stats = TuneStats()
            tune_s = 0.0
            worker_info: dict[str, Any] = {}
            reused = _kernels_tuned_elsewhere(db.ms_database(), tasks, left_trials) \
                if cfg.reuse_kernels and not spent["trials"] else []
            to_tune = [t for i, t in enumerate(tasks) if i not in reused]
            if reused:
                log(f"tvm: {len(reused)} of {len(tasks)} tasks already tuned in the shared database (same kernel "
                    f"shape, by another model or recipe): not tuned again")
            if not to_tune:
                log(f"tvm: all {len(tasks)} tasks already tuned in the shared database: no tuning needed")
                status = "reused"
            elif left_trials <= 0 or (left_time is not None and left_time <= 0):
                log(f"tvm: {len(tasks)} tasks; the tuning database already holds {spent['trials']} trials "
                    f"({spent['seconds']:.0f} s) for this model and target: no tuning needed")
                status = "reused"
            else:
                log(f"tvm: tuning {len(to_tune)} tasks for {left_trials} trials"
                    + (f" or {left_time:.0f} s" if left_time is not None else "")
                    + (f" (continuing: {spent['trials']} trials already in the database)" if spent["trials"] else ""))
                deadline = None if left_time is None else time.perf_counter() + left_time
                logs = db.path / "logs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{key[:12]}"
                debug = logging.getLogger("compress").isEnabledFor(logging.DEBUG)
                log(f"tvm: each candidate is built and timed in a worker process, killed after "
                    f"{cfg.candidate_timeout_s:g} s; TVM's log: {logs}")
                remote = self._remote_tuning(target, log)
                t_tune = time.perf_counter()
                worker = shared_worker(cfg.threads, db.path / "tuning-worker.log")
                starts_before, kills_before = worker.starts, worker.kills
                worker.prestart()  # its imports overlap the first search step
                builder, runner, callback, scheduler = make_tuner_parts(
                    stats, to_tune, deadline, log, _EVALUATOR, left_trials, worker, cfg.candidate_timeout_s,
                    cfg.scheduler, remote)
                with tvm_logs_to(logs / "console.log", debug), self._remote_sessions_closed(worker, remote):
                    # An int, not MetaSchedule's default "physical": that probes the CPU count in a fresh
                    # worker process per task (import tvm each time), which cost ~5 s per task here.
                    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                        to_tune, str(logs), strategy=_strategy(left_trials, len(to_tune)),
                        seed=getattr(ctx, "seed", 0), num_threads=_search_threads(target))
                    ms.tune_tasks(
                        tasks=contexts, task_weights=weights, work_dir=str(logs),
                        max_trials_global=left_trials, num_trials_per_iter=_per_iter(left_trials, len(to_tune)),
                        builder=builder, runner=runner, database=db.ms_database(),
                        measure_callbacks=[callback, ms.measure_callback.UpdateCostModel()],
                        task_scheduler=scheduler,
                    )
                worker_info = {"worker_starts": worker.starts - starts_before,
                               "worker_kills": worker.kills - kills_before,
                               "worker_start_s": [round(x, 2) for x in worker.start_s[starts_before:]],
                               "log_dir": str(logs)}
                tune_s = time.perf_counter() - t_tune
                db.record_spent(key, stats.trials, tune_s, len(to_tune))
                status = "tuned"
                failed = stats.build_errors + stats.run_errors + stats.timeouts + stats.crashes
                if stats.candidates and failed >= stats.candidates:
                    raise BuildError(f"target 'tvm': every one of {stats.candidates} tuning candidates failed to "
                                     f"build or run; see the logs in {logs} or set tuning_trials = 0")
            covered = sum(1 for t in tasks if _has_record(db.ms_database(), t.dispatched[0]))
            ex, prepacked = compile_tuned(db.ms_database(), bound, target, prepack)
        total = db.spent(key)
        if covered < len(tasks):
            notes.append(f"{len(tasks) - covered} of {len(tasks)} TVM tasks have no tuning record (budget too small "
                         "to reach them) and run untuned code; raise tuning_trials")
        tuning.update({
            "status": status, "database": str(db.path), "tasks": len(tasks), "tasks_with_records": covered,
            # Fused kernels run per inference (a task's weight is how often its kernel is called).
            "kernel_calls": int(sum(t.weight for t in tasks)),
            "tasks_reused_from_database": len(reused),
            "trials_this_run": stats.trials, "trials_in_database": int(total["trials"]),
            "tuning_s_this_run": round(tune_s, 2), "build_errors": stats.build_errors, "run_errors": stats.run_errors,
            "builder_s": round(stats.build_s, 2), "runner_s": round(stats.run_s, 2),
            "worker_s": round(stats.worker_s, 2),
            "search_s": round(max(0.0, tune_s - stats.worker_s - sum(worker_info.get("worker_start_s", []))), 2),
            "candidates_measured": stats.candidates, "candidates_skipped": stats.skipped,
            "candidate_timeouts": stats.timeouts, "worker_crashes": stats.crashes,
            "candidate_timeout_s": cfg.candidate_timeout_s, "slowest_candidate_s": round(stats.slowest_candidate_s, 2),
            "candidates_timed_on": _timed_on(cfg.rpc) if stats.candidates else None,
            "candidates_timed_remotely": stats.remote_timed,
            **worker_info,
            "stopped_by_time": stats.stopped_by_time, "model_key": key, "scheduler": cfg.scheduler,
            "batches_per_task": {to_tune[i].task_name: stats.visits.count(i) for i in sorted(set(stats.visits))},
            "weight_prepack": prepack, "prepacked_kernels": prepacked,
            "best_kernels_ms": round(sum(to_tune[i].weight * s for i, s in stats.best_s.items()) * 1e3, 4),
            "prepare_s": round(time.perf_counter() - t0 - tune_s, 2),
        })
        return ex, tuning

    def _remote_tuning(self, target: Any, log: Any) -> dict[str, Any] | None:
        """With ``rpc``: what the tuning worker needs to time candidates on the device (None: time them here).
        This process's own session with the device is closed first: a plain RPC server serves one at a time."""
        if self.config.rpc is None:
            return None
        from ._tvm_rpc import parse_rpc, release

        addr = parse_rpc(self.config.rpc)
        release(addr)
        log(f"tvm: tuning candidates are timed on the device, the {addr.describe()}")
        return {"rpc": self.config.rpc, "cc": self._cross_cc(target) if is_foreign(target) else self.config.cc}

    @staticmethod
    @contextlib.contextmanager
    def _remote_sessions_closed(worker: Any, remote: dict[str, Any] | None) -> Iterator[None]:
        """After tuning, the worker closes its device session, so the measurement can open one."""
        try:
            yield
        finally:
            if remote is not None:
                from ._tvm_worker import close_remote_sessions

                worker.call(close_remote_sessions, (), 60.0)  # past it, the worker is killed: closed too

    def _cross_cc(self, target: Any) -> str:
        if self.config.cc is not None:
            return self.config.cc
        triple = str(target.attrs.get("mtriple", ""))
        cc = next((v for k, v in _CROSS_CXX.items() if triple.startswith(k)), None)
        if cc is None:
            raise BuildError(f"target 'tvm': no known cross compiler for triple '{triple}'; set cc = '<compiler>'")
        return cc

    def _emulated_check(self, lib: Path, art: Artifact, target: Any, quantized: bool, ctx: Any, log: Any,
                        notes: list[str]) -> dict[str, Any] | None:
        """Run a cross-compiled library under qemu and compare it with ONNX Runtime (see _tvm_emulate)."""
        from ._tvm_emulate import arch_of, default_runtime_dir, emulated_check

        cfg = self.config
        if cfg.emulate == "off" or target.kind.name != "llvm":
            return None
        triple = str(target.attrs.get("mtriple", ""))
        arch = arch_of(triple) or triple.split("-")[0]
        runtime = Path(cfg.cross_runtime) if cfg.cross_runtime else default_runtime_dir(arch, Path(ctx.cache.root))
        log(f"tvm: checking the {arch} library under emulation")
        res = emulated_check(lib, art.path / "model.onnx", list(art.inputs), triple, self._cross_cc(target),
                             runtime, seed=getattr(ctx, "seed", 0), min_cosine=0.999 if quantized else 0.9999)
        if res["status"] == "mismatch":
            raise BuildError(f"target 'tvm': the cross-compiled {arch} library is wrong: {res['reason']}")
        if res["status"] == "not run":
            if cfg.emulate == "required":
                raise BuildError(f"target 'tvm': emulate = 'required' but the {arch} library could not be run: "
                                 f"{res['reason']}")
            notes.append(f"cross-compiled for {arch}; outputs not checked under emulation: {res['reason']}")
        else:
            notes.append(f"cross-compiled for {arch}; checked under {res['emulator']} against ONNX Runtime: max abs "
                         f"diff {res['max_abs_diff']:.3g}, cosine {res['cosine']:.6f}")
        return res

    def _export(self, ex: Any, path: Path, target: Any, foreign: bool) -> None:
        cc = self._cross_cc(target) if foreign else self.config.cc
        if cc is not None and shutil.which(cc) is None:
            raise BuildError(f"target 'tvm': C++ compiler '{cc}' not found on PATH; on Debian: apt-get install "
                             f"{'g++-' + cc.removesuffix('-g++') if cc.endswith('-g++') else cc}")
        try:
            if cc is None:
                ex.export_library(str(path))
            else:
                from tvm.support import cc as tvm_cc

                ex.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
        except Exception as e:  # the compiler driver raises RuntimeError with its stderr
            raise BuildError(f"target 'tvm': export_library to {path} failed: {_first_line(e)}") from e

    # -- run ---------------------------------------------------------------------------------------

    def runner(self, compiled: Artifact, threads: int = 0) -> TvmRunner | RpcTvmRunner:
        if compiled.metadata.get("target") != "tvm":
            raise InputError(f"artifact {compiled.path} was not compiled by the tvm target "
                             f"(target={compiled.metadata.get('target')!r}); the tvm runner only loads its own builds")
        if self.config.rpc is not None:
            from ._tvm_rpc import RpcTvmRunner, parse_rpc

            lib, manifest = verified_library(compiled.path)
            return RpcTvmRunner(lib, tuple(InputSpec.from_json(x) for x in manifest["inputs"]),
                                parse_rpc(self.config.rpc))
        return load_exported(compiled.path, self.config.threads or threads)


def _timed_on(rpc: str | None) -> str:
    if rpc is None:
        return "this machine"
    from ._tvm_rpc import parse_rpc

    return parse_rpc(rpc).describe()


def _search_threads(target: Any) -> int:
    cores = target.attrs.get("num-cores")
    return int(cores) if cores else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _per_iter(trials: int, n_tasks: int) -> int:
    """Candidates per batch: small enough that the first round reaches every task within the budget."""
    return max(4, min(64, trials // max(1, n_tasks)))


def _strategy(trials: int, n_tasks: int) -> Any:
    """Evolutionary search sized to the batch: the default population of 512 costs ~10 s of search per
    batch on two cores, which is wasted when a small budget measures a handful of candidates per task."""
    from tvm.s_tir import meta_schedule as ms

    population = min(512, max(128, 16 * _per_iter(trials, n_tasks)))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2))


def _kernels_tuned_elsewhere(database: Any, tasks: list[Any], trials: int) -> list[int]:
    """Tasks whose kernel the shared database already holds at least this run's per-task share of trials for.

    Asked only for a model the database has not tuned before (no ledger entry): its kernels of the same
    shape as another model's (ResNet blocks, a recipe's pruned and unpruned layers alike) are tuned once.
    A model tuned again with a larger budget continues on all its tasks instead.
    """
    share = max(1, trials // max(1, len(tasks)))
    return [i for i, t in enumerate(tasks) if _has_record(database, t.dispatched[0], share)]


def _has_record(database: Any, mod: Any, at_least: int = 1) -> bool:
    """Whether the database holds at least ``at_least`` valid records for ``mod``'s workload."""
    return bool(database.has_workload(mod)
                and len(database.get_top_k(database.commit_workload(mod), at_least)) >= at_least)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # TVM errors put the message last, after a C++ traceback.
    msg = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else repr(e))
    return msg[:400]


def check_library_elf(path: Path) -> dict[str, str]:
    """Architecture of an ELF shared library (for cross builds we cannot run here), via ``file``-free parsing."""
    data = Path(path).read_bytes()[:20]
    if data[:4] != b"\x7fELF":
        raise BuildError(f"{path} is not an ELF file")
    machine = int.from_bytes(data[18:20], "little")
    names = {0x3E: "x86-64", 0xB7: "aarch64", 0x28: "arm", 0xF3: "riscv"}
    return {"class": "64-bit" if data[4] == 2 else "32-bit", "machine": names.get(machine, hex(machine))}


def run_in_fresh_process(folder: Path, inputs: dict[str, np.ndarray], python: str | None = None) -> list[np.ndarray]:
    """Load an exported library in a new Python process and run it once (the deployment check)."""
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "in.npz", **inputs)  # type: ignore[arg-type]  # numpy stubs type **kwds as bool
        code = ("import sys, numpy as np; from compress.targets.tvm_compiler import load_exported; "
                "r = load_exported(sys.argv[1]); x = dict(np.load(sys.argv[2])); "
                "np.savez(sys.argv[3], *r.infer(x))")
        proc = subprocess.run([python or sys.executable, "-c", code, str(folder), str(Path(tmp) / "in.npz"),
                               str(Path(tmp) / "out.npz")], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            raise BuildError(f"exported library {folder} failed in a fresh process: {proc.stderr.strip()[-800:]}")
        with np.load(Path(tmp) / "out.npz") as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]


@register_command("tvm-runtime", help="fetch another CPU's TVM runtime, so cross-compiled libraries are checked "
                  "under qemu", arguments=[
                      (("arch",), {"help": "target CPU architecture, e.g. aarch64"}),
                      (("--dest",), {"help": "folder to write (default: $COMPRESS_TVM_CROSS_RUNTIME or "
                                              "<cache>/tvm-runtime/ARCH-tvmVERSION)"}),
                      (("--cache",), {"help": "cache folder"})])
def tvm_runtime_command(a: Any) -> int:
    """``compress tvm-runtime ARCH``: print the folder holding that CPU's TVM runtime (fetched once)."""
    import sys

    from compress.cache import Cache

    from ._tvm_emulate import default_runtime_dir, fetch_runtime

    dest = Path(a.dest) if a.dest else default_runtime_dir(a.arch, Cache(Path(a.cache) if a.cache else None).root)
    fetch_runtime(a.arch, dest, log=lambda m: print(m, file=sys.stderr))
    print(dest)
    return 0

