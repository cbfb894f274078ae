"""TVM untuned and tuned at two budgets against ONNX Runtime FP32, measured in one run.

    .venv/bin/python benchmarks/bench_tvm.py [--models resnet18,mobilenetv2] [--budgets 150,400]
                                             [--time-caps 180,480] [--rounds 30]

For each zoo model (224x224, batch 1, random weights: latency only) it exports ONNX, compiles TVM
untuned and tuned at each budget with a fresh tuning database (the second budget continues from
the first through the database ledger, so its tuning time is cumulative), then times ONNX Runtime
and every TVM build interleaved round by round (ORT intra-op spinning off, 2 threads each) and
reports medians and per-round ratios. Untuned TVM is too slow for many rounds and gets a few.
Writes benchmarks/results/tvm.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.passes.export_onnx import ExportOnnx  # noqa: E402
from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget  # noqa: E402
from compress.targets.tvm_compiler import TvmConfig, TvmTarget  # noqa: E402

from compress.api import apply  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import machine_fingerprint  # noqa: E402
from compress.core.manager import PassContext  # noqa: E402
from compress.inputs import zoo  # noqa: E402

THREADS = 2


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def timed(runner, feeds) -> float:
    t0 = time.perf_counter()
    runner.infer(feeds)
    return (time.perf_counter() - t0) * 1e3


def bench_model(name: str, budgets: list[int], caps: list[float | None], rounds: int, work: Path,
                prepack: str = "on") -> dict:
    import torch

    torch.manual_seed(0)
    shape = (1, 3, 224, 224)
    cache = Cache(work / name)
    onnx_art = apply(zoo.build(name, shape).eval(), ExportOnnx(), input_shape=shape, data=None, cache_dir=cache.root)
    ctx = PassContext(cache=cache, log=log)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {onnx_art.inputs[0].name: x}

    ort_t = OnnxRuntimeTarget(OnnxRuntimeConfig())
    ort_r = ort_t.runner(ort_t.compile(onnx_art, ctx), threads=THREADS)
    ref = ort_r.infer(feeds)[0]

    builds: dict[str, dict] = {}
    runners = {}
    db = work / name / "tvm-db-bench"  # fresh per run: the benchmark measures tuning, not a warm database
    # "both" builds every budget twice, with and without weight prepacking, timed in the same rounds.
    arms = {"on": [True], "off": [False], "both": [True, False]}[prepack]
    plan = [("untuned", 0, None, True)] + [
        (f"tuned-{b}" + ("" if pp else " no-prepack"), b, c, pp)
        for b, c in zip(budgets, caps, strict=True) for pp in arms]
    for label, trials, cap, pp in plan:
        log(f"{name}: compiling TVM {label}")
        t0 = time.perf_counter()
        tgt = TvmTarget(TvmConfig(tuning_trials=trials, tuning_time_s=cap, database=str(db), threads=THREADS,
                                  weight_prepack=pp))
        comp = tgt.compile(onnx_art, ctx)
        wall = time.perf_counter() - t0
        r = tgt.runner(comp, threads=THREADS)
        out = r.infer(feeds)[0]
        info = comp.metadata["tvm"]
        builds[label] = {"compile_wall_s": round(wall, 1), "tuning": info["tuning"],
                         "max_abs_diff_vs_ort": float(np.abs(out - ref).max()), "notes": info["notes"]}
        runners[label] = r
        log(f"{name}: {label} built in {wall:.0f} s; tuning {json.dumps(info['tuning'])}")

    # Warm-up, then interleave: each round times ORT and every tuned build once.
    for r in [ort_r, *runners.values()]:
        r.infer(feeds)
    lat: dict[str, list[float]] = {k: [] for k in ["onnxruntime", *runners]}
    for i in range(rounds):
        lat["onnxruntime"].append(timed(ort_r, feeds))
        for label, r in runners.items():
            if label == "untuned" and i >= 3:
                continue
            lat[label].append(timed(r, feeds))
    ratios = {label: statistics.median(t / o for t, o in zip(lat[label], lat["onnxruntime"], strict=False))
              for label in runners}
    return {"model": name, "builds": builds,
            "median_ms": {k: round(statistics.median(v), 3) for k, v in lat.items()},
            "runs": {k: len(v) for k, v in lat.items()},
            "ratio_vs_ort_median": {k: round(v, 3) for k, v in ratios.items()}}


def write_md(results: list[dict], cmd: str, total_s: float, out: Path) -> None:
    lines = [
        "# TVM vs ONNX Runtime FP32 (CPU)", "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; total run {total_s / 60:.1f} min  ",
        "The machine was **shared with other jobs** during the run (2 cores): absolute figures are noisy; "
        "ratios are per-round (ORT and TVM interleaved), medians reported.  ",
        f"Threads: {THREADS} for ORT (intra-op spinning off) and TVM. Batch 1, 224x224, random weights.  ",
        "Tuning: MetaSchedule with the in-process builder/runner of targets/_tvm_tuning.py, a fresh database "
        "per model; the larger budget continues from the smaller one, so its tuning time is cumulative. "
        "With a time cap (tuning_time_s, off by default here) tuning uses the round-robin scheduler and "
        "`stopped_by_time` says when the cap, not the trial count, ended it.", "",
    ]
    for r in results:
        lines += [f"## {r['model']}", "",
                  "| build | median ms | runs | ratio vs ORT (median per round) | trials in db | tuning s (cumulative) "
                  "| tasks with records | stopped by time | max abs diff vs ORT |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| ONNX Runtime FP32 | {r['median_ms']['onnxruntime']} | {r['runs']['onnxruntime']} "
                  "| 1.0 | | | | | |"]
        for label, b in r["builds"].items():
            t = b["tuning"]
            spent = "" if label == "untuned" else _cum_seconds(r["builds"], label)
            lines.append(f"| TVM {label} | {r['median_ms'][label]} | {r['runs'][label]} | "
                         f"{r['ratio_vs_ort_median'][label]} | {t.get('trials_in_database', 0)} | {spent} | "
                         f"{t.get('tasks_with_records', '-')}/{t.get('tasks', '-')} | "
                         f"{t.get('stopped_by_time', '-')} | "
                         f"{b['max_abs_diff_vs_ort']:.2e} |")
        lines += ["", "Where the tuning time went (this budget's run only):", ""]
        for label, b in r["builds"].items():
            t = b["tuning"]
            if label != "untuned":
                lines.append(f"- {label}: {t['trials_this_run']} trials in {t['tuning_s_this_run']} s — search "
                             f"{t['search_s']} s, in-process build {t['builder_s']} s, in-process timing "
                             f"{t['runner_s']} s; build errors {t['build_errors']}, run errors {t['run_errors']}; "
                             f"compile wall {b['compile_wall_s']} s")
        lines.append("")
    lines += ["## Machine", "", "```json", json.dumps(machine_fingerprint(), indent=1), "```", ""]
    out.write_text("\n".join(lines))


def _cum_seconds(builds: dict, label: str) -> str:
    """Tuning seconds up to and including ``label`` (later budgets continue from earlier ones of the
    same arm: prepacked and plain builds tune different workloads, so each has its own ledger)."""
    total = 0.0
    arm = label.endswith("no-prepack")
    for name, b in builds.items():
        if name.endswith("no-prepack") != arm:
            continue
        total += float(b["tuning"].get("tuning_s_this_run", 0.0))
        if name == label:
            return f"{total:.1f}"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenetv2")
    ap.add_argument("--budgets", default="96,256")
    ap.add_argument("--time-caps", default="none,none", help="seconds per budget (cumulative); 'none' for no cap")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--prepack", choices=["on", "off", "both"], default="on",
                    help="weight prepacking of tuned builds; both = an A/B of each budget in the same run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tvm.md"))
    a = ap.parse_args()
    budgets = [int(b) for b in a.budgets.split(",")]
    caps = [None if c == "none" else float(c) for c in a.time_caps.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-tvm-"))
    t0 = time.perf_counter()
    results = []
    try:
        for m in a.models.split(","):
            results.append(bench_model(m, budgets, caps, a.rounds, work, a.prepack))
            log(json.dumps(results[-1]["median_ms"]) + " " + json.dumps(results[-1]["ratio_vs_ort_median"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmd = ".venv/bin/python benchmarks/bench_tvm.py " + " ".join(sys.argv[1:])
    write_md(results, cmd.strip(), time.perf_counter() - t0, Path(a.out))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
