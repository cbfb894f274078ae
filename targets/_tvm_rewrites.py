"""Graph rewrites of the TVM target on Relax modules: convolution layouts, and integer convolutions for Q/DQ.

Every rewrite here is a module pass over ``main`` (``main_rewrite_pass``) that the build runs before
tuning and compiling; nothing here tunes or compiles (``_tvm_tuning``, ``_tvm_build``).

Integer convolutions for TVM from the Q/DQ models the quantization passes produce:

Integer convolutions for TVM from the Q/DQ models the quantization passes produce.

TVM's Relax ONNX frontend imports a Q/DQ model literally: ``dequantize`` ops in front of float
convolutions, and FoldConstant then turns the int8 weights back into float ones. No integer
arithmetic runs, so the INT8 build was slower than the FP32 one (3.52x against 3.17x ONNX Runtime
FP32's latency on MobileNetV2, benchmarks/results/tvm-levers.md).

``integer_convolutions`` rewrites each ``conv2d(dequantize(x_q), dequantize(w_q))`` whose scales and
zero points are constants, whose weights are int8 with zero points 0 (the symmetric weights every
scheme here produces) and whose activation zero point is one scalar, into the arithmetic ONNX
Runtime does for a QLinearConv:

    acc = conv2d(x_q, w_q, out_dtype=int32)                 # u8/s8 x s8 products, int32 sums
    acc = acc - z_x * sum(w_q[oc])                          # the activation zero point, per channel
    y   = float(acc) * (s_x * s_w[oc])                      # one multiply, fused into the conv's kernel

This is exact: each output is the same int32 sum ONNX Runtime computes, times the same scale. The
zero-point correction needs every input tap inside the image: where the convolution pads and
``z_x != 0`` (padding must mean the real value 0, i.e. ``z_x``), the activation is padded with
``z_x`` explicitly and the convolution runs unpadded. Inputs after a ReLU have ``z_x = 0`` and need
neither. Whatever the rewrite leaves (per-channel activation zero points, asymmetric weights) stays
as imported and is counted, so the build's metadata says how much ran on integers.

Measured (benchmarks/results/tvm-int8-ops.md, MobileNetV2 224x224, 192 trials, same run): integer
3.51x ONNX Runtime FP32's latency against 2.09x for the float Q/DQ build and 1.50x for FP32, so it is
not the default (``TvmConfig.int8_arith``). LLVM does emit VNNI instructions for the int32 sums
(``vpdpwssd``), but a third of the candidates that MetaSchedule tensorizes with its VNNI intrinsic fail
to build in TVM 0.27 ("VectorizeLoop before LiftStorageAlloc"), and a lone 1x1 or depthwise integer
convolution tuned 32 trials was within 6 % of the float one (benchmarks/bench_tvm_int8_conv.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def _const(expr: Any) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def integer_convolutions(mod: Any) -> tuple[Any, dict[str, int]]:
    """``mod`` with integer convolutions where the Q/DQ pattern allows (see the module doc), and counts:
    ``integer`` rewritten, and one key per reason a dequantized convolution was left in float."""
    import tvm
    from tvm import relax

    counts: Counter[str] = Counter()

    @relax.expr_functor.mutator
    class IntegerConv(relax.PyExprMutator):  # type: ignore[misc]
        def _dequantized(self, arg: Any) -> Any:
            bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
            if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) \
                    and bound.op.name == "relax.dequantize":
                return bound
            return None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            dx, dw = self._dequantized(call.args[0]), self._dequantized(call.args[1])
            if dx is None or dw is None:
                return call
            new, why = self._rewrite(call, dx, dw)
            counts["integer" if new is not None else why] += 1
            return new if new is not None else call

        def _rewrite(self, conv: Any, dx: Any, dw: Any) -> tuple[Any, str]:
            a = conv.attrs
            if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW":
                return None, "layout"
            sx, zx, sw, zw = (_const(e) for e in (dx.args[1], dx.args[2], dw.args[1], dw.args[2]))
            w = _const(dw.args[0])
            if sx is None or zx is None or sw is None or zw is None or w is None:
                return None, "non-constant scale or zero point"
            if sx.size != 1 or zx.size != 1:
                return None, "per-channel activation quantization"
            if w.dtype != np.int8 or np.any(zw != 0):
                return None, "weights not symmetric int8"
            if sw.size != 1 and (sw.size != w.shape[0] or int(dw.attrs.axis) not in (0, -4)):
                return None, "weight scales not per output channel"
            x_q = dx.args[0]
            if x_q.ty.dtype not in ("uint8", "int8"):
                return None, "activation not 8-bit"
            oc = w.shape[0]
            z = int(zx.reshape(()))
            padding = [int(p) for p in a.padding]
            if z != 0 and any(padding):
                top, left, bottom, right = padding
                x_q = relax.op.nn.pad(x_q, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(z))
                padding = [0, 0, 0, 0]
            acc = relax.op.nn.conv2d(x_q, relax.const(w), strides=a.strides, padding=padding, dilation=a.dilation,
                                     groups=a.groups, data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")
            if z != 0:
                per_oc = (z * w.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32)
                acc = relax.op.subtract(acc, relax.const(per_oc.reshape(1, oc, 1, 1)))
            scale = (sx.astype(np.float32).reshape(()) * np.broadcast_to(sw.astype(np.float32).reshape(-1), (oc,)))
            out_dtype = str(conv.ty.dtype)
            y = relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.reshape(1, oc, 1, 1)))
            return (y if out_dtype == "float32" else relax.op.astype(y, out_dtype)), ""

    return main_rewrite_pass("IntegerConvolutions", IntegerConv)(mod), dict(counts)


def scalar_qdq_as_ops() -> Any:
    """A module pass: per-tensor ``quantize``/``dequantize`` (scalar scale and zero point) -> the same
    arithmetic in plain Relax ops, which ConvertLayout carries through. It does not know the Q/DQ ops
    (they name a channel axis), so in NHWC every one of them sat between two transposes. The arithmetic
    is the legalization's own (``relax/transform/legalize_ops/qdq.py``): ``clip(round(x / s) + z)`` cast
    to the 8-bit type, and ``(int32(q) - z) * s``."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class ScalarQdq(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.quantize", "relax.dequantize")):
                return call
            s, z = _const(call.args[1]), _const(call.args[2])
            if s is None or z is None or s.size != 1 or z.size != 1 or s.dtype != np.float32:
                return call
            x, dtype = call.args[0], str(call.attrs.out_dtype)
            scale = relax.const(s.reshape(()), "float32")
            if call.op.name == "relax.quantize":
                if dtype not in ("uint8", "int8"):
                    return call
                info = np.iinfo(dtype)
                zero = relax.const(float(z.reshape(())), "float32")
                q = relax.op.add(relax.op.round(relax.op.divide(x, scale)), zero)
                # maximum/minimum rather than clip: ConvertLayout carries the former, not clip.
                lo, hi = relax.const(float(info.min), "float32"), relax.const(float(info.max), "float32")
                return relax.op.astype(relax.op.minimum(relax.op.maximum(q, lo), hi), dtype)
            if dtype != "float32":
                return call
            shifted = relax.op.subtract(relax.op.astype(x, "int32"), relax.const(int(z.reshape(())), "int32"))
            return relax.op.multiply(relax.op.astype(shifted, "float32"), scale)

    return main_rewrite_pass("ScalarQdqAsOps", ScalarQdq)


