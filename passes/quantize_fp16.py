"""FP16: float16 weights and compute, float32 inputs and outputs kept.

Uses ONNX Runtime's own float16 converter (``onnxruntime.transformers.float16``,
the same code as onnxconverter-common's), so no extra package is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from compress.core.artifact import Artifact, sha256_files
from compress.core.layers import LayerSelecting, LayerSelector, onnx_layers, skip_field
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError
from compress.quality.parity import ParityOptions

from ._quant_common import name_nodes, pass_parity, quiet, weighted_nodes

# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_ops": "type:"}


class QuantizeFp16(LayerSelecting, ParityOptions):
    """Convert weights and compute to float16; graph inputs/outputs stay float32."""

    kind: Literal["quantize.fp16"] = "quantize.fp16"
    keep_io_types: bool = True
    skip: LayerSelector = skip_field("kept in float32 (e.g. 'type:LayerNormalization'; 'first' / 'last': the first / "
                                     "last weighted node)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS


@register_pass(QuantizeFp16, consumes="onnx", produces="onnx", compare_precision="fp16")
def quantize_fp16(art: Artifact, cfg: QuantizeFp16, ctx: PassContext) -> Artifact:
    """Float16 weights/compute with float32 I/O; checked against FP32 on ONNX Runtime."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src = art.path / "model.onnx"
    model = name_nodes(onnx.load(str(src)))  # every node named, so skip can name any of them
    kept = cfg.skip.select(onnx_layers(model), "quantize.fp16", eligible=weighted_nodes(model), what="node")
    try:
        with quiet():
            m16 = convert_float_to_float16(model, keep_io_types=cfg.keep_io_types,
                                           op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=kept)
    except Exception as e:  # the converter raises ValueError/RuntimeError on unsupported graphs
        raise PassError(f"quantize.fp16: float16 conversion failed: {str(e).splitlines()[0][:300]}") from e
    # The converter appends the input Casts at the end of the node list; ONNX needs topological order.
    from onnxruntime.transformers.onnx_model import OnnxModel

    om = OnnxModel(m16)
    om.topological_sort()
    m16 = om.model
    try:
        onnx.checker.check_model(m16)
    except onnx.checker.ValidationError as e:
        raise PassError(f"quantize.fp16: the float16 graph fails onnx.checker: {str(e).splitlines()[0]}") from e
    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    onnx.save_model(m16, str(out))
    n16 = sum(1 for t in m16.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    if n16 == 0:
        raise PassError("quantize.fp16: no float32 weight was converted; the model has nothing to run in float16")

    # What ONNX Runtime's CPU provider does with it: ops without an fp16 CPU kernel get Cast nodes
    # around them (compute falls back to fp32). Count them in ORT's optimized graph.
    opt = out_dir / "ort_probe.onnx"
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(opt)
    try:
        ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises NotImplemented when an fp16 op has no CPU kernel at all
        raise PassError(f"quantize.fp16: onnxruntime (CPU) cannot load the float16 model: "
                        f"{str(e).splitlines()[0][:300]}; keep those ops in float32 with skip "
                        "(e.g. skip = [\"type:<Op>\"])") from e
    og = onnx.load(str(opt))
    opt.unlink()
    # ORT inserts Casts around ops that lack a float16 CPU kernel and then folds the weight Casts, so
    # the float16 initializers left after its optimizations show how much really runs in float16.
    n16_ort = sum(1 for t in og.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)

    p = pass_parity("quantize.fp16", art, out, ctx, cfg.tolerance("fp16"), "fp16", cfg.parity_samples,
                    "keep the overflowing ops in float32 with skip, or loosen min_cosine/atol")
    notes = [
        "precision fp16: float16 weights and compute, float32 inputs/outputs; targets without float16 "
        "support must refuse this artifact (its facts say precision fp16)",
        f"ONNX Runtime's CPU provider here keeps {n16_ort} of {n16} float16 weight tensors in float16 after its "
        "optimizations; the others are cast to float32 at load because their ops lack float16 CPU kernels, so "
        "compute runs mostly in float32: expect no speed-up on CPU (see benchmarks/results/quantize.md), only "
        "half-size weights on disk",
    ]
    info: dict[str, Any] = {"precision": "fp16", "fp16_initializers": n16, "keep_io_types": cfg.keep_io_types,
                            "kept_float": kept,
                            "ort_cpu_fp16_initializers": n16_ort, "parity": p, "notes": notes}
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs,
                    metadata={"quantize.fp16": info},
                    facts=art.known_facts().lower_precision("fp16"))
