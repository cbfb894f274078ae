"""Post-training static INT8 (QDQ) with ONNX Runtime's quantizer, plus accuracy control.

The output is standard QuantizeLinear/DequantizeLinear around float ops, which
ONNX Runtime fuses into integer kernels and TVM/TensorRT import as QDQ.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from compress.artifact import Artifact, sha256_files
from compress.config import true_advice
from compress.errors import AccuracyError, PassError, RecipeError
from compress.int8_scheme import choose_scheme
from compress.manager import PassContext
from compress.parity import LOWERING, ParityOptions, check, parity_batch
from compress.registry import register_pass

from ._quant_common import (
    GUARD_MIN_COSINE,
    auto_scheme_env,
    check_calibration_size,
    fidelity_guard,
    fixed_batch,
    float_nodes_note,
    guard_feeds,
    name_nodes,
    onnx_top1,
    ort_session,
    refuse_quantized,
    run_batches,
    scheme_types,
    session_infer,
    split_inputs,
    transformer_float_nodes,
    unshare_initializers,
    weighted_nodes,
)
from ._quant_common import calibration_batches as _calib
from ._quant_common import require_data as _require_data
from ._quant_common import simulated_agreement as simulated_agreement  # re-exported for the report

MIN_CALIB_SAMPLES = 8


class QdqParityOptions(ParityOptions):
    """Parity settings of a pass that writes Q/DQ: deployed integer kernels vs the simulated graph."""

    deployed_min_cosine: float | None = Field(
        None, ge=-1, le=1, description="deployed (ONNX Runtime integer kernels) vs simulated Q/DQ: output cosine; "
        "None = compress.parity.LOWERING['int8']")
    deployed_min_agreement: float | None = Field(
        None, ge=0, le=1, description="deployed vs simulated: top-1 agreement; None = the INT8 default")


class QuantizeInt8(QdqParityOptions):
    """Static INT8 post-training quantization to QDQ ONNX, calibrated on the calibration split."""

    kind: Literal["quantize.int8"] = "quantize.int8"
    per_channel: bool = True
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100, description="for calibration=percentile")
    samples: int = Field(128, ge=MIN_CALIB_SAMPLES, le=100_000, description="calibration samples used")
    keep_float: tuple[str, ...] = Field((), description="node names, or 'first' / 'last' quantizable node")
    activations: Literal["asymmetric", "symmetric"] = "asymmetric"
    smoothquant: bool = False
    smoothquant_alpha: float = Field(0.5, ge=0, le=1)
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


class _Reader:
    """ORT CalibrationDataReader over prepared batches."""

    def __init__(self, name: str, batches: list[np.ndarray], feeds: list[dict[str, np.ndarray]] | None = None) -> None:
        self.name, self.batches, self.i = name, batches, 0
        self.feeds = feeds  # several named inputs per batch (multi-input models), instead of ``batches``

    def get_next(self) -> dict[str, np.ndarray] | None:
        n = len(self.feeds) if self.feeds is not None else len(self.batches)
        if self.i >= n:
            return None
        self.i += 1
        if self.feeds is not None:
            return self.feeds[self.i - 1]
        return {self.name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


@contextlib.contextmanager
def _quiet() -> Any:
    """ORT's quantizer logs and prints per tensor; keep the run's output readable."""
    buf = io.StringIO()
    lg = logging.getLogger()
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(old)


def preprocess(src: Path, dst: Path) -> list[str]:
    """ORT's quant_pre_process (shape inference + folding BatchNorm into Conv), then stable node names and one
    copy per reader of each shared float initializer; returns the names of those that were shared."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as e:  # ORT raises many types from its optimizer / shape inference
        raise PassError(f"onnxruntime quant_pre_process failed on {src}: {str(e).splitlines()[0][:300]}") from e
    m = name_nodes(onnx.load(str(dst)))
    shared = unshare_initializers(m)  # ORT refuses a weight shared between nodes
    onnx.save_model(m, str(dst))
    return shared


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


def _quantize(src: Path, dst: Path, cfg: QuantizeInt8, scheme: str, reader: _Reader, exclude: list[str],
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
        with _quiet():
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            reduce_range=reduce_range, activation_type=act, weight_type=wt,
                            nodes_to_exclude=list(exclude), calibrate_method=method, extra_options=extra,
                            nodes_to_quantize=None if only is None else [n for n in only if n not in exclude])
    except Exception as e:  # ORT raises ValueError/RuntimeError/its own Fail types
        raise PassError(f"onnxruntime quantize_static failed: {str(e).splitlines()[0][:300]}") from e


