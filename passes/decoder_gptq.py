"""GPTQ for an ONNX decoder's MatMul weights, packed as ONNX Runtime MatMulNBits (``quantize.weight_only``
with ``algorithm = "gptq"`` on a causal LM).

Why our own and not ONNX Runtime's (``matmul_nbits_quantizer.GPTQWeightOnlyQuantConfig``, which gave +519%
perplexity on SmolLM2 at group 128): read in onnxruntime 1.32's ``neural_compressor/weight_only.py``, its
``gptq()`` propagates each column's error through ``Hinv[i:, i]`` and ``Hinv[i2:, i1:i2]`` of an *upper*
triangular Cholesky factor, blocks that are all zero, so no error is ever compensated (it is round-to-nearest
with extra steps); and it re-quantizes the result asymmetrically and then drops the zero points when
``is_symmetric`` is set, so every symmetric weight is dequantized off by its block's offset.

What this does (Frantar et al., 2022, "GPTQ"): one prefill per calibration window (an empty KV cache)
collects every MatMul input X and accumulates H = 2 X^T X per distinct input (q/k/v share one); each
weight W (K x N, rows = input channels) is then quantized row by row in order, a group's scale (and zero
point) taken when its first row is reached, each row's error spread over the rows not yet quantized through
the Cholesky factor of H^-1 (lazy blocks of 128 rows). The Hessians come from the float model (all layers at
once, one pass), not layer by layer through the quantized prefix: one forward per window instead of one per
layer per window. The integer codes are packed straight into MatMulNBits (never re-quantized), with a last
block padded when the group does not divide K, as ONNX Runtime's own quantizer does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def matmul_hessians(model: Any, names: list[str], feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """H = 2/n * sum X^T X (float64) of each tensor in ``names`` (MatMul inputs) over the feeds' tokens."""
    import onnx
    import onnxruntime as ort
    import torch

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    known = {o.name for o in aug.graph.output}
    for n in names:
        if n not in known:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors must keep their names
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    hs: dict[str, np.ndarray] = {}
    count = 0
    for f in feeds:
        outs = sess.run(names, f)
        for n, x in zip(names, outs, strict=True):
            x2 = torch.from_numpy(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))
            hs[n] = hs.get(n, 0) + (x2.T @ x2).numpy()
        count += int(np.asarray(outs[0]).reshape(-1, outs[0].shape[-1]).shape[0])
    return {n: 2.0 * h / max(count, 1) for n, h in hs.items()}


