"""How far lowered models are from their input models: the figures behind compress/quality/parity.py's defaults.

The digits CNN (trained here, 5 epochs) and the zoo transformer (random weights, fixed seed), each as
FP32 ONNX and through every ONNX-producing pass; for each, the pass output against its float input
(both on ONNX Runtime) and every available target (ONNX Runtime, untuned TVM) against its input model
on ONNX Runtime's reference kernels, on 256 validation samples of builtin:digits (TVM: the first 64,
one at a time, since it builds a fixed batch). Prints one line per comparison with the figures and
whether today's default tolerance holds.

Run: ``.venv/bin/python benchmarks/bench_parity.py`` (about a minute here).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.passes._quant_common import ort_session, run_batches, session_infer, split_inputs  # noqa: E402
from compress.passes.export_onnx import ExportOnnx  # noqa: E402
from compress.passes.quantize_dynamic import QuantizeDynamic  # noqa: E402
from compress.passes.quantize_fp16 import QuantizeFp16  # noqa: E402
from compress.passes.quantize_int8 import QuantizeInt8  # noqa: E402
from compress.passes.quantize_weight_only import QuantizeWeightOnly  # noqa: E402
from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget  # noqa: E402
from compress.targets.tvm_compiler import TvmConfig, TvmTarget  # noqa: E402

from compress.api import module_artifact  # noqa: E402
from compress.core.artifact import Artifact  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.manager import PassContext, PassManager  # noqa: E402
from compress.inputs import zoo  # noqa: E402
from compress.inputs.data import load_data  # noqa: E402
from compress.inputs.training import fit  # noqa: E402
from compress.quality.parity import LOWERING, QUANTIZATION, breach, compare_outputs, model_precision  # noqa: E402
from compress.stages.recipe import DataSpec  # noqa: E402

SHAPE = (1, 1, 8, 8)


def line(name: str, what: str, m: dict[str, float], verdict: str) -> None:
    rel = m["max_abs_diff"] / max(m["max_abs_ref"], 1e-12)
    print(f"{name:10s} {what:28s} max|d| {m['max_abs_diff']:.3g} ({rel:.2g} of max|ref|)  "
          f"cosine {m['cosine']:.7f}  agreement {100 * m['agreement']:.1f}%  {verdict}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-parity-") as tmp:
        measure(Cache(Path(tmp)))


def measure(cache: Cache) -> None:
    torch.set_num_threads(1)
    digits = load_data(DataSpec(source="builtin:digits"), SHAPE)

    def run(art: Artifact, cfg: Any, data: Any = None) -> Artifact:
        # Parity bounds off inside the passes: here we want the raw figures even where a default would fail.
        return PassManager([cfg]).run(art, PassContext(cache=cache, data=data, progress=False))[0]

    torch.manual_seed(0)
    cnn = zoo.build("digits-cnn")
    fit(cnn, digits, 5, lr=3e-3)
    fp = run(module_artifact(cnn.eval(), SHAPE, cache), ExportOnnx())
    torch.manual_seed(0)
    trf = run(module_artifact(zoo.build("transformer").eval(), SHAPE, cache), ExportOnnx())
    off: dict[str, Any] = {"min_cosine": -1.0, "min_agreement": 0.0}
    models = {
        "cnn fp32": (fp, None, None), "cnn int8": (run(fp, QuantizeInt8(**off), digits), fp, "int8"),
        "cnn fp16": (run(fp, QuantizeFp16(**off)), fp, "fp16"),
        "tr fp32": (trf, None, None), "tr dyn": (run(trf, QuantizeDynamic(**off)), trf, "int8"),
        "tr int8sq": (run(trf, QuantizeInt8(smoothquant=True, samples=32, **off), digits), trf, "int8"),
        "tr wo4": (run(trf, QuantizeWeightOnly(bits=4, **off)), trf, "int4"),
        "tr wo8": (run(trf, QuantizeWeightOnly(bits=8, group_size=16, **off)), trf, "int8"),
        "tr fp16": (run(trf, QuantizeFp16(**off)), trf, "fp16"),
    }
    xs, _ = split_inputs(digits, "val", 256, 64)

    def ort(art: Artifact, optimize: bool) -> np.ndarray:
        return run_batches(session_infer(ort_session(art.path / "model.onnx", optimize=optimize)), "input", xs)

    def on_target(t: Any, art: Artifact, batches: list[np.ndarray]) -> np.ndarray:
        comp = t.compile(art, PassContext(cache=cache, progress=False))
        r = t.runner(comp, threads=1)
        return np.concatenate([r.infer({r.input_names[0]: x})[0] for x in batches])

    tvm = TvmTarget(TvmConfig(tuning_trials=0))
    tvm_reason = tvm.unavailable_reason()
    for name, (art, src, qprec) in models.items():
        ref = ort(art, optimize=False)
        if src is not None and qprec is not None:
            m = compare_outputs(ort(src, optimize=True), ort(art, optimize=True))
            line(name, "pass vs float input", m, breach(m, QUANTIZATION[qprec], True) or "within default")
        prec = model_precision(art)
        m = compare_outputs(ref, on_target(OnnxRuntimeTarget(OnnxRuntimeConfig()), art, xs))
        line(name, "onnxruntime vs reference", m, breach(m, LOWERING[prec], True) or "within default")
        if tvm_reason is None and "MatMulNBits" not in str(art.metadata.get("requires_ops")) and "dyn" not in name:
            one = [x[i:i + 1] for x in xs[:1] for i in range(len(x))]
            m = compare_outputs(ref[:64], on_target(tvm, art, one))
            line(name, "tvm (untuned) vs reference", m, breach(m, LOWERING[prec], True) or "within default")
    if tvm_reason:
        print(f"tvm not measured: {tvm_reason}")


if __name__ == "__main__":
    main()
