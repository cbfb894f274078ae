"""Weight-only INT8/INT4 compression of linear (MatMul) layers, block-wise, with ONNX Runtime's quantizer.

Done on ONNX, not torch: the result must run on ONNX Runtime, whose MatMulNBits
kernel reads the packed blocks directly; a torch-side weight-only model has no
standard ONNX export form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.core.artifact import Artifact, sha256_files
from compress.core.layers import LayerSelecting, LayerSelector, onnx_layers, skip_field
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError
from compress.quality.parity import ParityOptions

from ._quant_common import GroupSize, name_nodes, pass_parity, quiet, refuse_quantized, weighted_nodes

# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_float": ""}


class QuantizeWeightOnly(LayerSelecting, ParityOptions):
    """Block-wise INT8/INT4 weights for MatMul layers; activations stay float."""

    kind: Literal["quantize.weight_only"] = "quantize.weight_only"
    bits: Literal[4, 8] = 4
    group_size: GroupSize = Field(32, description="weights per quantization block (power of two)")
    symmetric: bool = True
    format: Literal["matmulnbits", "qdq"] = "matmulnbits"
    skip: LayerSelector = skip_field("kept in float ('first' / 'last': the first / last MatMul with weights)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS
    # How block scales are chosen: round-to-nearest; HQQ (half-quadratic optimisation of scale and zero
    # point, no data); GPTQ (second-order error compensation on calibration text; decoders only here).
    algorithm: Literal["rtn", "hqq", "gptq"] = "rtn"
    # MatMulNBits' compute: None = float activations; 4 = INT8 activations (ONNX Runtime's fastest CPU
    # path for 4-bit weights, the genai builder's CPU default).
    accuracy_level: Literal[1, 2, 3, 4] | None = None
    # Decoders: the LM head (the largest and most output-sensitive MatMul) at 8 bits; None = as the rest.
    head_bits: Literal[4, 8] | None = None
    # Decoders: the token embedding (a Gather) at 4 bits as ONNX Runtime's GatherBlockQuantized; None = float32.
    # A tied embedding is untied first (its transposed LM-head weight becomes its own table), so the float copy
    # goes and the file shrinks by the embedding's size (SmolLM2: 113 MB).
    embedding_bits: Literal[4] | None = None
    # GPTQ: calibration windows from the run's text (never the held-out ones); one prefill each collects every
    # MatMul's input statistics (passes/decoder_gptq.py), so the cost is one forward per window plus the solve.
    calib_windows: int = Field(8, ge=1, le=256)
    # Decoders, GPTQ at 4 bits: this fraction of the MatMul layers (by count) at INT8 instead, those whose INT4 output
    # error on the calibration text (tr(E^T H E), E the rounding error, H = X^T X) is largest; mixed precision.
    int8_fraction: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _fmt(self) -> QuantizeWeightOnly:
        if self.algorithm != "rtn" and self.format != "matmulnbits":
            raise ValueError(f"algorithm={self.algorithm!r} needs format='matmulnbits'")
        if self.int8_fraction and (self.algorithm != "gptq" or self.bits != 4):
            raise ValueError("int8_fraction chooses INT8 layers from GPTQ's calibration statistics: it needs "
                             "algorithm = \"gptq\" and bits = 4")
        if self.bits == 8 and self.format == "qdq":
            raise ValueError("bits=8 needs format='matmulnbits' (ONNX Runtime's quantizer writes 8-bit blocks only "
                             "as MatMulNBits); use bits=4 for format='qdq'")
        return self

    def preflight(self, root: Any, text: Any) -> None:
        from .quantize_decoder import check_settings

        check_settings(self, root, text)


@register_pass(QuantizeWeightOnly, consumes="onnx", produces="onnx", compare_precision="int4-weights")
def quantize_weight_only(art: Artifact, cfg: QuantizeWeightOnly, ctx: PassContext) -> Artifact:
    """INT8/INT4 block-wise weight compression of MatMul layers (ONNX Runtime MatMulNBits or blocked QDQ)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    src = art.path / "model.onnx"
    if art.known_facts().decoder is not None:
        from .quantize_decoder import quantize_decoder_weights

        return quantize_decoder_weights(art, cfg, ctx)
    if cfg.algorithm != "rtn" or cfg.head_bits is not None or cfg.embedding_bits is not None:
        raise PassError(f"quantize.weight_only: algorithm={cfg.algorithm!r}, head_bits and embedding_bits apply to "
                        "decoder language models (model.task = \"causal-lm\"); use the defaults for this model")
    model = name_nodes(onnx.load(str(src)))
    refuse_quantized(model, "quantize.weight_only")
    nodes = weighted_nodes(model, ("MatMul",))
    if not nodes:
        gemms = weighted_nodes(model, ("Gemm",))
        hint = (f" (its {len(gemms)} Gemm layer(s) are not handled by weight-only quantization; use quantize.dynamic)"
                if gemms else "")
        raise PassError(f"quantize.weight_only: the model has no MatMul layers with constant weights{hint}")
    skipped = cfg.skip.select(onnx_layers(model), "quantize.weight_only", eligible=nodes, what="node")
    fmt = QuantFormat.QOperator if cfg.format == "matmulnbits" else QuantFormat.QDQ
    algo = DefaultWeightOnlyQuantConfig(block_size=cfg.group_size, is_symmetric=cfg.symmetric, bits=cfg.bits,
                                        quant_format=fmt, op_types_to_quantize=("MatMul",))
    try:
        with quiet():
            q = MatMulNBitsQuantizer(model, bits=cfg.bits, block_size=cfg.group_size, is_symmetric=cfg.symmetric,
                                     nodes_to_exclude=skipped, algo_config=algo)
            q.process()
    except Exception as e:  # ORT raises ValueError/NotImplementedError/AssertionError here
        raise PassError(f"quantize.weight_only: onnxruntime's MatMulNBits quantizer failed: "
                        f"{str(e).splitlines()[0][:300]}") from e
    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    qm = onnx.load(str(out))
    ops = [n.op_type for n in qm.graph.node]
    packed = ops.count("MatMulNBits") if cfg.format == "matmulnbits" else ops.count("DequantizeLinear")
    if packed == 0:
        raise PassError(f"quantize.weight_only: no MatMul was compressed (group_size={cfg.group_size} may exceed "
                        "the layers' input width, which must be at least one group)")
    precision = "int4" if cfg.bits == 4 else "int8"
    p = pass_parity("quantize.weight_only", art, out, ctx, cfg.tolerance(precision), precision, cfg.parity_samples,
                    f"with bits={cfg.bits}, group_size={cfg.group_size}: use bits=8 or a smaller group_size")
    notes = [f"weight-only INT{cfg.bits} (group {cfg.group_size}) on {packed} of {len(nodes)} MatMul layer(s); "
             "activations and compute stay float32"]
    if cfg.format == "matmulnbits":
        notes.append("format matmulnbits uses ONNX Runtime's com.microsoft MatMulNBits op: runs on ONNX Runtime only "
                     "(use format='qdq' for blocked DequantizeLinear in standard ONNX)")
    info: dict[str, Any] = {"bits": cfg.bits, "group_size": cfg.group_size, "format": cfg.format,
                            "compressed_layers": packed, "matmul_layers": len(nodes), "kept_float": skipped,
                            "parity": p,
                            "notes": notes}
    meta: dict[str, Any] = {"quantize.weight_only": info}
    facts = art.known_facts().lower_precision(precision).evolve(quantization="weight_only")
    if cfg.format == "matmulnbits":
        # Targets that do not implement ONNX Runtime's contrib ops refuse the model on this fact.
        facts = facts.evolve(required_ops=(*facts.required_ops, "com.microsoft:MatMulNBits"))
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata=meta, facts=facts)
