"""One convolution, float against integer, tuned by MetaSchedule alone (a diagnostic for issue 20's INT8 lever).

    .venv/bin/python benchmarks/bench_tvm_int8_conv.py [TRIALS=32] [MCPU=host]

Two MobileNetV2 shapes in NHWC: a 1x1 projection (28x28x192 -> 64) and a 3x3 depthwise (56x56x144).
Each is tuned from an empty database with ``ms.tune_tir`` in float32 and as u8 x s8 -> s32 (what
``int8_arith = "integer"`` produces), and the best measured time and the number of candidates that
built and ran are printed. It answers whether the integer kernels themselves are faster, apart from
the whole-model build (benchmarks/results/tvm-int8-ops.md). Prints only; nothing is written.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conv_module(dtype: str, kind: str) -> object:
    from tvm import relax

    bb = relax.BlockBuilder()
    if kind == "1x1":
        x = relax.Var("x", relax.TensorType((1, 28, 28, 192), dtype))
        wshape, groups, pad = (64, 1, 1, 192), 1, 0
    else:
        x = relax.Var("x", relax.TensorType((1, 56, 56, 144), dtype))
        wshape, groups, pad = (144, 3, 3, 1), 144, 1
    wdtype = "float32" if dtype == "float32" else "int8"
    w = relax.const(np.random.default_rng(0).integers(-5, 5, wshape).astype(wdtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=pad, groups=groups, data_layout="NHWC", kernel_layout="OHWI",
                                           out_dtype="float32" if dtype == "float32" else "int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return relax.transform.LegalizeOps()(bb.get())


def main() -> None:
    import tvm
    from compress.targets._tvm_worker import import_cpu_tensor_intrinsics
    from compress.targets.tvm_compiler import host_target_json, make_target
    from tvm.s_tir import meta_schedule as ms

    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    spec = host_target_json()
    if len(sys.argv) > 2:
        spec["mcpu"] = sys.argv[2]
    import_cpu_tensor_intrinsics()
    target = make_target(spec)
    print(f"target {target}, {trials} trials per kernel", flush=True)
    for kind in ("1x1", "depthwise"):
        for dtype in ("float32", "uint8"):
            mod = conv_module(dtype, kind)
            gv = next(g for g in mod.functions if g.name_hint != "main")
            func = mod[gv].with_attr("global_symbol", "main")
            with tempfile.TemporaryDirectory() as work:
                t0 = time.time()
                db = ms.tune_tir(tvm.IRModule({"main": func}), target, work, max_trials_global=trials,
                                 num_trials_per_iter=16)
                recs = db.get_all_tuning_records()
                ok = [float(np.mean([float(s) for s in r.run_secs])) for r in recs
                      if r.run_secs and float(r.run_secs[0]) < 1e9]
                best = f"{min(ok) * 1e6:.1f} us" if ok else "none ran"
                print(f"{kind:9s} {'float32' if dtype == 'float32' else 'int8':7s} best {best}; "
                      f"{len(ok)} of {len(recs)} candidates built and ran; {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
