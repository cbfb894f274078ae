"""The TVM target's way into TVM: an ONNX model checked against the Relax frontend, made static and imported.

``_static_folded`` rewrites the ONNX graph (inputs fixed, shape arithmetic folded) before the Relax
importer sees it; the rewrites on the imported Relax module are in ``_tvm_rewrites``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from compress.core.artifact import InputSpec
from compress.errors import BuildError


def unsupported_ops(model: Any) -> list[str]:
    """Every ONNX op (with its domain, count and first node) the Relax frontend has no converter for.

    The frontend's own check stops at the first graph and ignores domains (a custom-domain op with a
    standard name would be converted as if it were standard), so walk all subgraphs too. Which op types
    the frontend converts is asked through its public entry point (``frontend_converts``).
    """
    seen: Counter[tuple[str, str]] = Counter()
    first: dict[tuple[str, str], str] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            key = (node.domain or "ai.onnx", node.op_type)
            seen[key] += 1
            first.setdefault(key, node.name or "<unnamed>")
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    standard = {op for dom, op in seen if dom in ("ai.onnx", "ai.onnx.ml")}
    known = frontend_converts(standard, _opset(model))
    missing = {k: n for k, n in seen.items() if k[1] not in known or k[0] not in ("ai.onnx", "ai.onnx.ml")}
    return [f"{op} (domain {dom}, {n}x, first node '{first[(dom, op)]}')" for (dom, op), n in sorted(missing.items())]


# An op type no frontend converts: the probe graph always holds it, so the frontend always refuses the probe
# before converting a single node, and names every op type of the probe it has no converter for.
_PROBE_OP = "CompressProbeNoSuchOp"


def frontend_converts(op_types: set[str], opset: int) -> set[str]:
    """The ones among ``op_types`` the Relax ONNX frontend converts (Constant and If it handles itself).

    TVM 0.27 has no public list of converters. Its public ``from_onnx`` checks a graph's op types before
    converting any node and raises ``tvm.error.OpNotImplemented`` naming the ones it lacks: a graph of one
    node per op type, plus one that surely has no converter, gets that answer without converting anything.
    """
    import warnings

    import tvm
    from onnx import helper
    from tvm.relax.frontend.onnx import from_onnx

    probe = sorted(op_types - {"Constant", "If"})
    if not probe:
        return set(op_types)
    nodes = [helper.make_node(op, [], [f"out{i}"], name=f"probe{i}") for i, op in enumerate([*probe, _PROBE_OP])]
    graph = helper.make_graph(nodes, "probe", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx's checker rejects the probe; the frontend only warns about it
            from_onnx(model)
    except tvm.error.OpNotImplemented as e:
        named = {s.strip() for s in str(e).rpartition(":")[2].split(",")}
        if _PROBE_OP in named:
            return set(op_types) - named
    # Not the refusal expected: this TVM checks differently; the import itself will judge the graph.
    return set(op_types)


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _static_folded(model: Any, shapes: dict[str, list[int]]) -> Any:
    """The graph with its inputs fixed to ``shapes`` and the shape arithmetic folded away.

    TVM builds static shapes anyway; a graph with symbolic axes (a transformer's batch and sequence)
    computes its reshapes from Shape/Gather/Concat at run time, and the Relax importer refuses a Reshape
    whose input shape it cannot infer. ONNX Runtime's basic optimizations (constant folding, redundant
    node elimination: standard operators only) fold those once the inputs are static. A graph without
    symbolic input axes is returned as it is.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits and i.name in shapes]
    if all(d.HasField("dim_value") and d.dim_value > 0 for i in graph_inputs for d in i.type.tensor_type.shape.dim):
        return model
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for inp in static.graph.input:
        if inp.name in shapes and inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name], strict=False):
                d.Clear()
                d.dim_value = int(v)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "static.onnx", Path(tmp) / "folded.onnx"
        onnx.save(static, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception:  # ORT cannot load it: let the importer judge the graph as it is
            return static
        folded = onnx.load(str(dst))
    if any(n.domain not in ("", "ai.onnx") for n in folded.graph.node):
        return static  # folding brought in ORT-only operators: TVM could not import those
    return folded


def import_onnx(model: Any, inputs: tuple[InputSpec, ...]) -> tuple[Any, dict[Any, Any]]:
    """The Relax module of ``model`` at the static shapes of ``inputs``, and its weights detached (by parameter)."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    shapes = {s.name: list(s.shape) for s in inputs}
    dtypes = {s.name: s.dtype for s in inputs}
    model = _static_folded(model, shapes)
    try:
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as e:  # the frontend raises whatever its converters raise
        raise BuildError(f"target 'tvm': the Relax ONNX frontend failed on this model: "
                         f"{type(e).__name__}: {first_line(e)}") from e
    mod, detached = detach_params(mod)
    # Weights come back as a list in parameter order, after the graph inputs.
    n_in = len(inputs)
    weights = dict(zip(mod["main"].params[n_in:], detached.get("main", []), strict=True))
    return mod, weights


def first_line(e: BaseException) -> str:
    """The message of a TVM error, which puts it last, after a C++ traceback."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else repr(e))
    return msg[:400]
