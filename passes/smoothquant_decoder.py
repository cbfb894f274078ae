"""SmoothQuant on an ONNX decoder (the onnxruntime-genai builder's graph): move activation outliers into the
weights before static INT8, exactly in float.

A static INT8 activation has one scale per tensor, so a few channels with large values (the outliers every
LLM has after its norms) take the whole 8-bit range and the rest round to a handful of levels. SmoothQuant
(Xiao et al., 2023) divides activation channel ``c`` by ``s_c`` and multiplies row ``c`` of the weight that
reads it by ``s_c``: the product is unchanged, the activation is flatter, the weight (quantized per output
channel) absorbs it. ``s_c = max|X_c|^alpha / max|W_c|^(1 - alpha)``, ``alpha`` trading one for the other.

The division is folded into the op that produces the activation, so no op is added:
* a norm (SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization: RMSNorm; LayerNormalization /
  SkipLayerNormalization) whose normalised output feeds only MatMuls: its scale (and bias) divided by ``s``;
  this covers the attention input (q/k/v, packed or not), the MLP input (gate/up) and the LM head;
* ``Mul(act(gate), up)`` feeding only MatMuls (the gated MLP's ``down_proj`` input, where the largest
  outliers are): ``up_proj``'s weight columns divided by ``s``, since the Mul is linear in ``up``.
Attention's output projection (``o_proj``) is left unsmoothed: its input comes out of the fused attention op,
and a per-channel scale would have to go into the value projection shared by a group of query heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Norm ops: where their scale (gamma) and bias (beta) inputs are, when present.
_NORMS = {"SimplifiedLayerNormalization": (1, None), "SkipSimplifiedLayerNormalization": (2, None),
          "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}
_SCALE_CLIP = (1e-2, 1e2)
AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def smoothing_groups(model: Any) -> list[dict[str, Any]]:
    """Where a per-channel scale can be folded in: ``{"kind", "src" (the node folded into), "tensor" (the
    activation smoothed), "matmuls" (its readers), "up" (the up MatMul, for a gated MLP)}``."""
    inits = {i.name for i in model.graph.initializer}
    cons = _consumers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    outs = {o.name for o in model.graph.output}

    def readers(t: str) -> list[Any] | None:
        users = cons.get(t, [])
        if t in outs or not users or not all(u.op_type == "MatMul" and u.input[0] == t and u.input[1] in inits
                                             for u in users):
            return None
        return users

    groups: list[dict[str, Any]] = []
    for n in model.graph.node:
        if n.op_type in _NORMS:
            gi, bi = _NORMS[n.op_type]
            if len(n.input) <= gi or n.input[gi] not in inits:
                continue
            if bi is not None and len(n.input) > bi and n.input[bi] and n.input[bi] not in inits:
                continue
            users = readers(n.output[0])
            if users:
                groups.append({"kind": "norm", "src": n, "tensor": n.output[0], "matmuls": users})
        elif n.op_type == "Mul":
            users = readers(n.output[0])
            if not users:
                continue
            for t in n.input:  # the operand that is a MatMul's output read by this Mul only
                up = producer.get(t)
                if (up is not None and up.op_type == "MatMul" and up.input[1] in inits and len(cons.get(t, [])) == 1
                        and t not in outs):
                    groups.append({"kind": "mlp", "src": n, "tensor": n.output[0], "matmuls": users, "up": up})
                    break
    return groups


def activation_absmax(model: Any, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of ``tensors`` over the calibration feeds, run in ONNX Runtime."""
    return {t: np.maximum(-st["min"], st["max"]) for t, st in _activation_stats(model, tensors, feeds, 0).items()}


