"""TVM performance levers, one at a time, against ONNX Runtime FP32 in the same run (issue 20).

    .venv/bin/python benchmarks/bench_tvm_levers.py [--models mobilenetv2] [--trials 192]
        [--arms gradient,dominant,nhwc,no-prepack,int8-float,int8,int8-nchw] [--time-cap S]
        [--rounds 40] [--out FILE]

For each zoo model (224x224, batch 1, random weights: latency only) every arm is compiled by the
tvm target with the same trial budget and its own fresh tuning database (no arm profits from
another's records), then ONNX Runtime FP32, ONNX Runtime on the INT8 model (when an arm needs it)
and every TVM build are timed interleaved, round by round. Reported per build: the median latency,
the ratio to ONNX Runtime FP32 (p50 over rounds, paired block-bootstrap 95 % interval), the
tuning time, batches per task and the largest difference from ONNX Runtime on the same input.

Arms (each changes one thing against the arm before it in this list, except where noted):
    gradient    MetaSchedule's gradient task scheduler (this target's default until 2026-11-29), NCHW
    dominant    the dominant-first scheduler (targets/_tvm_tuning.py; the default now), NCHW
    nhwc        dominant + convolutions converted to NHWC (TvmConfig.layout; the default since 2026-11-29)
    no-prepack  dominant without blocked weight layouts (TvmConfig.weight_prepack = False)
    int8-float  nhwc on the static INT8 Q/DQ model from quantize.int8, as TVM's ONNX frontend imports
                it: quantize/dequantize ops around float convolutions (TvmConfig.int8_arith = "float");
                since 2026-11-29 per-tensor Q/DQ ops are plain ops in NHWC (no transposes around them)
    int8        int8-float with integer convolutions (int8_arith = "integer": int32 sums on the
                8-bit values, targets/_tvm_rewrites.py; lost the A/B in tvm-int8-ops.md, so not the default)
    int8-nchw   int8 in NCHW (before 2026-11-29 the "int8" arm was this layout with float arithmetic)
Writes benchmarks/results/tvm-levers.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.passes.export_onnx import ExportOnnx  # noqa: E402
from compress.passes.quantize_int8 import QuantizeInt8  # noqa: E402
from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget  # noqa: E402
from compress.targets.tvm_compiler import TvmConfig, TvmTarget  # noqa: E402

from compress.api import apply  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import machine_fingerprint  # noqa: E402
from compress.core.manager import PassContext  # noqa: E402
from compress.inputs import zoo  # noqa: E402
from compress.measuring.stats import ratio_ci  # noqa: E402

THREADS = 2
# Every arm names its layout: NHWC became the target's default after these runs, and each arm changes
# one thing against "dominant" in NCHW.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradient": ("fp32", {"scheduler": "gradient", "layout": "NCHW"}),
    "dominant": ("fp32", {"scheduler": "dominant", "layout": "NCHW"}),
    "nhwc": ("fp32", {"scheduler": "dominant", "layout": "NHWC"}),
    "no-prepack": ("fp32", {"scheduler": "dominant", "layout": "NCHW", "weight_prepack": False}),
    "int8-float": ("int8", {"scheduler": "dominant", "layout": "NHWC", "int8_arith": "float"}),
    "int8": ("int8", {"scheduler": "dominant", "layout": "NHWC", "int8_arith": "integer"}),
    "int8-nchw": ("int8", {"scheduler": "dominant", "layout": "NCHW", "int8_arith": "integer"}),
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def timed(runner: Any, feeds: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    runner.infer(feeds)
    return (time.perf_counter() - t0) * 1e3


def models_for(name: str, shape: tuple[int, ...], work: Path, need_int8: bool) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    module = zoo.build(name, shape).eval()
    out = {"fp32": apply(module, ExportOnnx(), input_shape=shape, data=None, cache_dir=work / "cache")}
    if need_int8:
        # Calibration on the built-in digits images resized to the model's input: enough for a latency
        # figure (the weights are random, so accuracy means nothing here). The parity bounds are off for
        # the same reason: a random network's INT8 outputs are not comparable to its float ones.
        out["int8"] = apply(module, [ExportOnnx(), QuantizeInt8(samples=64, deployed_min_cosine=0.0)],
                            input_shape=shape, data="builtin:digits", cache_dir=work / "cache")
    return out


def ort_kernel_count(model: Path, out: Path) -> int:
    """Nodes ONNX Runtime runs after its own graph optimizations (all levels; what it fused): the fusion
    figure TVM's fused kernel count is compared with."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(str(out)).graph.node)


