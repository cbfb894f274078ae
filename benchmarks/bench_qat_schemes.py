"""QAT under each INT8 scheme: does a model trained with fake quantization deploy at its simulated accuracy?

The scheme is forced through ``COMPRESS_ISA`` (as on an AVX2-only CPU: 7-bit weights, "reduce
range"; as on a VNNI CPU: full 8-bit weights), so both rows are measured on any machine. Per
scheme, on the digits task (held-out validation split, 8x8 inputs): top-1 of the float model, of
the fake-quantized torch model after QAT, of the exported QDQ model run by ONNX Runtime with
reference kernels (the simulation), and deployed with ONNX Runtime's fused integer kernels. The
deployed column is this machine's integer kernels: for full 8-bit weights on a CPU without VNNI
it shows the saturation the reduce-range scheme avoids.

Run: ``.venv/bin/python benchmarks/bench_qat_schemes.py`` (writes benchmarks/results/qat_schemes.md).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.passes._quant_common import onnx_top1, ort_session, run_batches, session_infer, split_inputs  # noqa: E402
from compress.passes.export_onnx import ExportOnnx  # noqa: E402
from compress.passes.quantize_qat import QuantizeQat  # noqa: E402

from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import detected_cpu  # noqa: E402
from compress.inputs import zoo  # noqa: E402
from compress.inputs.data import load_data  # noqa: E402
from compress.inputs.training import fit  # noqa: E402
from compress.stages.recipe import DataSpec  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_quantize import run_chain  # noqa: E402

ISA = {"no VNNI (avx2,fma)": "avx,avx2,f16c,fma", "VNNI (avx512_vnni)": "avx,avx2,avx512_vnni,avx512f,f16c,fma"}
SHAPE = (1, 1, 8, 8)


def main() -> None:
    torch.set_num_threads(1)
    data = load_data(DataSpec(source="builtin:digits"), SHAPE)
    torch.manual_seed(0)
    model = zoo.build("digits-cnn")
    fit(model, data, 5, lr=3e-3)
    model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags in ISA.items():
            os.environ["COMPRESS_ISA"], os.environ["COMPRESS_ARCH"] = flags, "x86_64"
            out, recs = run_chain(model, SHAPE, [QuantizeQat(epochs=3), ExportOnnx(atol=0.1)], data, Cache(Path(tmp)))
            meta = recs[0].artifact.metadata["quantize.qat"]
            path = out.path / "model.onnx"
            sim = ort_session(path, optimize=False)
            xs, y = split_inputs(data, "val", None, 64)
            top1_sim = float((run_batches(session_infer(sim), "input", xs).argmax(1) == y).mean())
            top1_dep, _ = onnx_top1(path, data)
            rows.append((label, meta["scheme"], meta["top1_float"], meta["top1_fakequant_after"], top1_sim, top1_dep))
            print(rows[-1], flush=True)
    cpu = detected_cpu()
    lines = [f"# QAT per INT8 scheme ({dt.date.today()})", "",
             f"Machine: {cpu['model']}, ISA {', '.join(cpu['isa'])}. Digits CNN, 5 epochs float, then "
             f"`quantize.qat{{epochs=3}}` -> `export.onnx`; top-1 on the {len(data.val)}-sample validation split.",
             "Command: `.venv/bin/python benchmarks/bench_qat_schemes.py`", "",
             "| forced ISA | scheme | float | fake-quant (torch) | simulated (ORT reference) | deployed (ORT int8) "
             "| deployed - simulated |", "|---|---|---|---|---|---|---|"]
    for label, scheme, f, fq, s, d in rows:
        lines.append(f"| {label} | {scheme} | {f:.2%} | {fq:.2%} | {s:.2%} | {d:.2%} | {(d - s) * 100:+.2f} points |")
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "qat_schemes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
