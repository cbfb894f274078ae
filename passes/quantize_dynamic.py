"""Dynamic INT8 for linear-heavy models: INT8 weights, activations quantized per batch at run time."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.core.artifact import Artifact, sha256_files
from compress.core.config import true_advice
from compress.core.int8_scheme import choose_scheme
from compress.core.layers import LayerSelecting, LayerSelector, onnx_layers, skip_field
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import AccuracyError, CompressError, PassError
from compress.quality.parity import ParityOptions

from ._quant_blame import skip_advice
from ._quant_common import (
    GUARD_MIN_COSINE,
    auto_scheme_env,
    fidelity_guard,
    float_nodes_note,
    guard_feeds,
    name_nodes,
    pass_parity,
    preprocess,
    quiet,
    refuse_quantized,
    transformer_float_nodes,
    weighted_nodes,
)

# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_float": ""}


class QuantizeDynamic(LayerSelecting, ParityOptions):
    """ONNX Runtime dynamic quantization (MatMulInteger / DynamicQuantizeLinear); needs no calibration data."""

    kind: Literal["quantize.dynamic"] = "quantize.dynamic"
    ops: tuple[Literal["MatMul", "Gemm", "Conv"], ...] = ("MatMul", "Gemm")
    # None (auto): per-channel weights for transformer graphs (per-tensor 7-bit weights lose too much on
    # their wide MatMuls), per-tensor otherwise.
    per_channel: bool | None = None
    skip: LayerSelector = skip_field("kept in float ('first' / 'last': the first / last quantizable node)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS
    scheme: Literal["auto", "u8s8", "u8s8_reduce_range"] = "auto"
    min_sample_cosine: float | None = Field(
        GUARD_MIN_COSINE, gt=0, le=1, description="fidelity guard: fail below this mean per-sample cosine to the "
        "input model (needs no labels); None = off")

    def cache_env(self) -> dict[str, str]:
        """Facts outside the config that change the output (for the cache key)."""
        return auto_scheme_env(self.scheme)


@register_pass(QuantizeDynamic, consumes="onnx", produces="onnx", compare_precision="int8-dynamic",
               guard_fields=("min_sample_cosine",))
def quantize_dynamic(art: Artifact, cfg: QuantizeDynamic, ctx: PassContext) -> Artifact:
    """Dynamic INT8 of MatMul/Gemm weights (ONNX Runtime); activations quantized at run time."""
    import onnx

    src = art.path / "model.onnx"
    if art.known_facts().decoder is not None:
        return _decoder(art, cfg, ctx)
    model = name_nodes(onnx.load(str(src)))
    refuse_quantized(model, "quantize.dynamic")
    nodes = weighted_nodes(model, cfg.ops)
    if not nodes:
        raise PassError(f"quantize.dynamic: the model has no {'/'.join(cfg.ops)} layers with constant weights; "
                        "dynamic quantization has nothing to do (use quantize.int8 for conv nets)")
    skipped = cfg.skip.select(onnx_layers(model), "quantize.dynamic", eligible=nodes, what="node")
    groups = transformer_float_nodes(model)
    per_channel = cfg.per_channel if cfg.per_channel is not None else groups is not None
    # Dynamic activations are always u8, so the u8 x s8 saturation question is the same as for static.
    scheme, why = choose_scheme(cfg.scheme)
    work = ctx.new_dir("qdwork")
    pre = work / "pre.onnx"
    preprocess(src, pre)
    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    _quantize(pre, out, cfg, per_channel, scheme, skipped)
    q = onnx.load(str(out))
    ops: dict[str, int] = {}
    for n in q.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    n_int = ops.get("MatMulInteger", 0) + ops.get("ConvInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)
    if n_int == 0:
        raise PassError("quantize.dynamic: ONNX Runtime quantized no layer")
    float_groups: dict[str, list[str]] = {"skip": skipped}
    if groups is not None:  # float anyway (dynamic INT8 only touches weighted layers); listed so users see them
        float_groups.update(groups)
    pc_why = ("set by the user" if cfg.per_channel is not None else
              "auto: transformer graph" if groups is not None else "auto: no attention in the graph")
    info: dict[str, Any] = {"scheme": scheme, "scheme_reason": why, "quantizable_nodes": len(nodes),
                            "integer_nodes": n_int, "per_channel": per_channel,
                            "per_channel_reason": pc_why,
                            "quantized": [n for n in nodes if n not in skipped], "float_nodes": float_groups,
                            "notes": [f"dynamic INT8 of {n_int} layer(s), "
                                      f"{'per-channel' if per_channel else 'per-tensor'} weights ({pc_why}); "
                                      f"scheme: {why}",
                                      "dynamic INT8 uses MatMulInteger/DynamicQuantizeLinear (standard ONNX ops); "
                                      "other runtimes may import them less efficiently than QDQ"]}
    if float_nodes_note(float_groups):
        info["notes"].append(float_nodes_note(float_groups))
    try:
        info["parity"], info["fidelity_guard"] = _checks(art, pre, out, cfg, ctx, per_channel)
    except (AccuracyError, PassError) as e:
        # Too far from the float model: say which layers it comes from and a skip seen to fix it (as quantize.int8).
        raise type(e)(f"{e}; {_blame(art, pre, out, cfg, ctx, per_channel, scheme, skipped, info['quantized'], work)}"
                      ) from e
    if info["fidelity_guard"].get("unchecked"):
        info["notes"].append(f"fidelity guard not applied: {info['fidelity_guard']['unchecked']}")
    shutil.rmtree(work, ignore_errors=True)
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.dynamic": info},
                    facts=art.known_facts().lower_precision("int8").evolve(quantization="dynamic"))


def _quantize(pre: Path, out: Path, cfg: QuantizeDynamic, per_channel: bool, scheme: str, skipped: list[str]) -> None:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    # ORT rewrites a Gemm into a MatMul named NAME_MatMul (and an Add) before it quantizes, and matches
    # nodes_to_exclude against the rewritten names: a skipped Gemm is excluded by both names.
    exclude = [*skipped, *(f"{n}_MatMul" for n in skipped)]
    try:
        with quiet():
            ort_quantize_dynamic(str(pre), str(out), op_types_to_quantize=list(cfg.ops), per_channel=per_channel,
                                 reduce_range=scheme == "u8s8_reduce_range", weight_type=QuantType.QInt8,
                                 nodes_to_exclude=exclude)
    except Exception as e:  # ORT raises ValueError/RuntimeError/its own Fail types
        raise PassError(f"onnxruntime quantize_dynamic failed: {str(e).splitlines()[0][:300]}") from e


def _checks(art: Artifact, pre: Path, out: Path, cfg: QuantizeDynamic, ctx: PassContext,
            per_channel: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The float-parity check and the fidelity guard of the quantized model ``out``; raise on a breach."""
    p = pass_parity("quantize.dynamic", art, out, ctx, cfg.tolerance("int8"), "int8", cfg.parity_samples,
                    "keep the sensitive layers in float with skip (or scheme='u8s8_reduce_range' on a CPU "
                    "without VNNI)")
    guard = fidelity_guard(pre, out, art, ctx.data, cfg.min_sample_cosine, "quantize.dynamic",
                           true_advice({"per_channel": per_channel}, [("per_channel", True, "per_channel = true")]))
    return p, guard


