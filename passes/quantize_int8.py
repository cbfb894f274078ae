"""Post-training static INT8 (QDQ) with ONNX Runtime's quantizer, plus accuracy control.

The output is standard QuantizeLinear/DequantizeLinear around float ops, which
ONNX Runtime fuses into integer kernels and TVM/TensorRT import as QDQ.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from compress.core.artifact import Artifact, sha256_files
from compress.core.config import true_advice
from compress.core.int8_scheme import choose_scheme
from compress.core.layers import LayerSelecting, LayerSelector, onnx_layers, skip_field
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import AccuracyError, CompressError, PassError, RecipeError

from ._quant_blame import skip_advice
from ._quant_common import (
    GUARD_MIN_COSINE,
    CalibrationReader,
    FloatBreach,
    QdqParityOptions,
    auto_scheme_env,
    check_calibration_size,
    fidelity_guard,
    fixed_batch,
    float_nodes_note,
    guard_feeds,
    onnx_top1,
    ort_session,
    preprocess,
    quiet,
    refuse_quantized,
    scheme_types,
    self_parity,
    transformer_float_nodes,
    weighted_nodes,
)
from ._quant_common import calibration_batches as _calib
from ._quant_common import require_data as _require_data

MIN_CALIB_SAMPLES = 8


# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_float": ""}


class QuantizeInt8(LayerSelecting, QdqParityOptions):
    """Static INT8 post-training quantization to QDQ ONNX, calibrated on the calibration split."""

    kind: Literal["quantize.int8"] = "quantize.int8"
    per_channel: bool = True
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100, description="for calibration=percentile")
    samples: int = Field(128, ge=MIN_CALIB_SAMPLES, le=100_000, description="calibration samples used")
    skip: LayerSelector = skip_field("kept in float ('first' / 'last': the first / last quantizable node)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS
    activations: Literal["asymmetric", "symmetric"] = "asymmetric"
    smoothquant: bool = False
    # "auto" (decoders): chosen per smoothed activation by its simulated INT8 error (passes/smoothquant_decoder.py).
    smoothquant_alpha: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = 0.5
    scheme: Literal["auto", "u8s8", "u8s8_reduce_range", "u8u8", "s8s8"] = "auto"
    max_accuracy_drop: float | None = Field(None, gt=0, lt=1, description="top-1 drop allowed, a fraction (0.005)")
    accuracy_samples: int | None = Field(None, ge=16, description="validation samples for accuracy control")
    # None (auto): a graph with attention keeps Softmax, LayerNorm, mask arithmetic and q@k^T / att@v in float
    # and quantizes the weighted MatMul/Gemm/Conv only. False quantizes whatever ORT would.
    transformer_preset: bool | None = None
    min_sample_cosine: float | None = Field(
        GUARD_MIN_COSINE, gt=0, le=1, description="fidelity guard: fail below this mean per-sample cosine to the "
        "input model (needs no labels); None = off")

    def cache_env(self) -> dict[str, str]:
        """Facts outside the config that change the output (for the cache key)."""
        return auto_scheme_env(self.scheme)

    def data_needed(self) -> str | None:
        return "labelled" if self.max_accuracy_drop is not None else "any"  # calibration samples

    def check_data(self, data: Any) -> None:
        check_calibration_size(data, "quantize.int8", MIN_CALIB_SAMPLES)

    def preflight(self, root: Any, text: Any) -> None:
        if text is not None:  # a causal LM: W8A8 of its decoder (passes/quantize_w8a8.py)
            from .quantize_w8a8 import refuse_for_decoder

            refuse_for_decoder(self, RecipeError)
        elif self.smoothquant and self.smoothquant_alpha == "auto":
            raise RecipeError(_AUTO_ALPHA)


_AUTO_ALPHA = ("quantize.int8: smoothquant_alpha = \"auto\" is chosen on a decoder language model's text "
               "(model.task = \"causal-lm\"); give a number between 0 and 1 (0.5) for this model")


def smooth_quant(src: Path, dst: Path, input_name: str, calib: list[np.ndarray], alpha: float) -> dict[str, Any]:
    """SmoothQuant folded into LayerNormalization: divide LN's scale/bias per channel, multiply the weights.

    Only MatMul/Gemm fed directly (and only) by a LayerNormalization with constant scale and bias are
    smoothed, so no op is added; others are left as they are and counted.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    groups = []
    for ln in m.graph.node:
        if ln.op_type != "LayerNormalization" or len(ln.input) < 3:
            continue
        if ln.input[1] not in inits or ln.input[2] not in inits:
            continue
        users = consumers.get(ln.output[0], [])
        if not users or not all(u.op_type in ("MatMul", "Gemm") and u.input[0] == ln.output[0] and u.input[1] in inits
                                for u in users):
            continue
        if any(u.op_type == "Gemm" and any(a.name == "transB" and a.i for a in u.attribute) for u in users):
            continue  # weight laid out (N, K); kept simple by skipping
        groups.append((ln, users))
    if not groups:
        shutil.copy(src, dst)
        return {"smoothed_layernorms": 0, "smoothed_matmuls": 0}
    # Per-channel max |activation| of each LN output over the calibration batches.
    mm = onnx.load(str(src))
    for ln, _ in groups:
        mm.graph.output.append(onnx.helper.make_tensor_value_info(ln.output[0], onnx.TensorProto.FLOAT, None))
    tmp = dst.with_suffix(".probe.onnx")
    onnx.save_model(mm, str(tmp))
    sess = ort_session(tmp, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    amax: dict[str, np.ndarray] = {}
    for b in calib:
        outs = dict(zip(names, sess.run(None, {input_name: b}), strict=True))
        for ln, _ in groups:
            a = np.abs(outs[ln.output[0]]).reshape(-1, outs[ln.output[0]].shape[-1]).max(0)
            amax[ln.name] = np.maximum(amax.get(ln.name, 0), a)
    tmp.unlink()
    uses: dict[str, int] = {}
    for n in m.graph.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1

    def private(node: Any, idx: int) -> Any:
        """The node's own copy of an initializer (optimizers deduplicate equal tensors, e.g. LN ones/zeros)."""
        name = node.input[idx]
        if uses.get(name, 0) <= 1:
            return inits[name]
        uses[name] -= 1
        t = numpy_helper.from_array(numpy_helper.to_array(inits[name]).copy(), f"{name}__sq_{node.name}_{idx}")
        m.graph.initializer.append(t)
        inits[t.name] = m.graph.initializer[-1]
        uses[t.name] = 1
        node.input[idx] = t.name
        return inits[t.name]

    n_mm = 0
    for ln, users in groups:
        ws = [numpy_helper.to_array(inits[u.input[1]]) for u in users]  # (K, N)
        wmax = np.max(np.stack([np.abs(w).max(1) for w in ws]), axis=0)
        s = (np.maximum(amax[ln.name], 1e-5) ** alpha) / (np.maximum(wmax, 1e-5) ** (1 - alpha))
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        for idx, scale_s in ((1, s), (2, s)):
            t = private(ln, idx)
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / scale_s, t.name))
        for u, w in zip(users, ws, strict=True):
            t = private(u, 1)
            t.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), t.name))
            n_mm += 1
    onnx.save_model(m, str(dst))
    return {"smoothed_layernorms": len(groups), "smoothed_matmuls": n_mm, "alpha": alpha}


