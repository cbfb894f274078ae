"""Static INT8 (QDQ) with NNCF's post-training quantization, run on the exported ONNX model.

NNCF's ONNX backend writes standard QuantizeLinear/DequantizeLinear with INT8 weight
initializers (PLATFORM.md), so every target runs its output and the deployed-vs-simulated
parity check applies as for ``quantize.int8``. What NNCF adds over ONNX Runtime's quantizer:
fast bias correction, presets (performance / mixed), a transformer model type (SmoothQuant and
the ops it keeps in float), an ignored scope by name, pattern or op type, and accuracy control
that reverts the most sensitive layers to float (``quantize_with_accuracy_control``).

The no-VNNI INT8 scheme maps onto NNCF's ``overflow_fix``: 7-bit weights, the same fix for
VPMADDUBSW saturation that ``reduce_range`` is for ONNX Runtime's quantizer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from compress.core.artifact import Artifact, sha256_files
from compress.core.int8_scheme import choose_scheme
from compress.core.layers import LayerSelecting, LayerSelector, onnx_layers, skip_field
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import AccuracyError, InputError, PassError, RecipeError

from ._quant_common import (
    QdqParityOptions,
    auto_scheme_env,
    calibration_batches,
    guard_feeds,
    name_nodes,
    refuse_quantized,
    require_data,
    self_parity,
    split_inputs,
    weighted_nodes,
)

MIN_CALIB_SAMPLES = 8


# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_float": "", "keep_float_patterns": "re:", "keep_float_types": "type:"}


class QuantizeNncf(LayerSelecting, QdqParityOptions):
    """Static INT8 (QDQ) with NNCF (presets, fast bias correction, SmoothQuant, ignored scope, accuracy control)."""

    kind: Literal["quantize.nncf"] = "quantize.nncf"
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="performance = symmetric activations and weights; mixed = asymmetric activations")
    model_type: Literal["auto", "cnn", "transformer"] = Field(
        "auto", description="transformer = NNCF's transformer preset (SmoothQuant, float Softmax/LayerNorm/mask "
        "arithmetic); auto = transformer when the graph has LayerNormalization and Softmax")
    fast_bias_correction: bool = True
    smoothquant_alpha: float | None = Field(
        None, ge=-1, le=1, description="SmoothQuant alpha for MatMuls (transformer type); -1 = off; "
        "None = NNCF default")
    samples: int = Field(128, ge=MIN_CALIB_SAMPLES, le=100_000, description="calibration samples used")
    skip: LayerSelector = skip_field("kept in float (NNCF's ignored scope; 'first' / 'last': quantizable nodes)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS
    scheme: Literal["auto", "u8s8", "u8s8_reduce_range"] = "auto"
    max_accuracy_drop: float | None = Field(
        None, gt=0, lt=1, description="allowed drop of the validation metric (top-1 with labels, output cosine to "
        "the float model without), a fraction; NNCF reverts the most sensitive layers to float until it holds")
    accuracy_samples: int | None = Field(None, ge=16, description="validation samples for accuracy control")

    def cache_env(self) -> dict[str, str]:
        """Facts outside the config that change the output (for the cache key)."""
        return auto_scheme_env(self.scheme)

    def data_needed(self) -> str | None:
        return "any"  # calibration samples; accuracy control falls back to fidelity without labels


@contextlib.contextmanager
def quiet_nncf() -> Iterator[None]:
    """NNCF logs and draws progress bars per algorithm; the run's own output stays readable."""
    import nncf

    buf = io.StringIO()
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield


def _model_type(cfg: QuantizeNncf, model: Any) -> str:
    if cfg.model_type != "auto":
        return cfg.model_type
    ops = {n.op_type for n in model.graph.node}
    return "transformer" if {"Softmax", "MatMul"} <= ops and (
        "LayerNormalization" in ops or ("ReduceMean" in ops and "Sqrt" in ops)) else "cnn"


def _ignored_scope(cfg: QuantizeNncf, model: Any) -> tuple[Any, list[str]]:
    """NNCF IgnoredScope of the nodes ``skip`` selects, checked against the graph first.

    NNCF would refuse an entry that matches nothing deep inside quantization; here it is refused
    before any work, naming the entry and the closest names in the graph (``compress.core.layers``).
    """
    import nncf

    names = cfg.skip.select(onnx_layers(model), "quantize.nncf", eligible=weighted_nodes(model), what="node")
    return nncf.IgnoredScope(names=names, validate=False), names