# conv2d layouts the ``layout`` setting may ask for: (data, weight) as Relax's ConvertLayout names them.
# Blocked activations (NCHW16c) are not offered: TVM 0.27 has no legalization for a conv2d in that layout
# (VM codegen refuses the call); blocked *weights* are what weight_prepack gives.
CONV_LAYOUTS = {"NHWC": ["NHWC", "OHWI"]}


def layout_passes(layout: str) -> list[Any]:
    """Convolutions in ``layout`` (NCHW = as imported). Run before ``prepare_passes``, on the Relax ops.

    ONNX Clip (MobileNet's ReLU6) arrives from the frontend as already-lowered ``call_tir(maximum/minimum)``
    with a scalar bound, which ConvertLayout cannot see through: every ReLU6 ended up between two
    transposes (71 kernels per MobileNetV2 call instead of 43, benchmarks/results/tvm-levers.md). Those
    calls are turned back into Relax ``maximum``/``minimum`` ops first, which ConvertLayout carries along.
    A Q/DQ model's per-tensor quantize/dequantize ops are unknown to ConvertLayout too (91 kernels per
    call instead of 44, benchmarks/results/tvm-int8.md): they become the same arithmetic in plain ops.
    """
    if layout == "NCHW":
        return []
    from tvm import relax

    return [relax.transform.FoldConstant(), _scalar_minmax_as_ops(), scalar_qdq_as_ops(),
            relax.transform.ConvertLayout({"relax.nn.conv2d": CONV_LAYOUTS[layout]}),
            relax.transform.Normalize(), relax.transform.FoldConstant()]


def _scalar_minmax_as_ops() -> Any:
    """A module pass: ``call_tir(maximum|minimum, (x, scalar constant))`` in ``main`` -> the Relax op."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class ScalarMinMax(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
                return call
            name = str(getattr(call.args[0], "name_hint", "")).rstrip("0123456789_")
            fields = list(getattr(call.args[1], "fields", []))
            if name not in ("maximum", "minimum") or len(fields) != 2:
                return call
            bound = fields[1]
            if isinstance(bound, relax.Var):
                bound = self.lookup_binding(bound)
            if not isinstance(bound, tvm.ir.expr.Constant) or len(bound.value.shape) != 0:
                return call
            return (relax.op.maximum if name == "maximum" else relax.op.minimum)(fields[0], bound)

    return main_rewrite_pass("ScalarMinMaxAsOps", ScalarMinMax)


def main_rewrite_pass(name: str, mutator: Any) -> Any:
    """A module pass that runs ``mutator`` (a ``relax.PyExprMutator`` class) over the module's ``main``
    and then drops the bindings it left unused; a module without ``main`` passes through."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def rewrite(mod: Any, _ctx: Any) -> Any:
        if "main" not in [g.name_hint for g in mod.functions]:
            return mod
        gv = mod.get_global_var("main")
        mod.update_func(gv, mutator(mod).visit_expr(mod[gv]))
        return relax.transform.DeadCodeElimination()(mod)

    return rewrite