def bench_model(name: str, arms: list[str], trials: int, cap: float | None, rounds: int, work: Path,
                size: int) -> dict:
    shape = (1, zoo.ZOO[name].input_shape[1], size, size)
    need_int8 = any(ARMS[a][0] == "int8" for a in arms)
    onnx = models_for(name, shape, work / name, need_int8)
    ctx = PassContext(cache=Cache(work / name / "cache"), log=log)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {onnx["fp32"].inputs[0].name: x}

    fused = {kind: ort_kernel_count(a.path / "model.onnx", work / name / f"ort-{kind}.onnx")
             for kind, a in onnx.items()}
    ort = OnnxRuntimeTarget(OnnxRuntimeConfig())
    runners: dict[str, Any] = {}
    refs: dict[str, np.ndarray] = {}
    for kind in onnx:
        runners[f"onnxruntime {kind}"] = ort.runner(ort.compile(onnx[kind], ctx), threads=THREADS)
        refs[kind] = runners[f"onnxruntime {kind}"].infer(feeds)[0]
    builds: dict[str, dict] = {}
    for arm in arms:
        kind, settings = ARMS[arm]
        log(f"{name}: compiling TVM arm {arm!r} ({kind}, {settings}), {trials} trials"
            + (f" or {cap:g} s" if cap else ""))
        t0 = time.perf_counter()
        tgt = TvmTarget(TvmConfig(tuning_trials=trials, tuning_time_s=cap, threads=THREADS,
                                  database=str(work / name / f"db-{arm}"), **settings))
        comp = tgt.compile(onnx[kind], ctx)
        wall = time.perf_counter() - t0
        r = tgt.runner(comp, threads=THREADS)
        out = r.infer(feeds)[0]
        t = comp.metadata["tvm"]["tuning"]
        builds[arm] = {"model": kind, "settings": settings, "compile_wall_s": round(wall, 1), "tuning": t,
                       "max_abs_diff_vs_ort_same_model": float(np.abs(out - refs[kind]).max())}
        runners[f"tvm {arm}"] = r
        log(f"{name}: {arm} built in {wall:.0f} s: {t['trials_this_run']} trials, {t['tasks_with_records']}/"
            f"{t['tasks']} tasks with records, weighted best kernels {t['best_kernels_ms']} ms")

    for r in runners.values():
        r.infer(feeds)
    lat: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for label, r in runners.items():
            lat[label].append(timed(r, feeds))
    base = lat["onnxruntime fp32"]
    ratios = {}
    for label, v in lat.items():
        ci = ratio_ci(v, base, "p50")
        ratios[label] = {"ratio": round(ci.ratio, 3), "lo": round(ci.low, 3), "hi": round(ci.high, 3)}
    return {"model": name, "shape": list(shape), "trials": trials, "ort_kernels": fused, "time_cap_s": cap,
            "builds": builds,
            "median_ms": {k: round(statistics.median(v), 3) for k, v in lat.items()},
            "rounds": rounds, "ratio_vs_ort_fp32": ratios}


def write_md(results: list[dict], cmd: str, total_s: float, out: Path) -> None:
    lines = [
        "# TVM levers, one at a time, against ONNX Runtime FP32 (same run)", "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; total run {total_s / 60:.1f} min  ",
        f"Threads: {THREADS} for every runtime. Batch 1, shapes below, random weights (latency only). Every arm "
        "tunes from an empty database with the same trial budget. Latency: all builds timed interleaved "
        "round by round; ratio = p50 / ONNX Runtime FP32's p50 with a paired block-bootstrap 95 % interval. "
        "The machine has 2 cores and may have been shared; the ratios, not the milliseconds, are the result. "
        "Kernels per call: nodes ONNX Runtime runs after its graph optimizations; for TVM, calls of fused "
        "tunable kernels (layout transforms and reshapes outside them are not counted).",
        "",
    ]
    for r in results:
        lines += [f"## {r['model']} {tuple(r['shape'])} ({r['trials']} trials per arm"
                  + (f", time cap {r['time_cap_s']:g} s" if r["time_cap_s"] else "") + f", {r['rounds']} rounds)",
                  "", "| build | p50 ms | ratio vs ORT FP32 [95 %] | tuning s | tasks with records | kernels per call "
                  "| max abs diff vs ORT (same model) |", "|---|---|---|---|---|---|---|"]
        for label, ms in r["median_ms"].items():
            q = r["ratio_vs_ort_fp32"][label]
            arm = label.removeprefix("tvm ")
            b = r["builds"].get(arm) if label.startswith("tvm ") else None
            t = b["tuning"] if b else {}
            lines.append(f"| {label} | {ms} | {q['ratio']} [{q['lo']}, {q['hi']}] | "
                         f"{t.get('tuning_s_this_run', '')} | "
                         + (f"{t['tasks_with_records']}/{t['tasks']}" if b else "") + " | "
                         + (str(t.get("kernel_calls", "")) if b else str(r["ort_kernels"].get(label.split()[-1], "")))
                         + " | "
                         + (f"{b['max_abs_diff_vs_ort_same_model']:.2e}" if b else "") + " |")
        lines += ["", "Where each arm's trials went (batches per task, largest first):", ""]
        for arm, b in r["builds"].items():
            per = sorted(b["tuning"].get("batches_per_task", {}).items(), key=lambda kv: -kv[1])
            lines.append(f"- {arm}: " + (", ".join(f"{k} {v}" for k, v in per[:6]) + (" ..." if len(per) > 6 else "")
                                         if per else "not recorded (MetaSchedule's own scheduler)"))
        lines.append("")
    lines += ["## Raw", "", "```json", json.dumps(results, indent=1, default=str)[:20000], "```", "",
              "## Machine", "", "```json", json.dumps(machine_fingerprint(), indent=1), "```", ""]
    out.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2")
    ap.add_argument("--trials", type=int, default=192)
    ap.add_argument("--time-cap", type=float, default=None, help="tuning seconds per arm (default: trials only)")
    ap.add_argument("--arms", default="gradient,dominant,nhwc,int8")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--size", type=int, default=224, help="input height and width (batch 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tvm-levers.md"))
    a = ap.parse_args()
    arms = a.arms.split(",")
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-tvm-levers-"))
    t0 = time.perf_counter()
    results = []
    try:
        for m in a.models.split(","):
            results.append(bench_model(m, arms, a.trials, a.time_cap, a.rounds, work, a.size))
            log(json.dumps(results[-1]["ratio_vs_ort_fp32"]))
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    cmd = ".venv/bin/python benchmarks/bench_tvm_levers.py " + " ".join(sys.argv[1:])
    write_md(results, cmd.strip(), time.perf_counter() - t0, Path(a.out))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