def _quantize(src: Path, dst: Path, cfg: QuantizeInt8, scheme: str, reader: CalibrationReader, exclude: list[str],
              only: list[str] | None = None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    act, wt, reduce_range = scheme_types(scheme)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.calibration]
    extra: dict[str, Any] = {"ActivationSymmetric": cfg.activations == "symmetric"}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    reader.rewind()
    try:
        with quiet():
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            reduce_range=reduce_range, activation_type=act, weight_type=wt,
                            nodes_to_exclude=list(exclude), calibrate_method=method, extra_options=extra,
                            nodes_to_quantize=None if only is None else [n for n in only if n not in exclude])
    except Exception as e:  # ORT raises ValueError/RuntimeError/its own Fail types
        raise PassError(f"onnxruntime quantize_static failed: {str(e).splitlines()[0][:300]}") from e


def _accuracy_control(pre: Path, work: Path, cfg: QuantizeInt8, scheme: str, reader: CalibrationReader, keep: list[str],
                      nodes: list[str], data: Any, limit: float,
                      only: list[str] | None = None) -> tuple[Path, list[str], dict[str, Any]]:
    """Keep the most sensitive nodes in float until the top-1 drop is within ``limit``."""
    n_val = cfg.accuracy_samples
    fp_top1, fp_logits = onnx_top1(pre, data, max_samples=n_val)

    def attempt(exclude: list[str], tag: str) -> tuple[Path, float, np.ndarray]:
        p = work / f"q_{tag}.onnx"
        _quantize(pre, p, cfg, scheme, reader, exclude, only)
        acc, logits = onnx_top1(p, data, max_samples=n_val)
        return p, acc, logits

    path, acc, _ = attempt(keep, "base")
    info: dict[str, Any] = {"float_top1": fp_top1, "int8_top1_before": acc, "limit": limit, "trials": 1}
    if fp_top1 - acc <= limit:
        info.update(int8_top1=acc, kept_by_control=[])
        return path, keep, info
    # Sensitivity: the error each node causes when it alone is quantized. (Keeping one node in float
    # at a time misses pairs: an activation is quantized as the output of its producer *and* as the
    # input of its consumer, so both must stay float to remove that error.)
    cand = [n for n in nodes if n not in keep]
    scores = []
    for i, node in enumerate(cand):
        p, a, logits = attempt([*keep, *(c for c in cand if c != node)], f"s{i}")
        scores.append((-float(np.mean((logits - fp_logits) ** 2)), a, node))
        p.unlink()
    info["trials"] += len(scores)
    scores.sort()
    info["sensitivity"] = [{"node": n, "logit_mse_alone": -s, "top1_alone": a} for s, a, n in scores]
    kept: list[str] = []
    for j, (_, _, node) in enumerate(scores):
        kept.append(node)
        path, acc, _ = attempt([*keep, *kept], f"g{j}")
        info["trials"] += 1
        if fp_top1 - acc <= limit:
            info.update(int8_top1=acc, kept_by_control=kept)
            return path, [*keep, *kept], info
    raise AccuracyError(
        f"quantize.int8: even with every quantizable node kept in float the top-1 drop is "
        f"{(fp_top1 - acc) * 100:.2f} points (limit {limit * 100:.2f}); raise max_accuracy_drop or use quantize.qat")


