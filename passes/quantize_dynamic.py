"""Dynamic INT8 for linear-heavy models: INT8 weights, activations quantized per batch at run time."""

from __future__ import annotations

import shutil
from typing import Any, Literal

from compress.artifact import Artifact, sha256_files
from compress.errors import PassError
from compress.manager import PassContext
from compress.parity import ParityOptions
from compress.registry import register_pass

from ._quant_common import auto_scheme_env, choose_scheme, name_nodes, pass_parity, refuse_quantized, weighted_nodes
from .quantize_int8 import _quiet, preprocess


class QuantizeDynamic(ParityOptions):
    """ONNX Runtime dynamic quantization (MatMulInteger / DynamicQuantizeLinear); needs no calibration data."""

    kind: Literal["quantize.dynamic"] = "quantize.dynamic"
    ops: tuple[Literal["MatMul", "Gemm", "Conv"], ...] = ("MatMul", "Gemm")
    per_channel: bool = False
    keep_float: tuple[str, ...] = ()
    scheme: Literal["auto", "u8s8", "u8s8_reduce_range"] = "auto"

    def cache_env(self) -> dict[str, str]:
        """Facts outside the config that change the output (for the cache key)."""
        return auto_scheme_env(self.scheme)


@register_pass(QuantizeDynamic, consumes="onnx", produces="onnx")
def quantize_dynamic(art: Artifact, cfg: QuantizeDynamic, ctx: PassContext) -> Artifact:
    """Dynamic INT8 of MatMul/Gemm weights (ONNX Runtime); activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    src = art.path / "model.onnx"
    model = name_nodes(onnx.load(str(src)))
    refuse_quantized(model, "quantize.dynamic")
    nodes = weighted_nodes(model, cfg.ops)
    if not nodes:
        raise PassError(f"quantize.dynamic: the model has no {'/'.join(cfg.ops)} layers with constant weights; "
                        "dynamic quantization has nothing to do (use quantize.int8 for conv nets)")
    # Dynamic activations are always u8, so the u8 x s8 saturation question is the same as for static.
    scheme, why = choose_scheme(cfg.scheme)
    work = ctx.new_dir("qdwork")
    pre = work / "pre.onnx"
    preprocess(src, pre)
    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    try:
        with _quiet():
            ort_quantize_dynamic(str(pre), str(out), op_types_to_quantize=list(cfg.ops), per_channel=cfg.per_channel,
                                 reduce_range=scheme == "u8s8_reduce_range", weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(cfg.keep_float))
    except Exception as e:  # ORT raises ValueError/RuntimeError/its own Fail types
        raise PassError(f"onnxruntime quantize_dynamic failed: {str(e).splitlines()[0][:300]}") from e
    shutil.rmtree(work, ignore_errors=True)
    q = onnx.load(str(out))
    ops: dict[str, int] = {}
    for n in q.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    n_int = ops.get("MatMulInteger", 0) + ops.get("ConvInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)
    if n_int == 0:
        raise PassError("quantize.dynamic: ONNX Runtime quantized no layer")
    p = pass_parity("quantize.dynamic", art, out, ctx, cfg.tolerance("int8"), "int8", cfg.parity_samples,
                    "keep the sensitive layers in float with keep_float (or scheme='u8s8_reduce_range' on a CPU "
                    "without VNNI)")
    info: dict[str, Any] = {"scheme": scheme, "scheme_reason": why, "quantizable_nodes": len(nodes),
                            "integer_nodes": n_int, "per_channel": cfg.per_channel, "parity": p,
                            "notes": [f"dynamic INT8 of {n_int} layer(s); scheme: {why}",
                                      "dynamic INT8 uses MatMulInteger/DynamicQuantizeLinear (standard ONNX ops); "
                                      "other runtimes may import them less efficiently than QDQ"]}
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.dynamic": info})
