"""Apache TVM (Relax) on the CPU, tuned with MetaSchedule.

ONNX goes through the Relax ONNX frontend, is compiled with ``tvm.compile`` (untuned) or over a
MetaSchedule tuning database (tuned; ``_tvm_build.tune_and_compile``, with weights prepacked into
the layouts tuning chose), exported as a shared library and run with the Relax VM. Untuned CPU
code is far from usable (PLATFORM.md: ~1,700 ms against ~24 ms for ONNX Runtime on ResNet-18), so
an untuned build says so in its metadata notes.

The tuning database lives on disk (default ``<cache>/tvm-db``), one directory per (TVM version,
target), so a second run of the same model, from any recipe, spends no tuning time, and records
tuned by another TVM version or for another target are never applied (see ``_tvm_tuning``, ``_tvm_build``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.core.artifact import ONNX, Artifact, InputSpec, sha256_file, sha256_files
from compress.core.capabilities import BundleSpec, TargetCaps
from compress.core.config import TargetConfig
from compress.core.fingerprint import cpu_info
from compress.core.registry import register_command, register_target
from compress.errors import BuildError, InputError, RecipeError, TargetUnavailable

from ._tvm_frontend import first_line, import_onnx, unsupported_ops
from ._tvm_runner import LIBRARY, MANIFEST, TvmRunner, load_exported, unbound_threads, verified_library
from .base import TargetBase, module_version

if TYPE_CHECKING:
    from ._tvm_rpc import RpcTvmRunner

# apache-tvm-ffi 0.1.15.x segfaults in tvm.ir.save_json, which every tuning record goes through.
_BAD_FFI_PREFIX = "0.1.15"
# Cross toolchains from Debian's packages (g++-aarch64-linux-gnu etc.), by target triple prefix.
_CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "arm": "arm-linux-gnueabihf-g++", "riscv64": "riscv64-linux-gnu-g++"}


class TvmProfileSettings(BaseModel):
    """What a hardware profile says about the tvm target: a profile file's ``[targets.tvm]`` table (``tag``,
    ``target``, ``gpu_tag``), or its old top-level keys ``tvm_tag``, ``tvm_target``, ``tvm_gpu_tag``. The build
    compiles for the tag's attributes, overridden by ``target``'s; neither = this machine's CPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tag: str | None = Field(None, description="TVM target tag (tvm.target.list_tags())")
    target: dict[str, Any] | None = Field(None, description="TVM target JSON, over the tag's attributes")
    gpu_tag: str | None = Field(None, description="TVM tag of the device's GPU (recorded; the tvm target builds "
                                "CPU code)")

    @field_validator("target")
    @classmethod
    def _no_tag_inside(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "tag" in v:
            raise ValueError("give the tag as tag (tvm_tag), not inside the target JSON")
        return v

    @model_validator(mode="after")
    def _kind_or_tag(self) -> TvmProfileSettings:
        if self.target is not None and self.tag is None and not isinstance(self.target.get("kind"), str):
            raise ValueError("the target JSON needs a 'kind' string (e.g. kind = 'llvm') unless a tag is given")
        return self

    @classmethod
    def of(cls, profile: Any) -> TvmProfileSettings:
        """The settings ``profile`` gives the tvm target (none: this machine's CPU)."""
        return cls.model_validate(profile.targets.get("tvm") or {})

    def target_json(self, cores: int | None) -> dict[str, Any] | None:
        """The target JSON a tvm target without ``target`` compiles for (None: this machine's CPU)."""
        if self.tag is None and self.target is None:
            return None
        spec: dict[str, Any] = {"tag": self.tag} if self.tag else {}
        spec.update(self.target or {})
        if cores is not None and "num-cores" not in spec:
            spec["num-cores"] = cores
        return spec


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
        "sums, exactly ONNX Runtime's QLinearConv arithmetic (targets/_tvm_rewrites.py), 1.7x slower than float on "
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
        spec = TvmProfileSettings.of(profile).target_json(profile.cores)
        if self.target is not None or spec is None:
            return self
        return type(self).model_validate({**self.model_dump(), "target": spec})

    @classmethod
    def check_profile_settings(cls, settings: dict[str, Any], arch: str) -> None:
        """A profile's ``[targets.tvm]`` (or its old top-level ``tvm_tag`` / ``tvm_target`` / ``tvm_gpu_tag``)."""
        try:
            spec = TvmProfileSettings.model_validate(settings)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
        triple = str((spec.target or {}).get("mtriple", ""))
        if triple and not triple.startswith(arch):
            raise ValueError(f"target.mtriple {triple!r} is not an {arch} triple")

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
        reason = self.unavailable_reason()
        if reason:
            raise TargetUnavailable(f"target 'tvm': {reason}")
        with unbound_threads():  # the build runs TVM's pool in this process and starts workers that inherit it
            return self._compile(art, ctx)

    @staticmethod
    def _read(art: Artifact) -> Any:
        """The ONNX model, refused in one line when unreadable or when the frontend lacks any of its ops."""
        import onnx
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(str(art.path / "model.onnx"))
        except (OSError, ValueError, DecodeError) as e:
            raise InputError(f"target 'tvm': cannot read {art.path / 'model.onnx'}: {e}") from e
        missing = unsupported_ops(model)
        if missing:
            raise BuildError(f"target 'tvm': the TVM {module_version('apache-tvm')} Relax ONNX frontend has no "
                             f"converter for {len(missing)} op(s) in this model: {'; '.join(missing)}. Remove or "
                             "replace them before export, or use another target (onnxruntime)")
        return model

    def _compile(self, art: Artifact, ctx: Any) -> Artifact:
        cfg = self.config
        log = ctx.log if getattr(ctx, "progress", True) else (lambda _msg: None)
        t_all = time.perf_counter()
        model = self._read(art)
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

        mod, params = import_onnx(model, art.inputs)
        ex, tuning, layout, int8 = self._lower(mod, params, target, spec, quantized, ctx, log, notes)

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

    def _lower(self, mod: Any, params: dict[Any, Any], target: Any, spec: dict[str, Any], quantized: bool, ctx: Any,
               log: Any, notes: list[str]) -> tuple[Any, dict[str, Any], str, dict[str, Any] | None]:
        """The executable (untuned, or tuned over the database), the tuning figures, the layout built and what
        ran on integers; TVM's own failures become one BuildError line."""
        cfg = self.config
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
                from ._tvm_build import tune_and_compile

                ex, tuning = tune_and_compile(bound, target, cfg, ctx, log, notes, tuning,
                                              self._remote_tuning(target, log))
                tuning["layout"] = layout
        except (RecipeError, BuildError, TargetUnavailable):
            raise
        except Exception as e:  # TVM surfaces C++ failures as RuntimeError, ValueError, InternalError, ...
            what = "quantized (QDQ) model" if quantized else "model"
            hint = ("; TVM could not lower its quantize/dequantize ops for this target: use the onnxruntime target "
                    "for the quantized model" if quantized else "")
            raise BuildError(f"target 'tvm': TVM failed to compile this {what} for {json.dumps(spec)}: "
                             f"{type(e).__name__}: {first_line(e)}{hint}") from e
        return ex, tuning, layout, int8

    def _bound(self, mod: Any, params: dict[Any, Any], notes: list[str],
               quantized: bool) -> tuple[Any, str, dict[str, Any] | None]:
        """The weights bound as constants, a Q/DQ model's convolutions on integers (``int8_arith``) and
        convolutions in the configured layout. Also returns the layout used (NCHW, with a note, when
        ConvertLayout fails on this graph) and, for a Q/DQ model, what ran on integers."""
        import tvm
        from tvm import relax

        from ._tvm_rewrites import integer_convolutions, layout_passes

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
            notes.append(f"layout {layout} could not be applied ({first_line(e)}); built in NCHW, as exported")
            return bound, "NCHW", int8

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
            raise BuildError(f"target 'tvm': export_library to {path} failed: {first_line(e)}") from e

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


@register_command("tvm-runtime", help="fetch another CPU's TVM runtime, so cross-compiled libraries are checked "
                  "under qemu", arguments=[
                      (("arch",), {"help": "target CPU architecture, e.g. aarch64"}),
                      (("--dest",), {"help": "folder to write (default: $COMPRESS_TVM_CROSS_RUNTIME or "
                                              "<cache>/tvm-runtime/ARCH-tvmVERSION)"}),
                      (("--cache",), {"help": "cache folder"})])
def tvm_runtime_command(a: Any) -> int:
    """``compress tvm-runtime ARCH``: print the folder holding that CPU's TVM runtime (fetched once)."""
    import sys

    from compress.core.cache import Cache

    from ._tvm_emulate import default_runtime_dir, fetch_runtime

    dest = Path(a.dest) if a.dest else default_runtime_dir(a.arch, Cache(Path(a.cache) if a.cache else None).root)
    fetch_runtime(a.arch, dest, log=lambda m: print(m, file=sys.stderr))
    print(dest)
    return 0