def _refuse_unquantizable(model: Any) -> None:
    refuse_quantized(model, "quantize.int8")
    if not weighted_nodes(model):
        ops = sorted({n.op_type for n in model.graph.node})
        raise PassError(f"quantize.int8: the model has no quantizable layers (Conv/MatMul/Gemm with constant "
                        f"weights); its ops are {', '.join(ops)}. Remove quantize.int8 from the recipe")


def _calibration(art: Artifact, cfg: QuantizeInt8, ctx: PassContext, static_batch: bool, notes: list[str]
                 ) -> tuple[Any, CalibrationReader, list[np.ndarray]]:
    """The data the pass checks against (None: synthetic inputs), the calibration reader, and the single-input
    batches (for SmoothQuant); ``notes`` gets one line saying what was calibrated on."""
    integer_inputs = [s.name for s in art.inputs if not np.issubdtype(np.dtype(s.dtype), np.floating)]
    name = art.inputs[0].name
    plain = cfg.max_accuracy_drop is None and not cfg.smoothquant
    if ctx.data is None and integer_inputs and plain:
        # Token ids and masks have a known valid range: calibrate on synthetic ones rather than refuse.
        feeds, where = guard_feeds(art, None, n=cfg.samples, batch=1 if static_batch else 8)
        notes.append(f"calibrated on {where}: valid token ids and all-ones masks; give data for a calibration "
                     "that matches real inputs")
        return None, CalibrationReader(name, [], feeds), []
    if ctx.data is not None and ctx.data.input_names and plain:
        data = ctx.data  # one named array per input (token ids, masks): calibrate on them as they are
        check_calibration_size(data, "quantize.int8", MIN_CALIB_SAMPLES)
        reader = CalibrationReader(name, [], data.feed_batches(data.calib, 1 if static_batch else 16, cfg.samples))
        notes.append(f"calibrated on {min(cfg.samples, len(data.calib))} samples of {data.name} "
                     f"({', '.join(data.input_names)})")
        return data, reader, []
    data = _require_data(ctx, "quantize.int8", labelled=cfg.max_accuracy_drop is not None)
    if len(art.inputs) != 1:
        raise PassError(f"quantize.int8: calibration from data supports single-input models; this one has "
                        f"{len(art.inputs)} inputs ({', '.join(s.name for s in art.inputs)}); run without data "
                        "to calibrate on synthetic token ids, or use quantize.dynamic")
    # A model exported with a fixed batch (dynamic_batch=false) takes one sample per call.
    batches = _calib(data, cfg.samples, "quantize.int8", MIN_CALIB_SAMPLES, batch=1 if static_batch else 16)
    notes.append(f"calibrated on {min(cfg.samples, len(data.calib))} samples of {data.name}")
    return data, CalibrationReader(name, batches), batches


