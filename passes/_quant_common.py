"""Shared pieces of the quantization passes: data checks, ORT sessions, schemes, parity.

The "simulated" model of a QDQ graph is the same graph run by ONNX Runtime with
every graph optimization disabled: QuantizeLinear/DequantizeLinear then execute
as separate reference kernels around float Conv/MatMul, i.e. exact fake
quantization. The "deployed" model is the graph after ORT fuses the QDQ pairs
into integer kernels (QLinearConv, MatMulInteger, ...). Comparing the two is
what catches integer-kernel problems such as u8 x s8 saturation on CPUs
without VNNI.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field

from compress.core.artifact import Artifact
from compress.core.int8_scheme import choose_scheme
from compress.errors import InputError, PassError
from compress.measuring.ort import ort_session, session_infer, split_inputs
from compress.quality.parity import LOWERING, ParityOptions, check, parity_batch

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError(f"group_size must be a power of two (16, 32, 64, 128, ...), got {v}")
    return v


# Weights per quantization group of the weight-only passes: what the block quantizers accept.
GroupSize = Annotated[int, Field(ge=16, le=4096), AfterValidator(_power_of_two)]
# Integer dot-product instructions that accumulate u8 x s8 in 32 bits (no 16-bit saturation).
# Agreement of deployed vs simulated below these fails (quality.parity.LOWERING["int8"]; settable).
PARITY_MIN_AGREEMENT = 0.98
PARITY_MIN_COSINE = 0.995


def require_data(ctx: Any, kind: str, labelled: bool = False) -> Any:
    """The run's DataBundle, or a clear error saying to set ``data``."""
    data = getattr(ctx, "data", None)
    if data is None:
        raise PassError(
            f"{kind} needs calibration data but the run has none; set `data` in the recipe "
            "(e.g. data = { source = \"builtin:digits\" }) or pass data= to compress.apply"
        )
    if labelled and not data.labelled:
        raise PassError(f"{kind}: this option needs labelled data; {data.name} has no labels")
    return data


def check_finite(x: np.ndarray, where: str, kind: str, offset: int = 0) -> None:
    """Refuse NaN/Inf samples, naming the first bad sample index."""
    flat = np.asarray(x).reshape(len(x), -1)
    ok = np.isfinite(flat).all(axis=1)
    if not ok.all():
        bad = int(np.argwhere(~ok)[0][0]) + offset
        raise InputError(f"{kind}: {where} sample {bad} contains NaN or Inf; remove or fix it before calibrating")


def check_calibration_size(data: Any, kind: str, minimum: int) -> None:
    """At least ``minimum`` calibration samples (called in the plan, ``PassConfig.check_data``, and again here)."""
    n = len(data.calib)
    if n < minimum:
        raise InputError(f"{kind}: the calibration split of {data.name} has {n} samples, fewer than the minimum "
                         f"{minimum}; raise data.calib_fraction or supply more data")


def calibration_batches(data: Any, samples: int, kind: str, minimum: int, batch: int = 16) -> list[np.ndarray]:
    """Up to ``samples`` calibration samples from ``data.calib``, adapted to the model input, in batches. A smaller
    split is used whole (as for token data), so the default ``samples`` fits any data set over the minimum."""
    check_calibration_size(data, kind, minimum)
    samples = min(samples, len(data.calib))
    x = data.calib.x[:samples]
    check_finite(x, "calibration", kind)
    out = []
    for i in range(0, samples, batch):
        a = data.adapt(x[i:i + batch]).numpy()
        check_finite(a, "calibration (after adapting to the input shape)", kind, offset=i)
        out.append(np.ascontiguousarray(a, dtype=np.float32))
    return out


