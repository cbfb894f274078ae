"""Which quantized nodes a refused INT8 model owes its error to, and a ``skip`` that, when taken, passes.

A refusal by the fidelity guard or the float-parity check says the quantized model is far from the float one,
but not where. Here every weighted node's output is compared between the float model and the quantized one
on the same inputs; the error a node *adds* (its output's relative error less its input's, the input read
before its own QuantizeLinear) ranks the nodes. The caller then re-quantizes with the worst few kept in
float, doubling the count until its check passes, so the ``skip`` it prints is one that was seen to work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compress.measuring.ort import ort_session


def _rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over samples of ||got - ref|| / ||ref|| (first axis = samples)."""
    r = ref.reshape(len(ref), -1).astype(np.float64)
    g = got.reshape(len(got), -1).astype(np.float64)
    return float(np.mean(np.linalg.norm(g - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)))


def _with_outputs(path: Path, names: Sequence[str], dst: Path) -> list[str]:
    """A copy of the model at ``path`` that also outputs ``names`` (those it has); the names it outputs (a graph
    output among ``names`` included: the last layer is blamed too)."""
    import onnx

    m = onnx.load(str(path))
    outs = {o.name for o in m.graph.output}
    have = {o for n in m.graph.node for o in n.output} - outs
    added = [n for n in dict.fromkeys(names) if n in have]
    for n in added:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))  # weighted ops
    onnx.save_model(m, str(dst))
    return added + [n for n in dict.fromkeys(names) if n in outs]


def _float_source(tensor: str, producer: dict[str, Any]) -> str:
    """The float tensor behind a DequantizeLinear(QuantizeLinear(x)) pair: x (else the tensor itself)."""
    dq = producer.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return str(q.input[0])
    return tensor


def _dequantized(tensor: str, consumers: dict[str, list[Any]]) -> str:
    """The tensor later nodes read for ``tensor``: the output of its QuantizeLinear -> DequantizeLinear, if any."""
    for q in consumers.get(tensor, []):
        if q.op_type == "QuantizeLinear":
            for dq in consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return str(dq.output[0])
    return tensor