def _prepare(src: Path, work: Path, cfg: QuantizeInt8, input_name: str, batches: list[np.ndarray],
             info: dict[str, Any], notes: list[str]) -> Path:
    """ORT's pre-processing, then SmoothQuant when asked: the float model the quantizer reads."""
    pre = work / "pre.onnx"
    shared = preprocess(src, pre)
    if shared:
        notes.append(f"{len(shared)} constant(s) read by several nodes were copied per node so each is quantized "
                     f"on its own: {', '.join(shared[:10])}" + (" ..." if len(shared) > 10 else ""))
    if not cfg.smoothquant:
        return pre
    if cfg.smoothquant_alpha == "auto":
        raise PassError(_AUTO_ALPHA)
    sq = work / "sq.onnx"
    info["smoothquant"] = smooth_quant(pre, sq, input_name, batches, cfg.smoothquant_alpha)
    if info["smoothquant"]["smoothed_matmuls"] == 0:
        notes.append("smoothquant: no MatMul fed only by a LayerNormalization was found; nothing smoothed")
    return sq


def _float_plan(pre: Path, cfg: QuantizeInt8, info: dict[str, Any], notes: list[str]
                ) -> tuple[list[str], list[str], dict[str, list[str]] | None, list[str] | None]:
    """The quantizable nodes, those kept in float, the transformer preset's float groups, and the nodes to
    quantize (None: whatever ORT would)."""
    import onnx

    pre_model = onnx.load(str(pre))
    nodes = weighted_nodes(pre_model)
    keep = cfg.skip.select(onnx_layers(pre_model), "quantize.int8", eligible=nodes, what="node")
    groups = transformer_float_nodes(pre_model) if cfg.transformer_preset is not False else None
    only: list[str] | None = None
    if groups is not None:
        # Weighted layers only: what must stay float (groups) stays float, and so does whatever ORT would
        # otherwise quantize between them (Add, Where, Gather ...).
        only = [n for n in nodes if n not in groups["attention_matmul"]]
        info["transformer_preset"] = {k: len(v) for k, v in groups.items()}
        notes.append("transformer blocks recognised: only weighted MatMul/Gemm/Conv are quantized; Softmax, "
                     "LayerNorm, attention-mask arithmetic and attention MatMuls stay float")
    elif cfg.transformer_preset:
        notes.append("transformer_preset = true but no attention (Softmax with LayerNorm or q @ k^T) was found")
    return nodes, keep, groups, only


