"""Weight compression of linear layers with NNCF (``nncf.compress_weights``, ONNX backend).

Beside ``quantize.weight_only`` (ONNX Runtime's block quantizer): NNCF adds a mixed ratio (a
fraction of the layers in INT4, the most sensitive rest in INT8) and, with calibration data,
AWQ and scale estimation. INT8 weights come out as DequantizeLinear on INT8 initializers, INT4
as ONNX Runtime's MatMulNBits.

Found on NNCF 3.4 with ONNX Runtime 1.32 (checked here): Conv weights compressed by NNCF's
ONNX backend fail in ONNX Runtime (per-axis scale shape), so only MatMul/Gemm are compressed;
``int4_asym`` writes MatMulNBits zero points that ONNX Runtime refuses, so it is not offered.
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

from ._quant_common import GroupSize, calibration_batches, name_nodes, pass_parity, refuse_quantized, weighted_nodes
from .quantize_nncf import quiet_nncf

# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_float": ""}


class QuantizeNncfWeights(LayerSelecting, ParityOptions):
    """INT8/INT4 weights of MatMul/Gemm layers with NNCF (ratio, group size, AWQ, scale estimation)."""

    kind: Literal["quantize.nncf_weights"] = "quantize.nncf_weights"
    mode: Literal["int8_sym", "int8_asym", "int4_sym"] = "int8_asym"
    group_size: GroupSize = Field(32, description="INT4: weights per quantization group (power of two)")
    ratio: float = Field(1.0, gt=0, le=1, description="INT4: fraction of layers in INT4, the rest INT8")
    awq: bool = Field(False, description="INT4: activation-aware scaling (needs data)")
    scale_estimation: bool = Field(False, description="INT4: data-aware scale search (needs data)")
    samples: int = Field(64, ge=8, le=10_000, description="calibration samples for awq / scale_estimation")

    skip: LayerSelector = skip_field("kept in float (MatMul/Gemm nodes with weights; 'first' / 'last' among them)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS

    def data_needed(self) -> str | None:
        return "any" if self.awq or self.scale_estimation else None

    @model_validator(mode="after")
    def _int4_only(self) -> QuantizeNncfWeights:
        if not self.mode.startswith("int4"):
            extra = [k for k in ("awq", "scale_estimation") if getattr(self, k)] + (
                ["ratio"] if self.ratio != 1.0 else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to INT4 modes only; set mode = 'int4_sym' or drop them")
        return self


@register_pass(QuantizeNncfWeights, consumes="onnx", produces="onnx", compare_precision="int8-weights-nncf")
def quantize_nncf_weights(art: Artifact, cfg: QuantizeNncfWeights, ctx: PassContext) -> Artifact:
    """NNCF weight compression of MatMul/Gemm layers; activations stay float."""
    import nncf
    import onnx

    src = art.path / "model.onnx"
    model = name_nodes(onnx.load(str(src)))
    refuse_quantized(model, "quantize.nncf_weights")
    nodes = weighted_nodes(model, ("MatMul", "Gemm"))
    if not nodes:
        raise PassError("quantize.nncf_weights: the model has no MatMul/Gemm layer with constant weights; weight "
                        "compression has nothing to do (use quantize.int8 or quantize.nncf for conv nets)")
    linear = [ly for ly in onnx_layers(model) if ly.name in set(nodes)]
    skipped = cfg.skip.select(linear, "quantize.nncf_weights", eligible=nodes, what="MatMul/Gemm node")
    dataset = None
    if cfg.awq or cfg.scale_estimation:
        data = getattr(ctx, "data", None)
        if data is None:
            raise PassError("quantize.nncf_weights: awq / scale_estimation need calibration data; set `data` in "
                            "the recipe or turn them off")
        name = art.inputs[0].name
        dataset = nncf.Dataset(calibration_batches(data, cfg.samples, "quantize.nncf_weights", 8, batch=1),
                               lambda x: {name: x})
    convs = sorted({n.op_type for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")})
    scope = nncf.IgnoredScope(names=skipped, types=convs, validate=False)
    int4 = cfg.mode.startswith("int4")
    try:
        with quiet_nncf():
            q = nncf.compress_weights(
                model, mode=nncf.CompressWeightsMode(cfg.mode), ignored_scope=scope, dataset=dataset,
                group_size=cfg.group_size if int4 else None, ratio=cfg.ratio if int4 else None,
                awq=cfg.awq if int4 else None, scale_estimation=cfg.scale_estimation if int4 else None,
                all_layers=True if int4 else None)
    except Exception as e:  # NNCF raises many types from its graph builders and algorithms
        raise PassError(f"quantize.nncf_weights: NNCF failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}") from e
    # NNCF writes MatMulNBits (domain com.microsoft) without declaring the domain; onnx.checker refuses that.
    declared = {o.domain for o in q.opset_import}
    for domain in sorted({n.domain for n in q.graph.node if n.domain not in ("", "ai.onnx")} - declared):
        q.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    onnx.save_model(q, str(out))
    ops: dict[str, int] = {}
    for n in q.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    compressed = ops.get("MatMulNBits", 0) + ops.get("DequantizeLinear", 0)
    if compressed == 0:
        raise PassError("quantize.nncf_weights: NNCF compressed no layer")
    precision = "int4" if int4 else "int8"
    parity = pass_parity(cfg.kind, art, out, ctx, cfg.tolerance(precision), precision, cfg.parity_samples,
                         "use int8, a smaller group_size, a lower ratio, or skip")
    info: dict[str, Any] = {
        "engine": "nncf", "mode": cfg.mode, "group_size": cfg.group_size if int4 else None,
        "ratio": cfg.ratio if int4 else None, "awq": cfg.awq, "scale_estimation": cfg.scale_estimation,
        "linear_nodes": len(nodes), "compressed_tensors": compressed, "matmulnbits": ops.get("MatMulNBits", 0),
        "kept_float": skipped, "parity": parity,
        "notes": [f"NNCF {cfg.mode} weights on {compressed} tensor(s) of {len(nodes)} MatMul/Gemm layer(s)"
                  + (f", group {cfg.group_size}, INT4 ratio {cfg.ratio}" if int4 else "")
                  + (f"; Conv layers left float ({', '.join(convs)}: NNCF's ONNX weight compression of "
                     "convolutions does not run on ONNX Runtime)" if convs else ""),
                  f"output cosine vs its input model: {parity['cosine']:.4f}"]}
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.nncf_weights": info},
                    facts=art.known_facts().lower_precision(precision).evolve(quantization="weight_only"))
