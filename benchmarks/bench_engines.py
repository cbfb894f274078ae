"""INT8 engines and runtimes side by side: ONNX Runtime's quantizer vs NNCF, on ONNX Runtime and OpenVINO.

For each zoo model, trained on the digits task here, one ``compress compare`` run (so every cell
is timed interleaved in one process) with precisions fp32, int8 (ONNX Runtime's quantizer,
``quantize.int8``) and int8-nncf (``quantize.nncf``), on targets onnxruntime and openvino.
Reported per model: top-1 of each cell, p50 latency per batch size, and paired per-round ratios
with a 95% block-bootstrap interval: NNCF-engine vs ORT-engine INT8 on each runtime, and
OpenVINO vs ONNX Runtime for each precision.

    python benchmarks/bench_engines.py [--models digits-cnn,resnet18,mobilenetv2,transformer] [--rounds 200]

Writes benchmarks/results/engines.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.cli import main as cli  # noqa: E402
from compress.core.fingerprint import cpu_info  # noqa: E402
from compress.measuring.stats import RatioCI, ratio_ci, ratio_verdict  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "digits-cnn": {"shape": "1,1,8,8", "epochs": 15},
    "resnet18": {"shape": "1,3,32,32", "epochs": 8},
    "mobilenetv2": {"shape": "1,3,32,32", "epochs": 10},
    "transformer": {"shape": "1,1,8,8", "epochs": 25},
}


def fmt_ratio(r: RatioCI) -> str:
    return f"{r.ratio:.2f}x [{r.low:.2f}, {r.high:.2f}] {ratio_verdict(r)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch", default="1,8")
    a = ap.parse_args()
    lines = [f"# INT8 engines x runtimes ({dt.date.today()})", "",
             f"Machine: {cpu_info()['model']}, ISA {', '.join(cpu_info()['isa'])}. Models trained on the digits "
             "task at the input size given; latency at that size. Ratios: p50 of the first over p50 of the second, "
             "from interleaved rounds, with a 95% paired bootstrap interval (compress.measuring.stats).",
             f"Command: `.venv/bin/python benchmarks/bench_engines.py --rounds {a.rounds} --batch {a.batch}`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            spec = MODELS[name]
            out = Path(tmp) / name
            t0 = time.time()
            code = cli(["compare", name, "--train-epochs", str(spec["epochs"]), "--input-shape", spec["shape"],
                        "--precision", "fp32,int8,int8-nncf", "--targets", "onnxruntime,openvino",
                        "--batch", a.batch, "--rounds", str(a.rounds), "--min-time", "0",
                        "--cache", str(Path(tmp) / "cache"), "--out", str(out), "-q"])
            if code != 0:
                lines += [f"## {name}", "", f"compare exited {code}", ""]
                continue
            rep = json.loads((out / "report.json").read_text())
            cells = {(r["variant"], r["target"]): r for r in rep["results"] if r["status"] == "ok"}
            lines += [f"## {name} (input {spec['shape']}, {time.time() - t0:.0f} s)", "",
                      "| precision | target | top-1 | " + " | ".join(f"p50 b{b} ms" for b in a.batch.split(","))
                      + " |", "|---|---|---|" + "---|" * len(a.batch.split(","))]
            for (v, t), r in cells.items():
                acc = f"{r['accuracy_top1']:.2%}" if r.get("accuracy_top1") is not None else "-"
                lat = " | ".join(f"{r['latency'][b]['p50_ms']:.3f}" for b in a.batch.split(","))
                lines.append(f"| {'fp32' if v == 'baseline' else v} | {t} | {acc} | {lat} |")
            lines.append("")
            for b in a.batch.split(","):
                def s(v: str, t: str, b: str = b, cells: dict = cells) -> list[float]:
                    return cells[(v, t)]["latency"][b]["samples_ms"]
                for t in ("onnxruntime", "openvino"):
                    if ("int8", t) in cells and ("int8-nncf", t) in cells:
                        lines.append(f"- b{b}, {t}: NNCF INT8 / ORT-engine INT8 = "
                                     f"{fmt_ratio(ratio_ci(s('int8-nncf', t), s('int8', t), 'p50'))}")
                for v in ("baseline", "int8", "int8-nncf"):
                    if (v, "openvino") in cells and (v, "onnxruntime") in cells:
                        lines.append(f"- b{b}, {'fp32' if v == 'baseline' else v}: OpenVINO / ONNX Runtime = "
                                     f"{fmt_ratio(ratio_ci(s(v, 'openvino'), s(v, 'onnxruntime'), 'p50'))}")
            lines.append("")
            print("\n".join(lines[-12:]), flush=True)
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "engines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
