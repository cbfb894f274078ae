"""Numerical parity: a lowered or compiled model must compute what its input model computes.

One comparison (``compare_outputs``) and one judgement (``check``) serve every place that lowers
a model: export to ONNX (against PyTorch), the ONNX-producing passes (against the ONNX model they
were given) and every compiled target (against its input ONNX model run by ONNX Runtime's
reference kernels, i.e. with graph optimizations off; for a Q/DQ model that reference *is* the
simulated, fake-quantized model). A breach is one line saying what was measured against which
bound; passes raise it, targets fail their cell with it. Tolerances depend on the precision the
check allows for, and every bound can be overridden in the pass or target config.

Two tables, because the questions differ:

* ``LOWERING``: the same math on other kernels (ONNX Runtime's fused graph, TVM, TensorRT). FP32
  is tight; FP16 allows half-precision rounding; INT8 (deployed integer kernels against the
  simulation) allows one quantization step here and there, so it bounds cosine and top-1
  agreement rather than the largest difference.
* ``QUANTIZATION``: a quantizing pass against its float input, i.e. the quantization error
  itself. These catch a broken result (saturated integer kernels, overflowing FP16), not a small
  accuracy loss: accuracy control (``max_accuracy_drop``) is the tool for that.

Figures measured while choosing the defaults (``benchmarks/bench_parity.py``: digits CNN trained 5
epochs and the zoo transformer, 256 validation samples, a Xeon with VNNI): FP32 on ONNX Runtime and
untuned TVM within 7e-7 of the largest output of the reference; FP16 on TVM 0.4%; INT8 deployed on
ONNX Runtime against the simulation cosine >= 0.9991, agreement 100%; INT8 against float cosine
>= 0.9988, weight-only INT4 0.9962. TensorRT's figures are not measured here (no GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from pydantic import Field

from ..core.artifact import Artifact
from ..core.config import PassConfig


@dataclass(frozen=True)
class Tolerance:
    """Bounds on a comparison. ``None`` leaves that figure unchecked (it is still measured and recorded).

    The largest absolute difference may be at most ``atol + rtol * max|reference|``; argmax
    agreement is only checked on real data (on random inputs of an untrained model the top class
    is a coin toss between near-equal logits).
    """

    atol: float | None = None
    rtol: float = 0.0
    min_cosine: float | None = None
    min_agreement: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def override(self, **kw: float | None) -> Tolerance:
        """A copy with the given bounds replaced; ``None`` values keep the default."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]

    def text(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"max abs diff <= {self.atol:g}" + (f" + {self.rtol:g} x max|ref|" if self.rtol else ""))
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.min_agreement is not None:
            parts.append(f"top-1 agreement >= {self.min_agreement:g} (real data)")
        return ", ".join(parts) or "none"


LOWERING: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.9999),
    "fp16": Tolerance(atol=1e-3, rtol=2e-2, min_cosine=0.999, min_agreement=0.98),
    "int8": Tolerance(min_cosine=0.995, min_agreement=0.98),
}
QUANTIZATION: dict[str, Tolerance] = {
    "fp16": Tolerance(atol=1e-3, rtol=2e-2, min_cosine=0.999, min_agreement=0.98),
    "int8": Tolerance(min_cosine=0.98, min_agreement=0.90),
    "int4": Tolerance(min_cosine=0.95, min_agreement=0.85),
}


class ParityOptions(PassConfig):
    """Parity settings shared by the ONNX-producing quantization passes. ``None`` = the precision's default
    in ``QUANTIZATION``; the check compares the pass's output with its input model on ONNX Runtime."""

    atol: float | None = Field(None, ge=0, description="parity: max abs diff allowed (plus rtol x max|ref|)")
    rtol: float | None = Field(None, ge=0, description="parity: share of the largest reference output added to atol")
    min_cosine: float | None = Field(None, ge=-1, le=1,
                                     description="parity: output cosine vs the input model (-1 = off)")
    min_agreement: float | None = Field(None, ge=0, le=1, description="parity: top-1 agreement (real data only)")
    parity_samples: int = Field(256, ge=1, le=100_000, description="parity: validation (or random) samples compared")

    def tolerance(self, precision: str) -> Tolerance:
        return QUANTIZATION[precision].override(atol=self.atol, rtol=self.rtol, min_cosine=self.min_cosine,
                                                min_agreement=self.min_agreement)


