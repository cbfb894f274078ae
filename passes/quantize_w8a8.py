"""W8A8: static INT8 weights and activations for a decoder language model's MatMuls (``quantize.int8`` on a
model whose facts name a decoder with its KV cache), optionally after SmoothQuant.

Why it exists beside weight-only INT8: prefill (the prompt, hundreds of tokens at once) is bound by compute,
not by reading weights, so weight-only INT8 does not make time to first token shorter. With both operands in
INT8 ONNX Runtime fuses ``DequantizeLinear -> MatMul`` into ``MatMulIntegerToFloat`` (MLAS's integer GEMM,
VNNI/AMX where the CPU has them), and prefill gets faster. Decoding one token at a time reads every weight once
per token either way, so there W8A8 brings nothing over weight-only INT8's packed kernel.

What differs from ``quantize.int8`` on other models, and why:
* calibration is the run's own calibration windows of real text (never the held-out ones), fed as prefills
  with an empty KV cache (the cache inputs and the attention mask included);
* only the MatMuls with constant weights are quantized, and only their inputs: their outputs (the residual
  stream, the fused attention's input, the logits) stay float, so no Q/DQ pair sits anywhere else;
* a tied embedding (the builder writes it as a Transpose of the LM head's weight) gets its own float table
  first, so the LM head's weight can be quantized (and smoothed) alone;
* SmoothQuant (``smoothquant = true``, ``smoothquant_alpha``) is folded into the norms and the gated MLP's up
  projection (``smoothquant_decoder``): exact in float, no op added;
* the check is the decoder's: next-token agreement and KL against the input model on calibration windows
  (recorded); the run's perplexity on held-out text is the verdict. ``max_accuracy_drop`` (labelled accuracy
  control) does not apply and is refused in one line.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.artifact import Artifact, sha256_files
from compress.core.int8_scheme import choose_scheme
from compress.core.layers import onnx_layers
from compress.core.manager import PassContext
from compress.errors import PassError

from ._quant_common import refuse_quantized, scheme_types

KIND = "quantize.int8"


def refuse_for_decoder(cfg: Any, err: type[Exception] = PassError) -> None:
    """Settings of quantize.int8 that cannot apply to a decoder: one line (in the plan, ``err`` = RecipeError, and
    again by the pass)."""
    if cfg.max_accuracy_drop is not None:
        raise err(f"{KIND}: max_accuracy_drop (accuracy control on labelled data) does not apply to a decoder "
                        "language model; remove it and bound the run with a budget such as fidelity = "
                        "\"perplexity_rise <= 3%\"")


class _Prefills:
    """Calibration windows as prefill feeds with an empty KV cache (ONNX Runtime's CalibrationDataReader)."""

    def __init__(self, model: Any, windows: np.ndarray, decoder: Any) -> None:
        from onnx import helper

        inputs = {i.name: i for i in model.graph.input}
        self.items: list[dict[str, np.ndarray]] = []
        for w in windows:
            f: dict[str, np.ndarray] = {"input_ids": w[None].astype(np.int64),
                                        "attention_mask": np.ones((1, len(w)), np.int64)}
            if "position_ids" in inputs:
                f["position_ids"] = np.arange(len(w), dtype=np.int64)[None]
            for name, i in inputs.items():
                if name.startswith("past_key_values."):  # (batch, kv heads, past 0, head size)
                    dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                    f[name] = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), dtype)
            self.items.append(f)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _static(src: Path, dst: Path, cfg: Any, scheme: str, reader: _Prefills, nodes: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from ._quant_common import quiet

    act, wt, reduce_range = scheme_types(scheme)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.calibration]
    extra: dict[str, Any] = {"ActivationSymmetric": cfg.activations == "symmetric",
                             # Float outputs: the residual stream, attention's input and the logits stay float, and
                             # ONNX Runtime fuses each MatMul into MatMulIntegerToFloat (no requantization).
                             "OpTypesToExcludeOutputQuantization": ["MatMul"]}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    try:
        with quiet():
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            reduce_range=reduce_range, activation_type=act, weight_type=wt,
                            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, calibrate_method=method,
                            use_external_data_format=True, extra_options=extra)
    except Exception as e:  # ORT raises ValueError/RuntimeError/its own Fail types
        raise PassError(f"{KIND}: onnxruntime quantize_static failed on the decoder: "
                        f"{str(e).splitlines()[0][:300]}") from e


