"""ONNX files as the core reads them: input specs, the external-data safety check, and the facts a
model loaded from disk carries (what no pass recorded, read from the graph itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.artifact import InputSpec
from ..core.capabilities import Facts
from ..errors import InputError

# Operators whose presence means the graph computes in 8-bit integers somewhere.
_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
             "ConvInteger", "DynamicQuantizeLinear"}
_DYNAMIC_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}


def onnx_input_specs(model: Any) -> tuple[InputSpec, ...]:
    """Input specs of an ONNX graph (symbolic dims become 1), initializers excluded."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        specs.append(InputSpec(inp.name, shape, dtype))
    return tuple(specs)


def check_external_data(model: Any, folder: Path) -> None:
    """Refuse external-data references that point outside the model's folder."""
    root = folder.resolve()
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key != "location":
                continue
            target = (folder / e.value).resolve()
            if root not in target.parents and target != root:
                raise InputError(
                    f"{folder}: tensor {t.name!r} points to external data {e.value!r} outside the model's folder; "
                    "refused"
                )
            if not target.exists():
                raise InputError(f"{folder}: external data file {e.value!r} for tensor {t.name!r} is missing")


def onnx_facts(model: Any) -> Facts:
    """Facts of an ONNX graph made outside this tool: the lowest precision its operators and
    initializers compute in, the operators it needs outside the standard domains, and whether its
    batch dimension is symbolic."""
    import onnx

    ops = {n.op_type for n in model.graph.node}
    custom = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node
                     if n.domain not in ("", "ai.onnx", "ai.onnx.ml")})
    facts = Facts(required_ops=tuple(custom))
    if ops & _INT8_OPS:
        facts = facts.evolve(precision="int8", quantization="dynamic" if ops & _DYNAMIC_OPS else "qdq")
    elif any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        facts = facts.evolve(precision="fp16")
    inits = {i.name for i in model.graph.initializer}
    first = next((i for i in model.graph.input if i.name not in inits), None)
    if first is not None and first.type.tensor_type.shape.dim:
        d0 = first.type.tensor_type.shape.dim[0]
        facts = facts.evolve(dynamic_batch=not (d0.HasField("dim_value") and d0.dim_value > 0))
    return facts


def read_facts(path: Path) -> Facts:
    """``onnx_facts`` of the model file at ``path`` (its external data is not read)."""
    import onnx

    return onnx_facts(onnx.load(str(path), load_external_data=False))
