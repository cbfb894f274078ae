"""OpenVINO runtime: compiles ONNX (FP32, FP16 weights, QDQ INT8) for the CPU (or an Intel GPU).

The compiled artifact is the device blob ``compiled_model.export_model()`` writes, stored in the
content-addressed cache (verified on every read) beside a manifest naming the OpenVINO version
and device it was built for. Blobs are only ever loaded from that cache entry: a blob from
elsewhere is never imported.

Inference precision defaults to ``f32``: on CPUs with BF16 or AMX the device's own default is
bf16, which changes numerics; ``inference_precision = "auto"`` opts into the device default, and
the report says which precision ran.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import Field

from compress.core.artifact import ONNX, Artifact, sha256_files
from compress.core.capabilities import TargetCaps
from compress.core.config import TargetConfig
from compress.core.fingerprint import cpu_info
from compress.core.registry import register_target
from compress.errors import BuildError, InputError, RecipeError

from .base import TargetBase, module_version

# The device capability each inference precision needs (OPTIMIZATION_CAPABILITIES).
_PRECISION_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
# Operators beyond standard ONNX that OpenVINO's ONNX frontend converts, checked here (OpenVINO 2026.4) on the
# graphs this product makes: the decoder exporter's fused attention and norms, INT4/INT8 MatMulNBits and the
# packed embedding's GatherBlockQuantized (logits within 1% of ONNX Runtime's at batch 1). Any other is refused
# at plan time, naming it; a frontend that still fails at build time says which operator in one line.
OV_ONNX_OPS = frozenset({"com.microsoft:GroupQueryAttention", "com.microsoft:SkipSimplifiedLayerNormalization",
                         "com.microsoft:SimplifiedLayerNormalization", "com.microsoft:MatMulNBits",
                         "com.microsoft:GatherBlockQuantized"})


class OpenVinoConfig(TargetConfig):
    """OpenVINO runtime on the CPU (or an Intel GPU): latency/throughput hint, threads, streams, precision."""

    kind: Literal["openvino"] = "openvino"
    device: Literal["CPU", "GPU"] = "CPU"
    performance_hint: Literal["latency", "throughput"] = "latency"
    threads: int = Field(0, ge=0, description="inference threads; 0 = the measurement setting")
    streams: int = Field(0, ge=0, description="parallel inference streams; 0 = what the performance hint picks")
    inference_precision: Literal["f32", "bf16", "f16", "auto"] = Field(
        "f32", description="precision of compute; auto = the device default (bf16 on CPUs with AMX/BF16)")


class OvRunner:
    def __init__(self, compiled: Any, input_names: list[str]) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = input_names

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(feeds)
        return [np.array(self.request.get_output_tensor(i).data, copy=True)
                for i in range(len(self.compiled.outputs))]

    def close(self) -> None:
        self.request = None
        self.compiled = None


def _cause(e: Exception) -> str:
    """The line of an OpenVINO exception that says what failed (its first lines name C++ source files): the
    operators it has no conversion for, else the last line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    said = next((ln for ln in lines if "No conversion rule" in ln or "not supported" in ln or "only supported" in ln),
                lines[-1] if lines else type(e).__name__)
    return said.lstrip("- ")[:300]


@lru_cache(maxsize=1)
def _core() -> Any:
    """One OpenVINO Core per process: creating one enumerates devices and loads plugins."""
    import openvino as ov

    return ov.Core()