def _record_output(out: Path, nodes: list[str], keep: list[str], groups: dict[str, list[str]] | None,
                   only: list[str] | None, info: dict[str, Any], notes: list[str]) -> None:
    """Refuse an invalid or unquantized graph; record which nodes were quantized and which stayed float."""
    import onnx

    qmodel = onnx.load(str(out))
    try:
        onnx.checker.check_model(qmodel)
    except Exception as e:  # onnx.checker.ValidationError
        raise PassError(f"quantize.int8 produced an invalid ONNX graph: {e}") from e
    n_q = sum(1 for n in qmodel.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise PassError("quantize.int8: ONNX Runtime quantized nothing (every quantizable node was excluded?)")
    float_groups = {"skip": list(keep)}
    if groups is not None:
        float_groups.update(groups)
    float_groups = {k: [n for n in v if n] for k, v in float_groups.items()}
    n_float_weighted = len([n for n in nodes if n in keep or (only is not None and n not in only)])
    info.update(kept_float=keep, float_nodes=float_groups, quantized_nodes=len(nodes) - n_float_weighted,
                quantizable_nodes=len(nodes), quantize_linear_nodes=n_q)
    if float_nodes_note(float_groups):
        notes.append(float_nodes_note(float_groups))


def _guard(pre: Path, out: Path, art: Artifact, ctx: PassContext, cfg: QuantizeInt8, scheme: str,
           info: dict[str, Any], notes: list[str]) -> None:
    """Without labels nothing else would notice a wrecked model: compare to the input model, per sample."""
    advice = true_advice({**cfg.model_dump(), "scheme": scheme}, [
        ("per_channel", True, "per_channel = true"),
        ("calibration", "percentile", "calibration = \"percentile\""),
        ("scheme", "u8s8_reduce_range", "scheme = \"u8s8_reduce_range\" (7-bit weights, no VPMADDUBSW saturation)"),
    ])
    info["fidelity_guard"] = fidelity_guard(pre, out, art, ctx.data, cfg.min_sample_cosine, "quantize.int8",
                                            [*advice, "max_accuracy_drop (accuracy control)"]
                                            if cfg.max_accuracy_drop is None else advice)
    if info["fidelity_guard"].get("unchecked"):
        notes.append(f"fidelity guard not applied: {info['fidelity_guard']['unchecked']}")


def _blame(pre: Path, out: Path, art: Artifact, ctx: PassContext, data: Any, cfg: QuantizeInt8, scheme: str,
           reader: CalibrationReader, keep: list[str], quantized: list[str], only: list[str] | None,
           work: Path) -> str:
    """The refusal's clause naming the nodes responsible and a skip checked to pass both checks."""
    feeds, _ = guard_feeds(art, ctx.data)

    def passes_with(skip: list[str]) -> bool:
        ctx.log(f"quantize.int8: refused; checking whether {len(skip) - len(keep)} more node(s) in float pass")
        trial = work / "blame_trial.onnx"
        _quantize(pre, trial, cfg, scheme, reader, skip, only)
        try:
            fidelity_guard(pre, trial, art, ctx.data, cfg.min_sample_cosine, "quantize.int8")
            self_parity(trial, art, data, cfg, scheme)
        except CompressError:
            return False
        return True

    def dynamic_passes() -> bool:
        from .quantize_dynamic import QuantizeDynamic, quantize_dynamic

        ctx.log("quantize.int8: refused and no short skip passes; checking quantize.dynamic instead")
        try:
            quantize_dynamic(art, QuantizeDynamic(), ctx)
        except CompressError:
            return False
        return True

    try:
        return skip_advice(pre, out, art.path / "model.onnx", quantized, feeds, work, keep, bool(cfg.skip),
                           passes_with, dynamic_passes)
    except CompressError as e:  # the search is advice: its own failure must not hide the refusal
        return f"the nodes responsible could not be found ({str(e).splitlines()[0][:120]})"


@register_pass(QuantizeInt8, consumes="onnx", produces="onnx", compare_precision="int8",
               accuracy_fields=("max_accuracy_drop",), guard_fields=("min_sample_cosine",))
def quantize_int8(art: Artifact, cfg: QuantizeInt8, ctx: PassContext) -> Artifact:
    """Static INT8 (QDQ) calibrated on the calibration split; optional accuracy control."""
    import onnx

    if art.known_facts().decoder is not None:  # a decoder with its KV cache: W8A8 (SmoothQuant optional)
        from .quantize_w8a8 import quantize_decoder_static

        return quantize_decoder_static(art, cfg, ctx)
    src = art.path / "model.onnx"
    _refuse_unquantizable(onnx.load(str(src)))
    notes: list[str] = []
    data, reader, batches = _calibration(art, cfg, ctx, fixed_batch(src), notes)
    scheme, why = choose_scheme(cfg.scheme)
    notes.insert(0, f"INT8 scheme: {why}")

    work = ctx.new_dir("q8work")
    info: dict[str, Any] = {"scheme": scheme, "scheme_reason": why, "per_channel": cfg.per_channel,
                            "calibration": cfg.calibration, "samples": cfg.samples, "activations": cfg.activations}
    pre = _prepare(src, work, cfg, art.inputs[0].name, batches, info, notes)
    nodes, keep, groups, only = _float_plan(pre, cfg, info, notes)

    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    if cfg.max_accuracy_drop is not None:
        qpath, keep, ac = _accuracy_control(pre, work, cfg, scheme, reader, keep, nodes, data, cfg.max_accuracy_drop,
                                            only)
        shutil.move(str(qpath), out)
        info["accuracy_control"] = ac
        if ac["kept_by_control"]:
            notes.append(f"accuracy control kept {len(ac['kept_by_control'])} node(s) in float to hold the top-1 "
                         f"drop within {cfg.max_accuracy_drop * 100:.2f} points: {', '.join(ac['kept_by_control'])}")
    else:
        _quantize(pre, out, cfg, scheme, reader, keep, only)
    _record_output(out, nodes, keep, groups, only, info, notes)
    try:
        _guard(pre, out, art, ctx, cfg, scheme, info, notes)
        # Deployed (ORT fused integer kernels) vs simulated (reference Q/DQ, float compute) on the validation
        # split, and deployed vs the float input model: either out of tolerance fails the pass.
        info["parity"] = self_parity(out, art, data, cfg, scheme)
    except (AccuracyError, FloatBreach) as e:
        # Too far from the float model: say which nodes it comes from and a skip seen to fix it.
        quantized = [n for n in nodes if n not in keep and (only is None or n in only)]
        advice = _blame(pre, out, art, ctx, data, cfg, scheme, reader, keep, quantized, only, work)
        raise type(e)(f"{e}; {advice}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["notes"] = notes
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.int8": info},
                    facts=art.known_facts().lower_precision("int8").evolve(quantization="qdq"))