def weighted_nodes(model: Any, ops: Iterable[str] = QUANTIZABLE_OPS) -> list[str]:
    """Names of Conv/MatMul/Gemm nodes whose weight (input 1) is a constant, in graph order."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = tuple(ops)
    return [n.name for n in model.graph.node if n.op_type in ops and len(n.input) > 1 and n.input[1] in consts]


def refuse_quantized(model: Any, kind: str) -> None:
    """A graph that already holds Q/DQ or integer ops (from quantize.qat or another pass) is not re-quantized."""
    q = sorted({n.op_type for n in model.graph.node if n.op_type in (
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
        "QLinearMatMul", "MatMulNBits")})
    if q:
        raise PassError(f"{kind}: the model is already quantized (it holds {', '.join(q)}); quantize it once "
                        "(after quantize.qat, export.onnx alone gives the INT8 QDQ model)")


def auto_scheme_env(scheme: str) -> dict[str, str]:
    """Cache-key facts for scheme='auto': the resolved scheme depends on this CPU's ISA."""
    return {"auto_scheme": choose_scheme("auto")[0]} if scheme == "auto" else {}


def name_nodes(model: Any) -> Any:
    """Give every unnamed node a stable name (ORT's exclusion lists and our reports key on names)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return model


def unshare_initializers(model: Any) -> list[str]:
    """Give each node its own copy of a float initializer that several nodes read; the names that were shared.

    ONNX Runtime's static quantizer refuses a weight read by more than one node ("Quantization parameter
    shared mode is not supported for weight yet"): exporters share one constant between nodes (PoolFormer's
    GroupNorm scale, tied embeddings). A copy per node lets each be quantized with its own parameters; the
    first reader keeps the original."""
    from onnx import TensorProto

    floats = {i.name: i for i in model.graph.initializer
              if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)}
    readers: dict[str, int] = {}
    shared: list[str] = []
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            if name not in floats:
                continue
            readers[name] = readers.get(name, 0) + 1
            if readers[name] == 1:
                continue
            if readers[name] == 2:
                shared.append(name)
            copy = model.graph.initializer.add()
            copy.CopyFrom(floats[name])
            copy.name = f"{name}__copy{readers[name] - 1}"
            node.input[j] = copy.name
    return shared


def run_batches(infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]], input_name: str,
                xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(infer({input_name: x})[0], dtype=np.float32) for x in xs])


def compare(ref: np.ndarray, got: np.ndarray, kind: str | None = None) -> dict[str, Any]:
    """Cosine and max abs diff of two outputs, plus the comparison that fits the output (compress.quality.fidelity).

    ``kind`` None infers it from the shape: argmax agreement only for class logits, per-sample
    cosine (mean and worst) for embeddings / hidden states, SNR for regression.
    """
    from compress.quality.fidelity import compare_outputs, infer_kind

    k = kind or infer_kind(np.asarray(ref))[0]
    out = compare_outputs(ref, got, k)
    return out


def below(out: dict[str, Any], min_agreement: float, min_cosine: float) -> bool:
    """Whether a :func:`compare` record falls under the tolerances (agreement counts only for logits)."""
    cos = out.get("cosine_worst", out["cosine"]) if out.get("kind") == "embedding" else out["cosine"]
    return bool(out.get("agreement", 1.0) < min_agreement or cos < min_cosine)


def pass_parity(kind: str, art: Artifact, out_path: Path, ctx: Any, tol: Any, precision: str, samples: int,
                hint: str) -> dict[str, Any]:
    """A quantizing pass's output (``out_path``) against its input model ``art``, both on ONNX Runtime, on the
    validation split (or seeded random inputs without data). Returns the parity record for the metadata;
    raises PassError with one line naming the figure and its bound on a breach (``hint`` says what to do)."""
    from compress.quality.parity import parity_inputs, run_feeds

    feeds, inputs, y = parity_inputs(art, getattr(ctx, "data", None), samples, parity_batch(art),
                                     getattr(ctx, "seed", 0))
    ref = run_feeds(session_infer(ort_session(art.path / "model.onnx")), feeds)
    got = run_feeds(session_infer(ort_session(out_path)), feeds)
    rec = check(ref, got, tol, precision=precision, reference="its input model (ONNX Runtime)", inputs=inputs,
                real_data=y is not None)
    if not rec["ok"]:
        raise PassError(f"{kind}: the output differs from its input model beyond the tolerance: {rec['reason']}; "
                        f"{hint}")
    return rec


def simulated_agreement(
    onnx_art: Artifact,
    infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    data: Any = None,
    split: str = "val",
    max_samples: int = 128,
    batch: int = 1,
    min_agreement: float = PARITY_MIN_AGREEMENT,
    min_cosine: float = PARITY_MIN_COSINE,
) -> dict[str, Any]:
    """Agreement of a deployed model (``infer``, e.g. a target runner's ``infer``) with the simulated QDQ model.

    ``onnx_art`` is the quantized ONNX artifact the target compiled. The simulation is that graph run
    by ONNX Runtime with optimizations off (reference Q/DQ kernels, float compute). Inputs are the
    ``split`` of ``data`` (first ``max_samples``), or random inputs when ``data`` is None. Returns
    agreement of argmax predictions, output cosine, max abs diff, the top-1 of both against labels
    when present, and ``flagged`` (True when below ``min_agreement`` or ``min_cosine``).
    """
    spec = onnx_art.inputs[0]
    sim = ort_session(onnx_art.path / "model.onnx", optimize=False)
    if len(onnx_art.inputs) > 1:  # several named inputs: the data's named arrays, or valid synthetic feeds
        feeds, _ = guard_feeds(onnx_art, data, n=max_samples, batch=batch)
        ref = np.concatenate([np.asarray(sim.run(None, f)[0], dtype=np.float32) for f in feeds])
        got = np.concatenate([np.asarray(infer(f)[0], dtype=np.float32) for f in feeds])
        xs: list[np.ndarray] = [next(iter(f.values())) for f in feeds]
        y = None
    else:
        if data is not None:
            xs, y = split_inputs(data, split, max_samples, batch)
        else:
            from compress.inputs.torch_io import sample_inputs

            n_batches = max(1, max_samples // batch)
            xs = [sample_inputs(onnx_art.inputs, batch=batch, seed=i)[0].numpy() for i in range(n_batches)]
            y = None
        ref = run_batches(session_infer(sim), spec.name, xs)
        got = run_batches(infer, spec.name, xs)
    out: dict[str, Any] = {**compare(ref, got), "samples": int(sum(len(x) for x in xs)), "split": split if data else
                           "random"}
    if y is not None and ref.ndim == 2:
        out["top1_simulated"] = float((ref.argmax(1) == y).mean())
        out["top1_deployed"] = float((got.argmax(1) == y).mean())
    out["flagged"] = below(out, min_agreement, min_cosine)
    out["tolerance"] = {"min_agreement": min_agreement, "min_cosine": min_cosine}
    return out


def scheme_types(scheme: str) -> tuple[Any, Any, bool]:
    """(activation QuantType, weight QuantType, reduce_range) for a scheme name."""
    from onnxruntime.quantization import QuantType

    return {
        "u8s8": (QuantType.QUInt8, QuantType.QInt8, False),
        "u8s8_reduce_range": (QuantType.QUInt8, QuantType.QInt8, True),
        "u8u8": (QuantType.QUInt8, QuantType.QUInt8, False),
        "s8s8": (QuantType.QInt8, QuantType.QInt8, False),
    }[scheme]


def onnx_top1(path: Path | str, data: Any, split: str = "val", batch: int = 64,
              max_samples: int | None = None) -> tuple[float, np.ndarray]:
    """Top-1 of an ONNX model on a labelled split with ONNX Runtime (optimized), and its logits."""
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    xs, y = split_inputs(data, split, max_samples, batch)
    logits = run_batches(session_infer(sess), name, xs)
    if y is None:
        raise PassError("top-1 needs labelled data")
    return float((logits.argmax(1) == y).mean()), logits


# --- transformer presets and the fidelity guard -------------------------------------------------

# Ops that stay float in a transformer (as NNCF's transformer preset and ORT's transformer tooling do):
# softmax probabilities and normalised activations lose too much at 8 bits.
TRANSFORMER_FLOAT_OPS = ("Softmax", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization")
_MASK_OPS = ("Add", "Sub", "Mul", "Where", "Div")
# Below this mean per-sample cosine to the input model a quantization pass fails (no labels needed).
GUARD_MIN_COSINE = 0.95


def _const_names(model: Any) -> set[str]:
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return consts


def transformer_float_nodes(model: Any) -> dict[str, list[str]] | None:
    """Nodes of a transformer graph to keep in float, by category; None when the graph has no attention.

    Attention is recognised by a Softmax together with LayerNormalization or a MatMul of two
    activations (q @ k^T). Mask arithmetic is the Add/Sub/Mul/Where/Div that combines a tensor computed
    only from integer inputs (an attention mask) with activations; quantizing it turns the large
    negative mask bias into noise that leaks into every attention row.
    """
    import onnx

    nodes = list(model.graph.node)
    ops = {n.op_type for n in nodes}
    consts = _const_names(model)
    attn_mm = [n.name for n in nodes if n.op_type == "MatMul" and not any(i in consts for i in n.input[:2])]
    if "Softmax" not in ops or not (attn_mm or ops & set(TRANSFORMER_FLOAT_OPS)):
        return None
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    derived = {i.name for i in model.graph.input if i.type.tensor_type.elem_type not in float_types}
    mask: list[str] = []
    for n in nodes:  # ONNX nodes are topologically sorted
        live = [i for i in n.input if i and i not in consts]
        hit = [i for i in live if i in derived]
        if not hit:
            continue
        if n.op_type in ("Gather", "GatherElements") and n.input[0] in consts:
            continue  # an embedding lookup: its output is hidden states, not a mask
        if len(hit) == len(live):
            derived.update(o for o in n.output if o)  # still pure mask (or shape) arithmetic
        elif n.op_type in _MASK_OPS:
            mask.append(n.name)
    return {
        "mask": mask,
        "softmax": [n.name for n in nodes if n.op_type == "Softmax"],
        "layernorm": [n.name for n in nodes if n.op_type in TRANSFORMER_FLOAT_OPS and n.op_type != "Softmax"],
        "attention_matmul": attn_mm,
    }


def float_nodes_note(groups: dict[str, list[str]]) -> str:
    """One note listing every node kept in float, by the names skip takes."""
    parts = [f"{k.replace('_', ' ')} ({len(v)}): {', '.join(v)}" for k, v in groups.items() if v]
    return "kept in float (names as skip takes them): " + "; ".join(parts) if parts else ""


def fixed_batch(path: Path | str) -> bool:
    """Whether an ONNX model's first input has a fixed batch dimension (exported with dynamic_batch=false)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0
    return False


def guard_feeds(art: Artifact, data: Any, n: int = 64, batch: int = 16) -> tuple[list[dict[str, np.ndarray]], str]:
    """Inputs for the fidelity guard: the validation split when the run has data, else valid synthetic inputs.

    A model exported with a fixed batch gets batches of 1."""
    onnx_file = art.path / "model.onnx"
    if art.kind == "onnx" and onnx_file.exists() and fixed_batch(onnx_file):
        batch = 1
    if data is not None and bool(getattr(data, "input_names", None)):
        feeds = data.feed_batches(data.val, batch, n)
        return feeds, f"{sum(len(next(iter(f.values()))) for f in feeds)} validation samples"
    if data is not None and len(art.inputs) == 1:
        xs, _ = split_inputs(data, "val", n, batch)
        return [{art.inputs[0].name: x} for x in xs], f"{sum(len(x) for x in xs)} validation samples"
    from compress.inputs.torch_io import sample_inputs

    b = batch
    feeds = []
    for i in range(max(1, n // b)):
        ts = sample_inputs(art.inputs, batch=b, seed=1000 + i)
        feeds.append({s.name: t.numpy() for s, t in zip(art.inputs, ts, strict=True)})
    return feeds, f"{b * len(feeds)} synthetic inputs (no data in the run)"


def fidelity_guard(fpath: Path, qpath: Path, art: Artifact, data: Any, min_cosine: float | None,
                   kind: str, advice: Sequence[str] = ()) -> dict[str, Any]:
    """Per-sample cosine of the quantized model's first output to the input model's; refuse a broken model.

    Needs no labels, so a quantization that wrecks the model (e.g. quantized attention masks) is a
    failed step rather than an ``ok`` row. ``advice``: settings the caller checked the run does not already
    have (compress.core.config.true_advice), offered beside keeping nodes in float.
    """
    from compress.errors import AccuracyError
    from compress.quality.fidelity import compare_outputs, degenerate

    feeds, where = guard_feeds(art, data)
    fs, qs = ort_session(fpath), ort_session(qpath)
    ref = np.concatenate([np.asarray(fs.run(None, f)[0], dtype=np.float32) for f in feeds])
    got = np.concatenate([np.asarray(qs.run(None, f)[0], dtype=np.float32) for f in feeds])
    c = compare_outputs(ref, got, "embedding")  # per-sample cosine fits logits and embeddings alike
    out: dict[str, Any] = {"cosine_mean": c["cosine_mean"], "cosine_worst": c["cosine_worst"],
                           "min_sample_cosine": min_cosine, "on": where}
    why = degenerate(ref)
    if why is not None:
        out["unchecked"] = why
        return out
    if min_cosine is not None and c["cosine_mean"] < min_cosine:
        raise AccuracyError(
            f"{kind}: the quantized model's output is far from the input model's: per-sample cosine "
            f"{c['cosine_mean']:.4f} mean, {c['cosine_worst']:.4f} worst (min_sample_cosine {min_cosine}) on "
            f"{where}; " + ", ".join(["keep more nodes in float (skip)", *advice])
            + ", or lower min_sample_cosine")
    return out


# ---------------------------------------------------------------- running ORT's quantizer


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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
        with quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as e:  # ORT raises many types from its optimizer / shape inference
        raise PassError(f"onnxruntime quant_pre_process failed on {src}: {str(e).splitlines()[0][:300]}") from e
    m = name_nodes(onnx.load(str(dst)))
    shared = unshare_initializers(m)  # ORT refuses a weight shared between nodes
    onnx.save_model(m, str(dst))
    return shared


class CalibrationReader:
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


# ---------------------------------------------------------------- deployed vs simulated Q/DQ


class FloatBreach(PassError):
    """The quantized model is too far from its float input model (not a backend mismatch): keeping the nodes
    responsible in float is the fix the pass can look for (passes/_quant_blame.py)."""


class QdqParityOptions(ParityOptions):
    """Parity settings of a pass that writes Q/DQ: deployed integer kernels vs the simulated graph."""

    deployed_min_cosine: float | None = Field(
        None, ge=-1, le=1, description="deployed (ONNX Runtime integer kernels) vs simulated Q/DQ: output cosine; "
        "None = compress.quality.parity.LOWERING['int8']")
    deployed_min_agreement: float | None = Field(
        None, ge=0, le=1, description="deployed vs simulated: top-1 agreement; None = the INT8 default")


def self_parity(qpath: Path, art: Artifact, data: Any, cfg: QdqParityOptions, scheme: str | None = None
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
        raise FloatBreach(f"{cfg.kind}: the output differs from its input model beyond the tolerance: "
                          f"{vs['reason']}; keep sensitive layers in float (skip, max_accuracy_drop), or loosen "
                          "min_cosine/min_agreement")
    out["vs_float"] = vs
    if y is not None and dep.ndim == 2:
        out.update(top1_float=float((fp.argmax(1) == y).mean()), top1_simulated=float((sim.argmax(1) == y).mean()),
                   top1_deployed=float((dep.argmax(1) == y).mean()))
    return out