def _blame(art: Artifact, pre: Path, out: Path, cfg: QuantizeDynamic, ctx: PassContext, per_channel: bool,
           scheme: str, skipped: list[str], quantized: list[str], work: Path) -> str:
    """The refusal's clause naming the layers responsible and a skip checked to pass both checks
    (passes/_quant_blame.py, shared with quantize.int8)."""
    feeds, _ = guard_feeds(art, ctx.data)

    def passes_with(skip: list[str]) -> bool:
        ctx.log(f"quantize.dynamic: refused; checking whether {len(skip) - len(skipped)} more node(s) in float pass")
        trial = work / "blame_trial.onnx"
        _quantize(pre, trial, cfg, per_channel, scheme, skip)
        try:
            _checks(art, pre, trial, cfg, ctx, per_channel)
        except CompressError:
            return False
        return True

    try:
        return skip_advice(pre, out, art.path / "model.onnx", quantized, feeds, work, skipped, bool(cfg.skip),
                           passes_with, None, kind="quantize.dynamic")
    except CompressError as e:  # the search is advice: its own failure must not hide the refusal
        return f"the nodes responsible could not be found ({str(e).splitlines()[0][:120]})"


def _decoder(art: Artifact, cfg: QuantizeDynamic, ctx: PassContext) -> Artifact:
    """A decoder with its KV cache: INT8 weights in ONNX Runtime's MatMulNBits (blocks of 32) computing with INT8
    activations quantized at run time (accuracy_level 4): dynamic INT8 in the kernel decoders are fast with.
    ``quantize_dynamic``'s MatMulInteger rewrite would run beside the graph's fused attention, not inside it."""
    from .quantize_decoder import quantize_decoder_weights
    from .quantize_weight_only import QuantizeWeightOnly

    wo = QuantizeWeightOnly(bits=8, group_size=32, accuracy_level=4, skip=cfg.skip)
    out = quantize_decoder_weights(art, wo, ctx)
    info = out.metadata.pop("quantize.weight_only")
    info["notes"] = [*info["notes"], "quantize.dynamic on a decoder: INT8 weights with INT8 activations quantized at "
                     "run time inside MatMulNBits (accuracy_level 4)"]
    out.metadata["quantize.dynamic"] = info
    out.facts = (out.facts or art.known_facts()).evolve(quantization="dynamic")
    return out