def _resolve_keep(keep: tuple[str, ...], nodes: list[str], all_nodes: list[str] | None = None) -> list[str]:
    """keep_float entries as node names: 'first'/'last' quantizable node, or any node of the graph."""
    out = []
    for k in keep:
        if k == "first":
            out.append(nodes[0])
        elif k == "last":
            out.append(nodes[-1])
        elif k in nodes or (all_nodes is not None and k in all_nodes):
            out.append(k)
        else:
            raise RecipeError(f"quantize.int8: keep_float names {k!r}, which is not a quantizable node "
                              "(nor any node of the model); "
                              f"use 'first', 'last' or one of: {', '.join(nodes[:40])}")
    return list(dict.fromkeys(out))


def _accuracy_control(pre: Path, work: Path, cfg: QuantizeInt8, scheme: str, reader: _Reader, keep: list[str],
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


@register_pass(QuantizeInt8, consumes="onnx", produces="onnx", compare_precision="int8",
               accuracy_fields=("max_accuracy_drop",), guard_fields=("min_sample_cosine",))
def quantize_int8(art: Artifact, cfg: QuantizeInt8, ctx: PassContext) -> Artifact:
    """Static INT8 (QDQ) calibrated on the calibration split; optional accuracy control."""
    import onnx

    src = art.path / "model.onnx"
    model = onnx.load(str(src))
    refuse_quantized(model, "quantize.int8")
    if not weighted_nodes(model):
        ops = sorted({n.op_type for n in model.graph.node})
        raise PassError(f"quantize.int8: the model has no quantizable layers (Conv/MatMul/Gemm with constant "
                        f"weights); its ops are {', '.join(ops)}. Remove quantize.int8 from the recipe")
    integer_inputs = [s.name for s in art.inputs if not np.issubdtype(np.dtype(s.dtype), np.floating)]
    static_batch = fixed_batch(src)
    notes: list[str] = []
    name = art.inputs[0].name
    batches: list[np.ndarray] = []
    if ctx.data is None and integer_inputs and cfg.max_accuracy_drop is None and not cfg.smoothquant:
        # Token ids and masks have a known valid range: calibrate on synthetic ones rather than refuse.
        data = None
        feeds, where = guard_feeds(art, None, n=cfg.samples, batch=1 if static_batch else 8)
        reader = _Reader(name, [], feeds)
        notes.append(f"calibrated on {where}: valid token ids and all-ones masks; give data for a calibration "
                     "that matches real inputs")
    elif ctx.data is not None and ctx.data.input_names and cfg.max_accuracy_drop is None and not cfg.smoothquant:
        data = ctx.data  # one named array per input (token ids, masks): calibrate on them as they are
        check_calibration_size(data, "quantize.int8", MIN_CALIB_SAMPLES)
        reader = _Reader(name, [], data.feed_batches(data.calib, 1 if static_batch else 16, cfg.samples))
        notes.append(f"calibrated on {min(cfg.samples, len(data.calib))} samples of {data.name} "
                     f"({', '.join(data.input_names)})")
    else:
        data = _require_data(ctx, "quantize.int8", labelled=cfg.max_accuracy_drop is not None)
        if len(art.inputs) != 1:
            raise PassError(f"quantize.int8: calibration from data supports single-input models; this one has "
                            f"{len(art.inputs)} inputs ({', '.join(s.name for s in art.inputs)}); run without data "
                            "to calibrate on synthetic token ids, or use quantize.dynamic")
        # A model exported with a fixed batch (dynamic_batch=false) takes one sample per call.
        batches = _calib(data, cfg.samples, "quantize.int8", MIN_CALIB_SAMPLES, batch=1 if static_batch else 16)
        reader = _Reader(name, batches)
        notes.append(f"calibrated on {min(cfg.samples, len(data.calib))} samples of {data.name}")
    scheme, why = choose_scheme(cfg.scheme)
    notes.insert(0, f"INT8 scheme: {why}")

    work = ctx.new_dir("q8work")
    pre = work / "pre.onnx"
    shared = preprocess(src, pre)
    if shared:
        notes.append(f"{len(shared)} constant(s) read by several nodes were copied per node so each is quantized "
                     f"on its own: {', '.join(shared[:10])}" + (" ..." if len(shared) > 10 else ""))
    info: dict[str, Any] = {"scheme": scheme, "scheme_reason": why, "per_channel": cfg.per_channel,
                            "calibration": cfg.calibration, "samples": cfg.samples, "activations": cfg.activations}
    if cfg.smoothquant:
        sq = work / "sq.onnx"
        info["smoothquant"] = smooth_quant(pre, sq, name, batches, cfg.smoothquant_alpha)
        if info["smoothquant"]["smoothed_matmuls"] == 0:
            notes.append("smoothquant: no MatMul fed only by a LayerNormalization was found; nothing smoothed")
        pre = sq
    pre_model = onnx.load(str(pre))
    nodes = weighted_nodes(pre_model)
    keep = _resolve_keep(cfg.keep_float, nodes, [n.name for n in pre_model.graph.node])
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
    qmodel = onnx.load(str(out))
    try:
        onnx.checker.check_model(qmodel)
    except Exception as e:  # onnx.checker.ValidationError
        raise PassError(f"quantize.int8 produced an invalid ONNX graph: {e}") from e
    n_q = sum(1 for n in qmodel.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise PassError("quantize.int8: ONNX Runtime quantized nothing (every quantizable node was excluded?)")
    float_groups = {"keep_float": [k for k in keep]}
    if groups is not None:
        float_groups.update(groups)
    float_groups = {k: [n for n in v if n] for k, v in float_groups.items()}
    n_float_weighted = len([n for n in nodes if n in keep or (only is not None and n not in only)])
    info.update(kept_float=keep, float_nodes=float_groups, quantized_nodes=len(nodes) - n_float_weighted,
                quantizable_nodes=len(nodes), quantize_linear_nodes=n_q)
    if float_nodes_note(float_groups):
        notes.append(float_nodes_note(float_groups))
    # Without labels nothing else would notice a wrecked model: compare to the input model, per sample.
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
    shutil.rmtree(work, ignore_errors=True)

    # Deployed (ORT fused integer kernels) vs simulated (reference Q/DQ, float compute) on the validation split,
    # and deployed vs the float input model: either out of tolerance fails the pass.
    info["parity"] = _self_parity(out, art, data, cfg, scheme)
    info["notes"] = notes
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.int8": info},
                    facts=art.known_facts().lower_precision("int8").evolve(quantization="qdq"))


def _self_parity(qpath: Path, art: Artifact, data: Any, cfg: QdqParityOptions, scheme: str | None = None
                 ) -> dict[str, Any]:
    """Deployed (ONNX Runtime's fused integer kernels) vs simulated, and deployed vs the float input; a breach fails
    the pass (``cfg.kind`` names it). Models with several named inputs are fed the run's named arrays (or valid
    synthetic inputs)."""
    batch = parity_batch(art, 64)
    if data is None or bool(getattr(data, "input_names", None)):  # no data, or several named inputs
        feeds, inputs = guard_feeds(art, data, n=min(cfg.parity_samples, 64), batch=batch)
        y = None

        def run(sess: Any) -> np.ndarray:
            return np.concatenate([np.asarray(sess.run(None, f)[0], dtype=np.float32) for f in feeds])
    else:
        name = art.inputs[0].name
        xs, y = split_inputs(data, "val", cfg.parity_samples, batch)
        inputs = "validation split"

        def run(sess: Any) -> np.ndarray:
            return run_batches(session_infer(sess), name, xs)

    sim = run(ort_session(qpath, optimize=False))
    dep = run(ort_session(qpath, optimize=True))
    fp = run(ort_session(art.path / "model.onnx", optimize=True))
    tol = LOWERING["int8"].override(min_cosine=cfg.deployed_min_cosine, min_agreement=cfg.deployed_min_agreement)
    out = check(sim, dep, tol, precision="int8", reference="the simulated Q/DQ model (ONNX Runtime reference kernels)",
                inputs=inputs, real_data=y is not None)
    out["target"] = "onnxruntime"
    out["flagged"] = not out["ok"]
    if not out["ok"]:
        # The 7-bit scheme is the fix for saturation on CPUs without VNNI: offered only when not already in use.
        fix = ("" if scheme == "u8s8_reduce_range" else
               "On a CPU without VNNI use scheme='u8s8_reduce_range' (or 'auto'); ")
        raise PassError(f"{cfg.kind}: deployed INT8 on ONNX Runtime (this CPU) disagrees with the simulated model: "
                        f"{out['reason']}. {fix}lower "
                        "deployed_min_agreement/deployed_min_cosine only if this backend is not your deployment")
    vs = check(fp, dep, cfg.tolerance("int8"), precision="int8", reference="its float input model (ONNX Runtime)",
               inputs=inputs, real_data=y is not None)
    if not vs["ok"]:
        raise PassError(f"{cfg.kind}: the output differs from its input model beyond the tolerance: {vs['reason']}; "
                        "keep sensitive layers in float (keep_float, max_accuracy_drop), or loosen min_cosine/"
                        "min_agreement")
    out["vs_float"] = vs
    if y is not None and dep.ndim == 2:
        out.update(top1_float=float((fp.argmax(1) == y).mean()), top1_simulated=float((sim.argmax(1) == y).mean()),
                   top1_deployed=float((dep.argmax(1) == y).mean()))
    return out