def tolerance_note() -> str:
    """The default tolerances in one line, for reports."""
    low = "; ".join(f"{p} {t.text()}" for p, t in LOWERING.items())
    qua = "; ".join(f"{p} {t.text()}" for p, t in QUANTIZATION.items())
    return (f"parity tolerances (settable per pass/target): targets and export vs their input model: {low}. "
            f"Quantizing passes vs their float input: {qua}")


def _flat(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(a) for a in x]


def compare_outputs(ref: np.ndarray | Sequence[np.ndarray], got: np.ndarray | Sequence[np.ndarray]) -> dict[str, Any]:
    """Max/mean abs diff, the largest reference magnitude, cosine and top-1 agreement of two outputs.

    Lists are compared output by output (flattened and concatenated); agreement is that of the first
    output's argmax over its last axis when it has a batch and a class axis, else 1.0.
    """
    refs, gots = _flat(ref), _flat(got)
    if len(refs) != len(gots):
        raise ValueError(f"{len(gots)} outputs against {len(refs)} in the reference")
    for r, g in zip(refs, gots, strict=True):
        if r.shape != g.shape:
            raise ValueError(f"output shape {list(g.shape)} against {list(r.shape)} in the reference")
    a = np.concatenate([r.astype(np.float64).ravel() for r in refs]) if refs else np.zeros(0)
    b = np.concatenate([g.astype(np.float64).ravel() for g in gots]) if gots else np.zeros(0)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    diff = np.abs(a - b)
    first_r, first_g = refs[0] if refs else a, gots[0] if gots else b
    # Argmax agreement only means something for class scores; embeddings get their worst per-sample cosine.
    from .fidelity import _per_sample_cosine, infer_kind

    kind = infer_kind(first_r)[0] if first_r.ndim >= 1 and len(first_r) else "logits"
    extra: dict[str, float | str] = {"kind": kind}
    if kind == "logits" and first_r.ndim >= 2 and len(first_r):
        agree = float((first_r.reshape(len(first_r), -1).argmax(1) == first_g.reshape(len(first_g), -1).argmax(1))
                      .mean())
    else:
        agree = 1.0  # not applicable: never judged
        if kind == "embedding" and len(first_r):
            extra["cosine_worst"] = float(_per_sample_cosine(first_r.astype(np.float64),
                                                              first_g.astype(np.float64)).min())
    return {"max_abs_diff": float(diff.max(initial=0.0)), "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "max_abs_ref": float(np.abs(a).max(initial=0.0)), "cosine": cos, "agreement": agree, **extra}


def breach(measured: dict[str, float], tol: Tolerance, real_data: bool) -> str | None:
    """The first bound ``measured`` breaks, as a phrase, or None."""
    cos = measured["cosine"]
    if not np.isfinite(measured["max_abs_diff"]) or not np.isfinite(cos):
        return "the output holds NaN or Inf"
    if tol.atol is not None:
        allowed = tol.atol + tol.rtol * measured["max_abs_ref"]
        if measured["max_abs_diff"] > allowed:
            return f"max abs diff {measured['max_abs_diff']:.3g} > allowed {allowed:.3g}"
    if tol.min_cosine is not None and cos < tol.min_cosine:
        return f"cosine {cos:.6f} < {tol.min_cosine:g}"
    if (real_data and tol.min_agreement is not None and measured.get("kind", "logits") == "logits"
            and measured["agreement"] < tol.min_agreement):
        return f"top-1 agreement {measured['agreement']:.4f} < {tol.min_agreement:g}"
    return None


def check(ref: np.ndarray | Sequence[np.ndarray], got: np.ndarray | Sequence[np.ndarray], tol: Tolerance, *,
          precision: str, reference: str, inputs: str, real_data: bool) -> dict[str, Any]:
    """Compare and judge; the record (figures, tolerance, verdict) goes into metadata and the report.

    ``reference`` names what ``ref`` came from, ``inputs`` what was fed ("validation split", ...).
    ``ok`` is False and ``reason`` one line when a bound is broken.
    """
    m = compare_outputs(ref, got)
    why = breach(m, tol, real_data)
    first = _flat(ref)[0]
    n = len(first) if first.ndim else 1
    reason = None
    if why is not None:
        reason = f"{why} against {reference} ({precision} tolerance: {tol.text()}; {n} samples, {inputs})"
    return {**m, "precision": precision, "reference": reference, "inputs": inputs, "samples": n,
            "agreement_checked": real_data and tol.min_agreement is not None,
            "tolerance": tol.to_json(), "ok": why is None, "reason": reason}


def model_precision(art: Artifact) -> str:
    """The tolerance class a lowering of ``art`` is judged at: the lowest precision its facts say it
    computes in (int8, fp16 or fp32; int4 weights dequantize to the same integer grid as int8)."""
    precision = art.known_facts().precision
    return "int8" if precision == "int4" else precision


Feeds = list[dict[str, np.ndarray]]


def parity_inputs(art: Artifact, data: Any, samples: int, batch: int, seed: int = 0) -> tuple[Feeds, str, Any]:
    """Batches of feeds for ``art``: the validation split when there is data for a single-input model, else
    seeded random inputs. Returns (feeds, a description, labels or None)."""
    if data is not None and len(art.inputs) == 1 and len(data.val) > 0:
        from ..measuring.ort import split_inputs

        xs, y = split_inputs(data, "val", samples, batch)
        name = art.inputs[0].name
        return [{name: np.ascontiguousarray(x, dtype=np.float32)} for x in xs], "validation split", y
    from ..inputs.torch_io import sample_inputs

    feeds = []
    for i in range(max(1, -(-samples // batch))):
        ts = sample_inputs(art.inputs, batch=batch, seed=seed + 7919 * i)
        feeds.append({s.name: t.numpy() for s, t in zip(art.inputs, ts, strict=True)})
    return feeds, "random inputs", None


def run_feeds(infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]], feeds: Feeds) -> list[np.ndarray]:
    """Every output of ``infer`` over the batches, concatenated along the batch axis."""
    outs = [[np.asarray(o) for o in infer(f)] for f in feeds]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def parity_batch(art: Artifact, want: int = 32) -> int:
    """``want`` when the ONNX model's batch dimension is symbolic, else its fixed batch."""
    import onnx

    model = onnx.load(str(art.path / "model.onnx"), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return want
    return want


def reference_infer(onnx_path: Any) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """ONNX Runtime with graph optimizations off: reference kernels, and for Q/DQ the simulated model."""
    from ..measuring.ort import ort_session, session_infer

    return session_infer(ort_session(onnx_path, optimize=False))


def target_tolerance(config: Any, precision: str) -> Tolerance:
    """The lowering tolerance for ``precision`` with the target config's ``parity_*`` overrides applied."""
    return LOWERING[precision].override(atol=getattr(config, "parity_atol", None),
                                        rtol=getattr(config, "parity_rtol", None),
                                        min_cosine=getattr(config, "parity_min_cosine", None),
                                        min_agreement=getattr(config, "parity_min_agreement", None))


def target_parity(src: Artifact, infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]], data: Any,
                  config: Any, precision: str, batch: int, seed: int = 0) -> dict[str, Any]:
    """A compiled target (``infer``) against its input ONNX model ``src`` run with reference kernels."""
    samples = int(getattr(config, "parity_samples", 128))
    feeds, inputs, y = parity_inputs(src, data, samples, batch, seed)
    quantized = precision == "int8" and model_precision(src) == "int8"
    what = ("its INT8 input model on ONNX Runtime's reference kernels (for Q/DQ: the simulated model)" if quantized
            else "its input ONNX model on ONNX Runtime's reference kernels")
    try:
        ref = run_feeds(reference_infer(src.path / "model.onnx"), feeds)
    except Exception as e:  # ORT cannot run this graph (e.g. a custom op only the target implements)
        return {"ok": None, "flagged": False, "precision": precision, "reference": what, "inputs": inputs,
                "reason": f"ONNX Runtime could not run the input model as the reference: {str(e).splitlines()[0]}"}
    got = run_feeds(infer, feeds)
    rec = check(ref, got, target_tolerance(config, precision), precision=precision, reference=what, inputs=inputs,
                real_data=y is not None)
    rec["flagged"] = not rec["ok"]
    if y is not None and ref[0].ndim == 2:
        rec["top1_reference"] = float((ref[0].argmax(1) == y).mean())
        rec["top1_deployed"] = float((got[0].argmax(1) == y).mean())
        if quantized:
            rec["top1_simulated"] = rec["top1_reference"]
    return rec