def _weight_dequantized(model: Any) -> set[str]:
    """Names of Conv/MatMul/Gemm nodes whose weight input comes out of a DequantizeLinear."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in dq_out}


Feeds = dict[str, np.ndarray]


def _calibration_feeds(art: Artifact, ctx: PassContext, cfg: QuantizeNncf, notes: list[str]) -> tuple[list[Feeds], Any]:
    """Calibration samples as named model inputs (one dict per batch), and the run's data (None: synthetic).

    NNCF's ONNX backend feeds each item to ONNX Runtime as it is, so a dict of every named input calibrates a
    model with several inputs (token ids and masks) as well as an image model."""
    data = ctx.data
    integer = any(not np.issubdtype(np.dtype(s.dtype), np.floating) for s in art.inputs)
    if data is None and integer and cfg.max_accuracy_drop is None:
        # Token ids and masks have a known valid range: calibrate on valid synthetic ones rather than refuse.
        feeds, where = guard_feeds(art, None, n=cfg.samples, batch=1)
        notes.append(f"calibrated on {where}: valid token ids and all-ones masks; give data for a calibration that "
                     "matches real inputs")
        return feeds, None
    data = require_data(ctx, "quantize.nncf")
    if data.input_names:  # one named array per model input, in the model's order
        n = len(data.calib)
        if n < MIN_CALIB_SAMPLES:
            raise InputError(f"quantize.nncf: the calibration split has {n} samples, fewer than the minimum "
                             f"{MIN_CALIB_SAMPLES}; raise data.calib_fraction or supply more data")
        feeds = data.feed_batches(data.calib, 1, cfg.samples)
        notes.append(f"calibrated on {len(feeds)} samples of {data.name} ({', '.join(data.input_names)})")
        return feeds, data
    if len(art.inputs) != 1:
        names = ", ".join(s.name for s in art.inputs)
        raise InputError(f"quantize.nncf: the model takes {len(art.inputs)} inputs ({names}) but {data.name} gives "
                         f"one array per sample; give an .npz with one array per input name ({names})")
    name = art.inputs[0].name
    batches = calibration_batches(data, cfg.samples, "quantize.nncf", MIN_CALIB_SAMPLES, batch=1)
    return [{name: x} for x in batches], data


def _validation_items(data: Any, art: Artifact, n: int | None, batch: int = 16) -> tuple[list[Feeds],
                                                                                          list[np.ndarray] | None]:
    """Validation batches as named inputs, and their labels per batch (None without labels)."""
    split = data.val
    if data.input_names:
        feeds = data.feed_batches(split, batch, n)
    else:
        xs, _ = split_inputs(data, "val", n, batch)
        feeds = [{art.inputs[0].name: x} for x in xs]
    if split.y is None:
        return feeds, None
    return feeds, [split.y[i * batch:i * batch + len(next(iter(f.values())))] for i, f in enumerate(feeds)]


def _validation_fn(float_outputs: list[np.ndarray] | None, labels: list[np.ndarray] | None) -> Any:
    """NNCF validation function over batches: top-1 with labels, else output cosine to the float model.

    Returns (metric over all samples, one value per batch item): NNCF ranks layers by how they move
    the per-item values. Items are identified by position in the list NNCF hands over, which is the
    validation list or a subset of it; the reference is looked up by the batch itself.
    """
    import onnxruntime as ort

    def fn(compiled: Any, items: Any) -> tuple[float, list[float]]:
        # NNCF hands over an onnx.ModelProto for the ONNX backend; run it as ONNX Runtime would deploy it.
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(compiled.SerializeToString(), so, providers=["CPUExecutionProvider"])
        per_item, scores = [], []
        for i, feed in items:
            out = np.asarray(sess.run(None, feed)[0], dtype=np.float64)
            out = out.reshape(len(out), -1)
            if labels is not None:
                s = (out.argmax(1) == labels[i]).astype(float)
            else:
                assert float_outputs is not None
                ref = float_outputs[i]
                denom = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
                s = np.where(denom > 0, (out * ref).sum(1) / np.maximum(denom, 1e-30), 1.0)
            scores.append(s)
            per_item.append(float(s.mean()))
        return float(np.concatenate(scores).mean()), per_item

    return fn


@register_pass(QuantizeNncf, consumes="onnx", produces="onnx", compare_precision="int8-nncf",
               accuracy_fields=("max_accuracy_drop",))
def quantize_nncf(art: Artifact, cfg: QuantizeNncf, ctx: PassContext) -> Artifact:
    """Static INT8 (QDQ) with NNCF's post-training quantization; optional NNCF accuracy control."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    src = art.path / "model.onnx"
    model = name_nodes(onnx.load(str(src)))
    refuse_quantized(model, "quantize.nncf")
    nodes = weighted_nodes(model)
    if not nodes:
        raise PassError("quantize.nncf: the model has no quantizable layers (Conv/MatMul/Gemm with constant "
                        "weights); remove quantize.nncf from the recipe")
    scope, skipped = _ignored_scope(cfg, model)
    calib_notes: list[str] = []
    feeds, data = _calibration_feeds(art, ctx, cfg, calib_notes)
    scheme, why = choose_scheme(cfg.scheme)
    mtype = _model_type(cfg, model)
    adv = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.ENABLE if scheme == "u8s8_reduce_range" else OverflowFix.DISABLE)
    if cfg.smoothquant_alpha is not None:
        adv.smooth_quant_alpha = cfg.smoothquant_alpha
    common: dict[str, Any] = {
        "preset": nncf.QuantizationPreset(cfg.preset), "subset_size": min(cfg.samples, len(feeds)),
        "fast_bias_correction": cfg.fast_bias_correction, "ignored_scope": scope,
        "model_type": nncf.ModelType.TRANSFORMER if mtype == "transformer" else None,
    }
    calib = nncf.Dataset(feeds)  # each item is already {input name: array} for every input
    notes = [f"INT8 scheme (NNCF): {why}" + ("; NNCF overflow_fix=enable (7-bit weights)"
                                             if scheme == "u8s8_reduce_range" else ""), *calib_notes]
    info: dict[str, Any] = {"engine": "nncf", "nncf": _nncf_version(), "scheme": scheme, "scheme_reason": why,
                            "preset": cfg.preset, "model_type": mtype, "fast_bias_correction": cfg.fast_bias_correction,
                            "samples": cfg.samples, "skipped": skipped}
    try:
        if cfg.max_accuracy_drop is None:
            with quiet_nncf():
                qmodel = nncf.quantize(model, calib, advanced_parameters=adv, **common)
        else:
            qmodel, ac = _with_accuracy_control(model, src, calib, data, art, cfg, adv, common)
            info["accuracy_control"] = ac
    except (RecipeError, AccuracyError):
        raise
    except nncf.ValidationError as e:  # an ignored-scope entry NNCF itself rejects
        raise RecipeError(f"quantize.nncf: {str(e).splitlines()[0][:300]}") from e
    except Exception as e:  # NNCF raises many types from its graph builders and algorithms
        raise PassError(f"quantize.nncf: NNCF failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e

    out_dir = ctx.new_dir("onnx")
    out = out_dir / "model.onnx"
    try:
        onnx.checker.check_model(qmodel)
    except Exception as e:  # onnx.checker.ValidationError
        shutil.rmtree(out_dir, ignore_errors=True)
        raise PassError(f"quantize.nncf produced an invalid ONNX graph: {e}") from e
    onnx.save_model(qmodel, str(out))
    quantized = _weight_dequantized(qmodel)
    kept = [n for n in nodes if n not in quantized]
    if not quantized:
        raise PassError("quantize.nncf: NNCF quantized no layer (is every quantizable node in the ignored scope?)")
    info.update(quantizable_nodes=len(nodes), quantized_nodes=len(quantized), kept_float=kept,
                quantize_linear_nodes=sum(1 for n in qmodel.graph.node if n.op_type == "QuantizeLinear"))
    if kept:
        notes.append(f"{len(kept)} of {len(nodes)} weighted layer(s) kept in float: {', '.join(kept[:20])}"
                     + (" ..." if len(kept) > 20 else ""))
    # Deployed vs simulated, and deployed vs the float input model: either out of tolerance fails the pass.
    info["parity"] = self_parity(out, art, data, cfg, scheme)
    info["notes"] = notes
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.nncf": info},
                    facts=art.known_facts().lower_precision("int8").evolve(quantization="qdq"))