def node_blame(fpath: Path, qpath: Path, nodes: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
               work: Path) -> list[tuple[str, float]]:
    """(node, error it adds) for the weighted ``nodes`` quantized in ``qpath``, worst first.

    Measured on ``feeds`` (the guard's inputs) as relative L2 error against the float model ``fpath``: the
    node's output as its consumers read it (after its own Q/DQ, which it owns) less its input as it reads it."""
    import onnx

    q = onnx.load(str(qpath))
    producer = {o: n for n in q.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in q.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    wanted = set(nodes)
    # node -> ((quantized-model tensor, float-model tensor) for its input, the same for its output)
    pairs: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {}
    for n in q.graph.node:
        if n.name in wanted and n.output and n.input:
            pairs[n.name] = ((n.input[0], _float_source(n.input[0], producer)),
                             (_dequantized(n.output[0], consumers), n.output[0]))
    # A node the quantizer replaced (dynamic INT8: MatMulInteger and its rescaling, under new names) keeps its
    # input and output tensor names, so it is compared there: what it reads to what it writes.
    for n in onnx.load(str(fpath)).graph.node:
        if n.name in wanted and n.name not in pairs and n.output and n.input:
            pairs[n.name] = ((n.input[0], n.input[0]), (n.output[0], n.output[0]))
    qt = sorted({p[0] for io in pairs.values() for p in io})
    ft = sorted({p[1] for io in pairs.values() for p in io})
    fprobe, qprobe = work / "blame_float.onnx", work / "blame_quant.onnx"
    fhave, qhave = set(_with_outputs(fpath, ft, fprobe)), set(_with_outputs(qpath, qt, qprobe))
    fs, qs = ort_session(fprobe, optimize=False), ort_session(qprobe, optimize=False)
    fnames, qnames = [o.name for o in fs.get_outputs()], [o.name for o in qs.get_outputs()]
    ref: dict[str, list[np.ndarray]] = {}
    got: dict[str, list[np.ndarray]] = {}
    for f in feeds:
        for store, sess, names, have in ((ref, fs, fnames, fhave), (got, qs, qnames, qhave)):
            for name, v in zip(names, sess.run(None, f), strict=True):
                if name in have:
                    store.setdefault(name, []).append(np.asarray(v, dtype=np.float32))
    for p in (fprobe, qprobe):
        p.unlink(missing_ok=True)

    def err(pair: tuple[str, str]) -> float | None:
        qn, fn = pair
        if qn not in got or fn not in ref or any(a.shape != b.shape for a, b in zip(ref[fn], got[qn], strict=True)):
            return None
        return _rel_err(np.concatenate(ref[fn]), np.concatenate(got[qn]))

    scores = []
    for node, (inp, out) in pairs.items():
        e_out = err(out)
        if e_out is not None:
            scores.append((node, e_out - (err(inp) or 0.0)))
    return sorted(scores, key=lambda s: -s[1])


def module_of(model: Any, node: str) -> str | None:
    """The module a node came from, for the message: the initializer behind its weight input (through any
    computation on it), less ``.weight``, when it has a module's dotted name; else the torch exporter's name
    scope of the node (a weight folded to a constant, e.g. by weight standardization, has no such name)."""
    import ast

    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    start = next((n for n in model.graph.node if n.name == node), None)
    if start is None:
        return None
    todo, seen = list(start.input[1:2]), set[str]()
    while todo and len(seen) < 50:
        t = todo.pop(0)
        if t in seen:
            continue
        seen.add(t)
        base = t.split("__copy")[0]
        if (t in inits or base in inits) and "." in base:
            return base.removesuffix(".weight")
        if t in producer:
            todo.extend(producer[t].input)
    for p in start.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [x for x in ast.literal_eval(p.value) if isinstance(x, str) and "." in x]
            if scopes:
                return str(scopes[-1])
    return None


def find_skip(ranked: Sequence[tuple[str, float]], already: Sequence[str],
              passes_with: Callable[[list[str]], bool], max_tries: int = 5) -> list[str] | None:
    """The shortest prefix of the worst nodes (1, 2, 4 ... at most ``max_tries`` tries) that, kept in float with
    ``already``, makes ``passes_with`` true; None when none did."""
    order = [n for n, s in ranked if n not in already and s > 0]
    k = 1
    for _ in range(max_tries):
        if not order:
            return None
        cand = order[:k]
        if passes_with([*already, *cand]):
            return cand
        if k >= len(order):
            return None
        k = min(2 * k, len(order))
    return None


def skip_advice(fpath: Path, qpath: Path, source: Path, quantized: Sequence[str],
                feeds: Sequence[dict[str, np.ndarray]], work: Path, already: Sequence[str], user_skip: bool,
                passes_with: Callable[[list[str]], bool], dynamic_passes: Callable[[], bool] | None,
                kind: str = "quantize.int8") -> str:
    """One clause for a refusal: the nodes the error comes from (with their modules) and a ``skip`` that was
    seen to pass the checks, or that no short one does. ``already``: the nodes the run keeps in float now
    (never advised again); ``user_skip``: whether the run sets ``skip`` (then the advice is to add to it);
    ``dynamic_passes``: whether quantize.dynamic passes the same checks (tried only when no skip does; None
    when the refused pass is ``kind`` = quantize.dynamic itself)."""
    import onnx

    ranked = node_blame(fpath, qpath, quantized, feeds, work)
    if not ranked or ranked[0][1] <= 0:
        return "no quantized node was found to add the error"
    model = onnx.load(str(source), load_external_data=False)  # the exported model: its nodes' name scopes

    def named(node: str) -> str:
        mod = module_of(model, node)
        return f"'{node}'" + (f" (module {mod})" if mod else "")

    worst = ", ".join(f"{named(n)} adds {e:.3f}" for n, e in ranked[:3] if e > 0)
    found = find_skip(ranked, already, passes_with)
    if found is None:
        tried = min(16, len([n for n, e in ranked if n not in already and e > 0]))
        head = (f"the error builds up over many layers (relative error each adds: {worst}); no skip of up to "
                f"{tried} ")
        if dynamic_passes is None:
            return head + (f"of them passes (checked): this model does not survive INT8 rounding; leave it in float "
                           f"(no {kind})")
        if dynamic_passes():
            return head + ("of them passes (checked), but quantize.dynamic (INT8 weights, float activations) passes "
                           "the same checks (checked): use it instead")
        return head + ("of them passes and quantize.dynamic does not either (checked): this model does not survive "
                       f"INT8 rounding; leave it in float (no {kind})")
    lst = "[" + ", ".join(repr(n) for n in found) + "]"
    take = f"add {lst} to skip" if user_skip else f"skip = {lst}"
    return (f"the error comes mostly from {worst} (relative error each adds); {take} passes both checks "
            f"(checked: quantized again with it)")