def _activation_stats(model: Any, tensors: list[str], feeds: list[dict[str, np.ndarray]],
                      rows: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel min and max of each tensor over the feeds, and ``rows`` of its rows (tokens) spread evenly over
    the feeds (for choosing alpha by the quantization error they would see)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]  # only what is measured: not the logits nor the cache
    for t in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors must stay as named
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    per_feed = -(-rows // max(len(feeds), 1))
    stats: dict[str, dict[str, Any]] = {t: {"rows": []} for t in tensors}
    for f in feeds:
        for t, v in zip(tensors, sess.run(tensors, {k: x for k, x in f.items() if k in wanted}), strict=True):
            x = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
            st = stats[t]
            st["min"] = np.minimum(st["min"], x.min(0)) if "min" in st else x.min(0)
            st["max"] = np.maximum(st["max"], x.max(0)) if "max" in st else x.max(0)
            if per_feed:
                st["rows"].append(x[np.linspace(0, len(x) - 1, min(per_feed, len(x))).astype(int)])
    for st in stats.values():
        st["rows"] = np.concatenate(st["rows"]) if st["rows"] else None
    return stats


def _fake_quant_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, ws: list[np.ndarray], s: np.ndarray) -> float:
    """Relative error of ``x @ w`` for each weight when ``x / s`` is INT8 per tensor (asymmetric, its calibrated
    range) and ``w * s`` INT8 per output channel (symmetric): what quantize_static will do, simulated."""
    xs = x / s
    a, b = min(0.0, float((lo / s).min())), max(0.0, float((hi / s).max()))
    scale = max(b - a, 1e-8) / 255
    zp = np.round(-a / scale)
    xq = (np.clip(np.round(xs / scale) + zp, 0, 255) - zp) * scale
    num = den = 0.0
    for w in ws:
        cols = w[:, :: max(1, w.shape[1] // 2048)]  # an LM head's 49k columns: a strided sample is enough
        ref = x @ cols
        ww = cols * s[:, None]
        sc = np.maximum(np.abs(ww).max(0), 1e-12) / 127
        num += float(np.square((xq @ (np.round(ww / sc) * sc) - ref).astype(np.float64)).sum())
        den += float(np.square(ref.astype(np.float64)).sum())
    return num / max(den, 1e-30)


def _scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = (np.maximum(amax, 1e-5) ** alpha) / (np.maximum(wmax, 1e-5) ** (1 - alpha))
    return np.clip(s, *_SCALE_CLIP).astype(np.float32)


def smooth_decoder(model: Any, feeds: list[dict[str, np.ndarray]], alpha: float | None,
                   rows: int = 512, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Fold SmoothQuant scales into ``model`` (an onnx ModelProto with its weights loaded) in place; returns
    what was smoothed. The model's function is unchanged in float (up to rounding).

    ``alpha`` None: chosen per smoothed activation among ``AUTO_ALPHAS`` (and no smoothing at all) by the
    simulated INT8 error of its MatMuls on ``rows`` calibration tokens (the outliers differ by layer: the gated
    MLP's down projection has the largest). An activation read only by MatMuls named in ``skip`` (kept float) is
    left as it is."""
    from onnx import numpy_helper

    groups = [g for g in smoothing_groups(model) if not all(u.name in skip for u in g["matmuls"])]
    if not groups:
        return {"alpha": alpha if alpha is not None else "auto", "smoothed_matmuls": 0, "groups": 0}
    stats = _activation_stats(model, [g["tensor"] for g in groups], feeds, rows if alpha is None else 0)
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1

    def scaled(node: Any, idx: int, fn: Any) -> None:
        """Rewrite the node's initializer input ``idx`` as ``fn(array)``, on a private copy when it is shared."""
        name = node.input[idx]
        arr = fn(numpy_helper.to_array(inits[name]))
        if uses.get(name, 0) > 1:
            uses[name] -= 1
            name = f"{name}.smoothed.{node.name}"
            node.input[idx] = name
            model.graph.initializer.append(numpy_helper.from_array(arr, name))
            inits[name] = model.graph.initializer[-1]
            uses[name] = 1
        else:
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    kinds = {"norm": 0, "mlp": 0}
    n_mm = 0
    chosen: list[float | None] = []
    error: list[float] = []
    for g in groups:
        ws = [numpy_helper.to_array(inits[u.input[1]]) for u in g["matmuls"]]  # (K, N) each
        wmax = np.max(np.stack([np.abs(w).max(1) for w in ws]), axis=0)
        st = stats[g["tensor"]]
        amax = np.maximum(-st["min"], st["max"])
        a: float | None = alpha
        if alpha is None:  # the alpha (or none) whose simulated INT8 error is lowest for this activation
            errs = {c: _fake_quant_error(st["rows"], st["min"], st["max"], ws,
                                         np.ones_like(amax) if c is None else _scales(amax, wmax, c))
                    for c in (None, *AUTO_ALPHAS)}
            a = min(errs, key=lambda c: errs[c])
            error.append(errs[a])
        chosen.append(a)
        if a is None:
            continue
        s = _scales(amax, wmax, a)
        src = g["src"]
        if g["kind"] == "norm":
            gi, bi = _NORMS[src.op_type]
            for idx in (gi, bi):
                if idx is not None and len(src.input) > idx and src.input[idx]:
                    scaled(src, idx, lambda t, s=s: (t / s).astype(t.dtype))
        else:
            scaled(g["up"], 1, lambda t, s=s: (t / s[None, :]).astype(t.dtype))  # up's output channels
        for u in g["matmuls"]:
            scaled(u, 1, lambda t, s=s: (t * s[:, None]).astype(t.dtype))  # the readers' input rows
            n_mm += 1
        kinds[g["kind"]] += 1
    out: dict[str, Any] = {"alpha": alpha if alpha is not None else "auto", "smoothed_matmuls": n_mm,
                           "groups": len(groups), "norms": kinds["norm"], "gated_mlps": kinds["mlp"]}
    if alpha is None:  # per smoothed activation: the alpha chosen (None: left as it was) and the simulated error
        out["alphas"] = {g["tensor"]: c for g, c in zip(groups, chosen, strict=True)}
        out["simulated_error"] = {g["tensor"]: round(e, 6) for g, e in zip(groups, error, strict=True)}
    return out