def _nncf_version() -> str:
    from compress.targets.base import module_version

    return module_version("nncf")


def _with_accuracy_control(model: Any, src: Path, calib: Any, data: Any, art: Artifact, cfg: QuantizeNncf, adv: Any,
                           common: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``nncf.quantize_with_accuracy_control`` with the run's validation metric; which layers it reverted."""
    import nncf

    from ._quant_common import ort_session

    limit = float(cfg.max_accuracy_drop or 0.0)
    xs, labels = _validation_items(data, art, cfg.accuracy_samples, 16)
    float_out = None
    if labels is None:
        sess = ort_session(src)
        float_out = [np.asarray(sess.run(None, f)[0], dtype=np.float64) for f in xs]
        float_out = [o.reshape(len(o), -1) for o in float_out]
    metric = "top-1" if labels is not None else "output cosine to the float model"
    items = list(enumerate(xs))  # (index, batch): the index finds the batch's labels or float reference
    val = nncf.Dataset(items)
    fn = _validation_fn(float_out, labels)
    with quiet_nncf():
        float_metric = fn(model, items)[0]
        qmodel = nncf.quantize_with_accuracy_control(model, calib, val, fn, max_drop=limit,
                                                     advanced_quantization_parameters=adv, **common)
        q_metric = fn(qmodel, items)[0]
    # The input is float (refuse_quantized), so every weighted node without a weight DequantizeLinear is float.
    reverted = sorted(set(weighted_nodes(model)) - _weight_dequantized(qmodel) - set(common["ignored_scope"].names))
    info = {"metric": metric, "float": float_metric, "int8": q_metric, "limit": limit, "reverted_to_float": reverted,
            "why": f"NNCF ranked layers by their effect on {metric} and reverted the most harmful to float until the "
                   f"drop was within {limit * 100:.2f} points" if reverted else "no layer needed reverting"}
    if float_metric - q_metric > limit + 1e-9:
        raise AccuracyError(f"quantize.nncf: NNCF accuracy control could not hold the {metric} drop within "
                            f"{limit * 100:.2f} points ({(float_metric - q_metric) * 100:.2f} after reverting "
                            f"{len(reverted)} layer(s)); raise max_accuracy_drop or use quantize.qat")
    return qmodel, info
