"""The headline benchmark: this product's best artifact against what a user would do without it.

For ResNet-18, the MobileNetV2-style net and the transformer encoder, in one run:

* accuracy on the digits task (models trained here, at a small input size so training takes
  seconds): the original FP32 model, plain ``onnxruntime.quantization.quantize_static`` INT8,
  and this product's recipe (channel pruning + distillation + calibrated INT8);
* latency at batch 1 and a larger batch (ResNet-18 and MobileNetV2 at 224x224, with the same
  trained, pruned weights: convolutions do not care about input size) of torch eager FP32,
  ONNX Runtime FP32, plain quantize_static INT8 (the faster of its defaults and U8S8
  per-channel) and the product's artifact, all interleaved in one process.

    python benchmarks/bench_suite.py [--quick] [--models resnet18,mobilenetv2,transformer]

Writes benchmarks/results/suite.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.api import module_artifact  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import machine_fingerprint  # noqa: E402
from compress.core.manager import PassContext, PassManager  # noqa: E402
from compress.inputs.data import load_data  # noqa: E402
from compress.inputs.models import load_model  # noqa: E402
from compress.inputs.torch_io import load_torch  # noqa: E402
from compress.measuring.measure import measure_interleaved, summarize  # noqa: E402
from compress.quality.evaluate import top1  # noqa: E402
from compress.stages.execute import train_root as _train_root  # noqa: E402
from compress.stages.recipe import DataSpec, ModelSpec, format_pipeline, parse_pipeline  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {"acc_shape": (1, 3, 32, 32), "lat_shape": (1, 3, 224, 224), "epochs": 8,
                 "recipe": "prune.channels{macs_target=0.2,round_to=16},distill{epochs=8,patience=0},"
                           "quantize.int8"},
    "mobilenetv2": {"acc_shape": (1, 3, 32, 32), "lat_shape": (1, 3, 224, 224), "epochs": 10,
                    "recipe": "prune.channels{macs_target=0.5,round_to=8},distill{epochs=10,patience=0},"
                              "quantize.int8"},
    "transformer": {"acc_shape": (1, 1, 8, 8), "lat_shape": (1, 1, 8, 8), "epochs": 25,
                    "recipe": "prune.channels{macs_target=0.5},distill{epochs=10,patience=0},quantize.int8"},
}


class _Reader:
    """Calibration reader for plain quantize_static (what a user writes by hand)."""

    def __init__(self, name: str, xs: np.ndarray) -> None:
        self.it = iter([{name: x[None]} for x in xs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def plain_ort_int8(fp32: Path, calib: np.ndarray, out_dir: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_dir / "pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    out = {}
    default = out_dir / "int8_default.onnx"
    quantize_static(str(pre), str(default), _Reader(name, calib), quant_format=QuantFormat.QDQ)
    out["default"] = default
    u8s8 = out_dir / "int8_u8s8.onnx"
    quantize_static(str(pre), str(u8s8), _Reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    out["u8s8_per_channel"] = u8s8
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_top1(path: Path, data: Any, threads: int) -> float:
    s = session(path, threads)
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: x.numpy()})[0] for x, _ in data.batches(data.val, 1)])
    return top1(logits, data.val.y)


def run_model(name: str, spec: dict[str, Any], cache: Cache, quick: bool, threads: int) -> dict[str, Any]:
    res: dict[str, Any] = {"model": name, "recipe": spec["recipe"]}
    acc_shape, lat_shape = spec["acc_shape"], spec["lat_shape"]
    root = load_model(ModelSpec(source=f"zoo:{name}", input_shape=list(acc_shape)), cache)
    data = load_data(DataSpec(source="builtin:digits"), acc_shape)
    ctx = PassContext(cache=cache, data=data, progress=False, log=lambda m: print(f"  {name}: {m}", flush=True))
    epochs = 2 if quick else spec["epochs"]
    t0 = time.perf_counter()
    root = _train_root(root, data, epochs, 0, ctx)
    ctx.original = root
    res["train_s"] = time.perf_counter() - t0
    recipe = spec["recipe"]
    if quick:
        recipe = recipe.replace("epochs=8", "epochs=1").replace("epochs=10", "epochs=1")
    passes, _ = parse_pipeline(recipe)
    export = parse_pipeline("export.onnx")[0]
    i_onnx = next(i for i, p in enumerate(passes) if p.kind.startswith("quantize."))
    torch_chain, onnx_chain = passes[:i_onnx], passes[i_onnx:]
    res["recipe"] = format_pipeline(passes, [])

    # --- accuracy at the training input size
    t0 = time.perf_counter()
    small, _ = PassManager(torch_chain).run(root, ctx)
    res["compress_s"] = time.perf_counter() - t0
    res["macs"] = small.metadata.get("prune.channels", {}).get("macs_after"), small.metadata.get(
        "prune.channels", {}).get("macs_before")
    base_onnx, _ = PassManager(export).run(root, ctx)
    best_onnx, _ = PassManager(export + onnx_chain).run(small, ctx)
    calib = np.concatenate([x.numpy() for x, _ in data.batches(data.calib, 256)])
    tmp = Path(tempfile.mkdtemp())
    plain = plain_ort_int8(base_onnx.path / "model.onnx", calib, tmp)
    res["top1"] = {
        "fp32": ort_top1(base_onnx.path / "model.onnx", data, threads),
        **{f"plain_int8_{k}": ort_top1(p, data, threads) for k, p in plain.items()},
        "product": ort_top1(best_onnx.path / "model.onnx", data, threads),
    }

    # --- latency at the deployment input size, same weights
    if tuple(lat_shape) != tuple(acc_shape):
        big_data = load_data(DataSpec(source="builtin:digits"), lat_shape)
        big_ctx = PassContext(cache=cache, data=big_data, progress=False)
        base_big = module_artifact(copy.deepcopy(load_torch(root)), lat_shape, cache)
        small_big = module_artifact(copy.deepcopy(load_torch(small)), lat_shape, cache)
        base_onnx, _ = PassManager(export).run(base_big, big_ctx)
        best_onnx, _ = PassManager(export + onnx_chain).run(small_big, big_ctx)
        calib = np.concatenate([x.numpy() for x, _ in big_data.batches(big_data.calib, 32)])[:64]
        plain = plain_ort_int8(base_onnx.path / "model.onnx", calib, tmp)
        eager = load_torch(base_big)
    else:
        eager = load_torch(root)
    sessions = {"ort_fp32": session(base_onnx.path / "model.onnx", threads),
                **{f"plain_int8_{k}": session(p, threads) for k, p in plain.items()},
                "product": session(best_onnx.path / "model.onnx", threads)}
    res["size_bytes"] = {"fp32": (base_onnx.path / "model.onnx").stat().st_size,
                         "plain_int8_u8s8_per_channel": plain["u8s8_per_channel"].stat().st_size,
                         "product": (best_onnx.path / "model.onnx").stat().st_size}
    res["latency"] = {}
    torch.set_num_threads(threads)
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, *lat_shape[1:])).astype(np.float32)
        fns = {"torch_eager": lambda x=x: eager(torch.from_numpy(x))}
        for k, s in sessions.items():
            fns[k] = (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x}))
        with torch.inference_mode():
            samples = measure_interleaved(fns, warmup=3, min_runs=5 if quick else 30,
                                          min_time_s=0.2 if quick else 2.0, max_time_s=60 if quick else 240).samples
        res["latency"][str(batch)] = {k: summarize(v, batch).model_dump() for k, v in samples.items()}
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def write_md(results: list[dict[str, Any]], cmd: str, seconds: float) -> str:
    lines = ["# Suite: best artifact vs plain ONNX Runtime", "",
             f"Command: `{cmd}`  ", f"Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}, "
             f"{seconds:.0f} s. The machine was shared with other work while this ran; latencies are medians "
             "of interleaved rounds and the headline figures are ratios from the same run.", ""]
    for r in results:
        lat = r["latency"]
        lines += [f"## {r['model']}", "", f"Recipe: `{r['recipe']}`", ""]
        if r["macs"][0]:
            lines.append(f"MACs: {r['macs'][1] / 1e6:.1f} M -> {r['macs'][0] / 1e6:.1f} M "
                         f"({r['macs'][0] / r['macs'][1]:.2f}x) at the training input size.")
            lines.append("")
        t = r["top1"]
        lines += ["| digits top-1 (ONNX Runtime) | % |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.2f} |" for k, v in t.items()]
        lines += ["", "| p50 latency | " + " | ".join(f"batch {b} (ms)" for b in lat) + " | " +
                  " | ".join(f"speed-up vs plain INT8, b{b}" for b in lat) + " |",
                  "|---|" + "---|" * (2 * len(lat))]
        for k in lat["1"]:
            p50 = [lat[b][k]["p50_ms"] for b in lat]
            best_plain = [min(lat[b]["plain_int8_default"]["p50_ms"], lat[b]["plain_int8_u8s8_per_channel"]["p50_ms"])
                          for b in lat]
            lines.append(f"| {k} | " + " | ".join(f"{p:.3f}" for p in p50) + " | " +
                         " | ".join(f"{bp / p:.2f}x" for bp, p in zip(best_plain, p50, strict=True)) + " |")
        b1 = lat["1"]
        plain1 = min(b1["plain_int8_default"]["p50_ms"], b1["plain_int8_u8s8_per_channel"]["p50_ms"])
        lines += ["", f"Headline ({r['model']}): product {plain1 / b1['product']['p50_ms']:.2f}x faster than the "
                  f"faster plain quantize_static INT8 at batch 1; top-1 {100 * t['product']:.2f}% vs original "
                  f"{100 * t['fp32']:.2f}% ({100 * (t['product'] - t['fp32']):+.2f} points).", ""]
    lines += ["## Machine", "", "```json", json.dumps(machine_fingerprint(), indent=2), "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few epochs and rounds (not for RESULTS.md)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / ".compress-cache"))
    a = ap.parse_args()
    cache = Cache(Path(a.cache))
    t0 = time.perf_counter()
    results = []
    for name in a.models.split(","):
        print(f"== {name}", flush=True)
        results.append(run_model(name, MODELS[name], cache, a.quick, a.threads))
    cmd = "python benchmarks/bench_suite.py" + (" --quick" if a.quick else "") + (
        f" --models {a.models}" if a.models != ",".join(MODELS) else "")
    md = write_md(results, cmd, time.perf_counter() - t0)
    print(md)
    if a.quick:  # smoke runs never land in RESULTS.md
        return 0
    out = ROOT / "benchmarks" / "results" / "suite.md"
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