def _grid(w: np.ndarray, bits: int, symmetric: bool, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    maxq = 2 ** bits - 1
    if symmetric:
        ext = w[np.abs(w).argmax(axis=0), np.arange(w.shape[1])] * shrink
        scale = ext / -(2 ** (bits - 1))
        scale[scale == 0] = 1.0
        return scale, np.full(w.shape[1], 2 ** (bits - 1), np.float64)
    lo, hi = np.minimum(w.min(axis=0), 0) * shrink, np.maximum(w.max(axis=0), 0) * shrink
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    return scale, np.clip(np.round(-lo / scale), 0, maxq)


def _group_params(w: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per output column of a group of rows ``w`` (g x N), as ONNX Runtime's RTN chooses
    them: symmetric: the value of largest magnitude maps to -2^(b-1) (the zero point is 2^(b-1), implied);
    asymmetric: min..max (with 0 inside) onto 0..2^b-1 with an integer zero point. With ``importance`` (one
    weight per row: the Hessian's diagonal, how strongly that input channel is driven), the range is also
    shrunk (clipped) per column where that lowers the importance-weighted rounding error."""
    scale, zero = _grid(w, bits, symmetric, 1.0)
    if importance is None:
        return scale, zero
    maxq = 2 ** bits - 1

    def err(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        q = (np.clip(np.round(w / s) + z, 0, maxq) - z) * s
        return np.asarray(importance[:, None] * (w - q) ** 2).sum(axis=0)

    best = err(scale, zero)
    for shrink in np.arange(0.95, 0.69, -0.05):
        s, z = _grid(w, bits, symmetric, float(shrink))
        e = err(s, z)
        better = e < best
        scale, zero, best = np.where(better, s, scale), np.where(better, z, zero), np.minimum(e, best)
    return scale, zero


def gptq_weight(w: np.ndarray, h: np.ndarray, bits: int, group: int, symmetric: bool,
                damp: float = 0.01, block: int = 128, clip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of one MatMul weight ``w`` (K x N) with input Hessian ``h`` (K x K). Returns the integer codes
    (K x N, 0..2^b-1), scales and zero points (one per group and column: ceil(K/group) x N)."""
    import torch

    k, n = w.shape
    maxq = 2 ** bits - 1
    W = torch.tensor(w, dtype=torch.float64)
    H = torch.tensor(h, dtype=torch.float64)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    # Upper Cholesky factor of H^-1: row i holds how row i's error moves the rows after it.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros((k, n), dtype=torch.float64)
    n_groups = (k + group - 1) // group
    scales = np.zeros((n_groups, n)), np.zeros((n_groups, n))
    scale = zero = torch.zeros(n, dtype=torch.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            r = i1 + i
            if r % group == 0:  # the group's grid from its rows as they are now (earlier errors folded in)
                rows = torch.cat([W1[i:], W[i2:]])[: min(group, k - r)].numpy()
                s, z = _group_params(rows, bits, symmetric, np.diag(h)[r:r + len(rows)] if clip else None)
                scales[0][r // group], scales[1][r // group] = s, z
                scale, zero = torch.tensor(s), torch.tensor(z)
            q = torch.clamp(torch.round(W1[i] / scale) + zero, 0, maxq)
            codes[r] = q
            err = (W1[i] - (q - zero) * scale) / U1[i, i]
            W1[i:] -= torch.outer(U1[i, i:], err)
            E1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ E1
    return codes.numpy().astype(np.uint8), scales[0], scales[1]


def matmulnbits_node(node: Any, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int,
                     group: int, accuracy_level: int | None) -> tuple[Any, list[Any]]:
    """A MatMulNBits node (and its initializers) replacing MatMul ``node`` whose weight is ``codes`` (K x N)
    with per-group ``scales``/``zeros`` (ceil(K/group) x N); ``zeros`` None: the implied symmetric one."""
    import onnx
    from onnx import numpy_helper

    k, n = codes.shape
    kb = scales.shape[0]
    pad = kb * group - k
    fill = 2 ** (bits - 1) if zeros is None else 0
    q = np.pad(codes, ((0, pad), (0, 0)), constant_values=fill).T.reshape(n, kb, group)  # N x blocks x group
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    name = node.input[1]
    inits = [numpy_helper.from_array(q.astype(np.uint8), f"{name}_Q{bits}G{group}"),
             numpy_helper.from_array(scales.T.reshape(-1).astype(np.float32), f"{name}_scales")]
    inputs = [node.input[0], inits[0].name, inits[1].name]
    if zeros is not None:
        z = zeros.T.astype(np.uint8)  # N x blocks
        if bits == 4:
            z = np.pad(z, ((0, 0), (0, kb % 2)))
            z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        inits.append(numpy_helper.from_array(z.reshape(-1), f"{name}_zero_points"))
        inputs.append(inits[-1].name)
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": group}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    new = onnx.helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name + "_Q4" if bits == 4
                                else node.name + "_Q8", domain="com.microsoft", **attrs)
    return new, inits


def int4_output_error(w: np.ndarray, h: np.ndarray, group: int, symmetric: bool) -> float:
    """How much a layer's output moves when its weight is rounded to INT4 (no compensation) on the calibration
    inputs: tr(E^T H E), E = W - RTN4(W), the squared output error summed over tokens and output channels."""
    k = w.shape[0]
    e = np.empty_like(w)
    for g0 in range(0, k, group):
        rows = w[g0:g0 + group]
        s, z = _grid(rows, 4, symmetric, 1.0)
        e[g0:g0 + group] = rows - (np.clip(np.round(rows / s) + z, 0, 15) - z) * s
    return float(np.sum(e * (h @ e)))


def gptq_model(model: Any, feeds: list[dict[str, np.ndarray]], bits: int, group: int, symmetric: bool,
               accuracy_level: int | None, exclude: Iterable[str] = (), log: Any = None,
               int8_fraction: float = 0.0) -> list[str]:
    """GPTQ every MatMul with a constant 2-D weight (but ``exclude``) of ``model`` in place, calibrated on
    ``feeds``. With ``int8_fraction``, that fraction of the layers (by count) whose INT4 output error on the
    calibration inputs is largest (``int4_output_error``) is packed at 8 bits instead. Returns the names of the
    layers packed at 8 bits. A weight another node also reads stays in the file for it."""
    import torch

    inits = {i.name: i for i in model.graph.initializer}
    skip = set(exclude)
    mats = [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in skip and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]
    names = sorted({n.input[0] for n in mats})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # row-by-row small updates: on a shared CPU, more threads made it 25x slower here
    try:
        hs = matmul_hessians(model, names, feeds)
        wide: set[str] = set()
        if int8_fraction > 0 and bits == 4:
            from onnx import numpy_helper

            score = {n.name: int4_output_error(numpy_helper.to_array(inits[n.input[1]]).astype(np.float64),
                                               hs[n.input[0]], group, symmetric) for n in mats}
            wide = set(sorted(score, key=score.__getitem__, reverse=True)[:round(int8_fraction * len(mats))])
        _gptq_all(model, mats, inits, hs, bits, group, symmetric, accuracy_level, log, wide)
        return [n.name for n in mats if n.name in wide]
    finally:
        torch.set_num_threads(threads)


def _gptq_all(model: Any, mats: list[Any], inits: dict[str, Any], hs: dict[str, np.ndarray], bits: int, group: int,
              symmetric: bool, accuracy_level: int | None, log: Any, wide: set[str]) -> None:
    from onnx import numpy_helper

    readers: dict[str, int] = {}
    for nd in model.graph.node:
        for i in nd.input:
            readers[i] = readers.get(i, 0) + 1
    for j, nd in enumerate(mats):
        w = numpy_helper.to_array(inits[nd.input[1]]).astype(np.float64)
        b = 8 if nd.name in wide else bits
        codes, scales, zeros = gptq_weight(w, hs[nd.input[0]].copy(), b, group, symmetric)
        new, new_inits = matmulnbits_node(nd, codes, scales, None if symmetric else zeros, b, group, accuracy_level)
        pos = list(model.graph.node).index(nd)
        model.graph.node.remove(nd)
        model.graph.node.insert(pos, new)
        model.graph.initializer.extend(new_inits)
        readers[nd.input[1]] -= 1
        if readers[nd.input[1]] == 0:
            model.graph.initializer.remove(inits[nd.input[1]])
        if log is not None and (j + 1) % 25 == 0:
            log(f"  gptq: {j + 1}/{len(mats)} MatMul layers")
    if mats and not any(o.domain == "com.microsoft" for o in model.opset_import):
        import onnx

        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
