"""ONNX Runtime on the CPU."""

from __future__ import annotations

import shutil
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from compress.core.artifact import ONNX, Artifact, sha256_files
from compress.core.capabilities import BundleSpec, TargetCaps
from compress.core.config import Draft, TargetConfig
from compress.core.fingerprint import cpu_info
from compress.core.registry import register_target
from compress.errors import BuildError

from .base import TargetBase, module_version


class OnnxRuntimeConfig(TargetConfig):
    """ONNX Runtime, CPU execution provider. The compiled artifact is the graph after ORT's optimizations."""

    kind: Literal["onnxruntime"] = "onnxruntime"
    threads: int = Field(0, ge=0, description="intra-op threads; 0 = the measurement setting")
    optimization: Literal["basic", "extended", "all"] = "all"
    # Spinning threads steal the CPU from the next session when several are timed side by side
    # (PLATFORM.md measured 3x); off by default, and the report says so.
    allow_spinning: bool = False
    # Causal LMs: generate with speculative decoding, the variant named here (an ONNX decoder of the same run
    # with the same tokenizer) drafting ``draft_k`` tokens per verifier pass (compress.measuring.speculative).
    draft: str | None = Field(None, description="variant of this run that drafts for speculative decoding")
    draft_k: int = Field(4, ge=1, le=64, description="tokens the draft proposes per verifier pass")
    # Dynamic draft length: the draft also stops after a proposal whose probability is below this (output unchanged).
    # 0.3 measured best of 0.3-0.7 on SmolLM2-135M (benchmarks/results/llm-speculative.md); 0 = always draft_k tokens.
    draft_threshold: float = Field(0.3, ge=0, lt=1, description="speculative decoding: the draft stops after a "
                                   "proposal whose softmax probability is below this (0 = always draft_k)")

    @model_validator(mode="after")
    def _threshold_needs_draft(self) -> OnnxRuntimeConfig:
        if "draft_threshold" in self.model_fields_set and self.draft is None:
            raise ValueError("draft_threshold applies to speculative decoding: also name the drafting variant "
                             "(draft = \"VARIANT\") or remove draft_threshold")
        return self

    def speculative_draft(self) -> Draft | None:
        return Draft(self.draft, self.draft_k, self.draft_threshold) if self.draft else None

    def canonical(self) -> dict[str, Any]:
        # Without a draft the threshold does nothing: left out, so builds keep the cache keys they had before it.
        out = super().canonical()
        if self.draft is None:
            out.pop("draft_threshold", None)
        return out


_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OrtRunner:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def close(self) -> None:
        self.session = None


@register_target(OnnxRuntimeConfig)
class OnnxRuntimeTarget(TargetBase):
    name = "onnxruntime"
    caps = TargetCaps(consumes=ONNX, default=True, op_domains=frozenset({"com.microsoft"}), generates=True,
                      requires=("onnxruntime",), install="pip install onnxruntime",
                      report_notes=("ONNX Runtime measured with intra-op thread spinning off unless the target "
                                    "config says otherwise",),
                      bundle=BundleSpec("model.onnx", "onnxruntime",
                                        "the model was saved after this ONNX Runtime version's graph optimizations, "
                                        "which may use its own fused operators"))

    def __init__(self, config: OnnxRuntimeConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return f"onnxruntime is not installed ({e}); pip install onnxruntime"
        return None

    def fingerprint(self) -> dict[str, Any]:
        return {"onnxruntime": module_version("onnxruntime"), "cpu": cpu_info()["model"], "isa": cpu_info()["isa"]}

    def _options(self, threads: int, level: str) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.config.threads or threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.config.allow_spinning else "0")
        so.log_severity_level = 3
        return so

    def compile(self, art: Artifact, ctx: Any) -> Artifact:
        import onnxruntime as ort

        out = ctx.new_dir("ort")
        if art.known_facts().decoder is not None:
            return self._compile_decoder(art, out)
        so = self._options(1, _LEVELS[self.config.optimization])
        so.optimized_model_filepath = str(out / "model.onnx")
        try:
            ort.InferenceSession(str(art.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BuildError(f"onnxruntime could not load the model: {str(e).splitlines()[0][:300]}") from e
        return Artifact("compiled", out, sha256_files(out), art.inputs,
                        metadata={"target": "onnxruntime", "optimization": self.config.optimization,
                                  "allow_spinning": self.config.allow_spinning})

    def _compile_decoder(self, art: Artifact, out: Any) -> Artifact:
        """A decoder with its KV cache is built as it is: its exporter already fused attention and norms, and
        saving an optimized copy would serialize its weights (hundreds of MB) into one protobuf. Its files are
        copied into the build, and the session is opened once here so a model ONNX Runtime refuses fails
        at build time, not while timing."""
        import onnxruntime as ort

        for f in art.path.iterdir():
            if f.is_file() and f.name != "artifact.json":
                shutil.copy2(f, out / f.name)  # a copy: a hard link would tie the build to the cache entry
        try:
            ort.InferenceSession(str(out / "model.onnx"), self._options(1, "ORT_DISABLE_ALL"),
                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BuildError(f"onnxruntime could not load the decoder: {str(e).splitlines()[0][:300]}") from e
        return Artifact("compiled", out, sha256_files(out), art.inputs,
                        metadata={"target": "onnxruntime", "decoder": True, "allow_spinning": False})

    def lm_runner(self, compiled: Artifact, threads: int) -> Any:
        """The decoder's generate loop with the KV cache kept in ONNX Runtime values."""
        from compress.measuring.generation import OrtLMRunner

        return OrtLMRunner(compiled.path, self.config.threads or threads, name=self.name)

    def runner(self, compiled: Artifact, threads: int = 0) -> OrtRunner:
        import onnxruntime as ort

        # Already optimized at compile time; re-running the passes at load is cheap and idempotent.
        so = self._options(threads, _LEVELS[self.config.optimization])
        sess = ort.InferenceSession(str(compiled.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        return OrtRunner(sess)