@register_target(OpenVinoConfig)
class OpenVinoTarget(TargetBase):
    name = "openvino"
    caps = TargetCaps(consumes=ONNX, op_domains=OV_ONNX_OPS, generates=True, requires=("openvino",),
                      install="pip install 'compress-pipeline[openvino]'")

    def __init__(self, config: OpenVinoConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return f"openvino is not installed ({e}); pip install 'compress-pipeline[openvino]'"
        devices = _core().available_devices
        if not any(d.split(".")[0] == self.config.device for d in devices):
            return f"OpenVINO sees no {self.config.device} device here (devices: {', '.join(devices) or 'none'})"
        return None

    def fingerprint(self) -> dict[str, Any]:
        info = cpu_info()
        return {"openvino": module_version("openvino"), "device": self._device_name(), "cpu": info["model"],
                "isa": info["isa"]}

    def _device_name(self) -> str:
        try:
            return str(_core().get_property(self.config.device, "FULL_DEVICE_NAME"))
        except Exception:  # OpenVINO raises RuntimeError subclasses; the fingerprint stays usable
            return self.config.device

    def check_config(self) -> None:
        """Refuse a precision the device cannot run, before any model is read."""
        p = self.config.inference_precision
        if p == "auto":
            return
        caps = [str(c) for c in _core().get_property(self.config.device, "OPTIMIZATION_CAPABILITIES")]
        if _PRECISION_CAPABILITY[p] not in caps:
            raise RecipeError(f"target 'openvino': inference_precision = '{p}' is not supported by "
                              f"{self.config.device} here (it offers {', '.join(caps)}); use 'f32' or 'auto'")

    def parity_precision(self, art: Artifact, model_precision: str) -> str:
        """The tolerance class a build is judged at (``quality.parity``): bf16/f16 compute (or the device default,
        which is bf16 on CPUs with AMX/BF16) is judged at FP16 tolerance."""
        if model_precision == "fp32" and self.config.inference_precision != "f32":
            return "fp16"
        return model_precision

    def _properties(self, threads: int) -> dict[str, Any]:
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.config.performance_hint.upper()}
        n = self.config.threads or threads
        if n and self.config.device == "CPU":
            props["INFERENCE_NUM_THREADS"] = n
        if self.config.streams:
            props["NUM_STREAMS"] = self.config.streams
        if self.config.inference_precision != "auto":
            props["INFERENCE_PRECISION_HINT"] = self.config.inference_precision
        return props

    def compile(self, art: Artifact, ctx: Any) -> Artifact:
        self.check_config()
        core = _core()
        decoder = art.known_facts().decoder is not None
        try:
            model = core.read_model(str(art.path / "model.onnx"))
            compiled = core.compile_model(model, self.config.device, self._properties(1))
            if not decoder:
                blob = compiled.export_model()
                blob = blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob)  # BytesIO in 2026.x
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line messages
            raise BuildError(f"openvino could not compile the model for {self.config.device}: {_cause(e)}") from e
        out = ctx.new_dir("openvino")
        if decoder:
            self._save_decoder(model, art, out)
        else:
            (out / "model.blob").write_bytes(blob)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        ran = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        manifest = {"openvino": module_version("openvino"), "device": self.config.device,
                    "device_name": self._device_name(), "inputs": [i.get_any_name() for i in compiled.inputs],
                    "inference_precision": ran, "performance_hint": self.config.performance_hint,
                    "decoder": decoder}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        notes = [f"OpenVINO {manifest['openvino']} on {manifest['device_name']}, inference precision {ran}, "
                 f"{self.config.performance_hint} hint"]
        return Artifact("compiled", out, sha256_files(out), art.inputs,
                        metadata={"target": "openvino", "openvino": manifest, "target_notes": notes})

    @staticmethod
    def _save_decoder(model: Any, art: Artifact, out: Any) -> None:
        """A decoder with its KV cache is built as its ONNX files (with decoder.json and the tokenizer): a device
        blob would fix its dynamic shapes, and OpenVINO IR cannot be read back (its GroupQueryAttention is a
        frontend extension op, "unsupported opset: extension" on reading). The generate loop (``lm_runner``)
        compiles it with the run's threads; compiling it here already refused what OpenVINO cannot run."""
        for f in art.path.iterdir():
            if f.is_file() and f.name != "artifact.json":
                shutil.copy2(f, out / f.name)  # a copy: a hard link would tie the build to the cache entry

    def _check_manifest(self, compiled: Artifact) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads((compiled.path / "manifest.json").read_text())
        if manifest.get("openvino") != module_version("openvino") or manifest.get("device") != self.config.device:
            raise InputError(f"{compiled.path}: built with OpenVINO {manifest.get('openvino')} for "
                             f"{manifest.get('device')}; this is OpenVINO {module_version('openvino')} on "
                             f"{self.config.device}; rebuild it (delete the cache entry)")
        return manifest

    def lm_runner(self, compiled: Artifact, threads: int) -> Any:
        """The decoder's generate loop (``targets._ov_generation``): batch 1, the cache kept in OpenVINO tensors."""
        self._check_manifest(compiled)
        return self.lm_runner_for_folder(compiled.path, threads)

    def lm_runner_for_folder(self, folder: Any, threads: int) -> Any:
        """The generate loop over any folder holding an ONNX decoder and its decoder.json (``compress generate``)."""
        from ._ov_generation import OvLMRunner

        try:
            return OvLMRunner.load(folder, _core(), self.config.device, self._properties(threads), self.name)
        except RuntimeError as e:  # OpenVINO's own exceptions derive from RuntimeError
            raise BuildError(f"openvino could not load the decoder {folder}: {_cause(e)}") from e

    def runner(self, compiled: Artifact, threads: int = 0) -> OvRunner:
        manifest = self._check_manifest(compiled)
        core = _core()
        props = self._properties(threads)
        with open(compiled.path / "model.blob", "rb") as f:
            comp = core.import_model(f.read(), self.config.device, props)
        return OvRunner(comp, list(manifest["inputs"]))