def _alpha_summary(alphas: dict[str, float | None]) -> str:
    """"alpha chosen per activation by its simulated INT8 error: 0.9 on 40, 0.8 on 35, none on 2"."""
    counts = Counter(alphas.values())
    parts = [f"{a} on {counts[a]}" for a in sorted((a for a in counts if a is not None), reverse=True)]
    if None in counts:
        parts.append(f"none on {counts[None]}")
    return "alpha chosen per activation by its simulated INT8 error: " + ", ".join(parts)


def quantize_decoder_static(art: Artifact, cfg: Any, ctx: PassContext) -> Artifact:
    """W8A8 of a decoder's MatMuls, calibrated on the run's calibration windows (SmoothQuant first if asked)."""
    import onnx

    from .quantize_decoder import _agreement, _untie_embedding
    from .smoothquant_decoder import smooth_decoder

    refuse_for_decoder(cfg)
    text = ctx.text
    if text is None:
        raise PassError(f"{KIND} on a decoder calibrates on text: set data.source = \"builtin:pydoc-topics\" or "
                        "text:FILE")
    model = onnx.load(str(art.path / "model.onnx"))
    refuse_quantized(model, KIND)
    _untie_embedding(model)
    inits = {i.name for i in model.graph.initializer}
    mats = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    if not mats:
        raise PassError(f"{KIND}: the decoder has no MatMul with a constant weight; nothing to quantize")
    # skip (compress.core.layers): names, globs such as "*down_proj*" (every block's down projection), first/last.
    wanted = set(mats)
    keep = cfg.skip.select([ly for ly in onnx_layers(model) if ly.name in wanted], KIND, eligible=mats,
                           what="MatMul node")
    windows = text.calib[: cfg.samples]
    reader = _Prefills(model, windows, art.known_facts().decoder)
    scheme, why = choose_scheme(cfg.scheme)
    info: dict[str, Any] = {"scheme": scheme, "scheme_reason": why, "per_channel": cfg.per_channel,
                            "calibration": cfg.calibration, "activations": cfg.activations,
                            "calibration_windows": len(windows), "window": text.window}
    notes = [f"W8A8: static INT8 activations and weights on {len(mats) - len(keep)} of {len(mats)} MatMul(s), "
             f"calibrated ({cfg.calibration}) on {len(windows)} calibration window(s) of {text.window} tokens as "
             f"prefills with an empty KV cache; MatMul outputs stay float; INT8 scheme: {why}"]
    if cfg.smoothquant:
        auto = cfg.smoothquant_alpha == "auto"
        sq = smooth_decoder(model, reader.items, None if auto else float(cfg.smoothquant_alpha),
                            skip=frozenset(keep))
        info["smoothquant"] = sq
        how = _alpha_summary(sq.get("alphas", {})) if auto else f"alpha {cfg.smoothquant_alpha}"
        notes.append(f"SmoothQuant ({how}): {sq['smoothed_matmuls']} MatMul(s) smoothed, "
                     f"folded into {sq.get('norms', 0)} norm(s) and {sq.get('gated_mlps', 0)} gated MLP up "
                     "projection(s); attention's output projection is not smoothed")
    else:
        notes.append("no SmoothQuant: set smoothquant = true if activation outliers cost perplexity")
    work = ctx.new_dir("w8a8work")
    onnx.save_model(model, str(work / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    del model
    out_dir = ctx.new_dir("onnx")
    _static(work / "model.onnx", out_dir / "model.onnx", cfg, scheme, reader, [m for m in mats if m not in keep])
    shutil.rmtree(work, ignore_errors=True)
    for f in art.path.iterdir():  # the decoder's I/O contract and tokenizer travel with it
        if f.is_file() and f.suffix not in (".onnx", ".data") and f.name != "artifact.json":
            shutil.copy2(f, out_dir / f.name)
    ops = [n.op_type for n in onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph.node]
    n_q = ops.count("QuantizeLinear")
    if n_q == 0:
        raise PassError(f"{KIND}: ONNX Runtime quantized no MatMul of the decoder (every one kept float?)")
    info.update(quantized_matmuls=len(mats) - len(keep), matmul_layers=len(mats), kept_float=keep,
                quantize_linear_nodes=n_q, parity=_agreement(art, out_dir, ctx), notes=notes)
    facts = art.known_facts().lower_precision("int8").evolve(quantization="qdq")
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={KIND: info}, facts=facts)
