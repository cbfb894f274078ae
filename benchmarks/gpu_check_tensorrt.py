"""One prepared check of the TensorRT target on a GPU machine: build, cache, run, compare, time.

    .venv/bin/python benchmarks/gpu_check_tensorrt.py [--out DIR] [--runs 200]

Needs the ``tensorrt`` wheel (10.x) and ``cuda-python`` (or a CUDA build of torch) on a machine with
an NVIDIA GPU. Where they are missing it prints the target's unavailable reason, writes it to the
report and exits 3, so a run on the wrong machine is unmistakable.

Steps (each prints one line and goes into ``<out>/tensorrt_gpu.md``):
 1. export digits-cnn and a ResNet-18 (random weights) to ONNX (dynamic batch);
 2. build FP32 and FP16 engines; rebuild FP32 in a fresh engine cache that shares the timing
    cache (build time with a warm timing cache), and compile again (engine cache hit, no build);
 3. outputs vs ONNX Runtime CPU at batch 1 and 8 (max abs diff, cosine);
 4. latency, interleaved rounds: GPU time (CUDA events around execute_async_v3) and host time
    (copies included), medians and p90;
 5. a shape outside the optimization profile is refused; the parser lists every node it rejects
    (a graph with two unknown custom ops).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.targets.tensorrt_engine import TensorRTConfig, TensorRTTarget  # noqa: E402

from compress.core.artifact import Artifact, InputSpec, sha256_files  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import machine_fingerprint  # noqa: E402
from compress.core.manager import PassContext  # noqa: E402
from compress.errors import BuildError, InputError  # noqa: E402

LINES: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)
    LINES.append(msg)


def export(name: str, shape: tuple[int, ...], cache_dir: Path) -> Artifact:
    from compress.passes.export_onnx import ExportOnnx

    from compress import api
    from compress.inputs import zoo

    return api.apply(zoo.build(name, shape), ExportOnnx(), shape, cache_dir=cache_dir)


def ort_run(art: Artifact, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(art.path / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def compare(ref: np.ndarray, got: np.ndarray) -> str:
    a, b = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return f"max|diff| {np.abs(a - b).max():.2e}, cosine {cos:.6f}"


def unknown_ops_model(folder: Path) -> Artifact:
    from onnx import TensorProto, helper, save

    folder.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
             helper.make_node("NoSuchOpA", ["a"], ["b"], name="bad_a", domain="example.custom"),
             helper.make_node("Relu", ["b"], ["c"], name="ok_relu2"),
             helper.make_node("NoSuchOpB", ["c"], ["y"], name="bad_b", domain="example.custom")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    save(model, str(folder / "model.onnx"))
    return Artifact("onnx", folder, sha256_files(folder), (InputSpec("x", (1, 4)),))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    say(f"command: {' '.join(sys.argv)}")
    reason = TensorRTTarget(TensorRTConfig()).unavailable_reason()
    fp = machine_fingerprint()
    if reason is not None:
        say(f"tensorrt target unavailable here: {reason}")
        write(out, fp, {})
        return 3
    work = Path(tempfile.mkdtemp(prefix="trt-check-"))
    cache = Cache(work / "cache")
    ctx = PassContext(cache=cache, progress=False, log=say)
    results: dict[str, object] = {"fingerprint_target": TensorRTTarget(TensorRTConfig()).fingerprint()}
    say(f"target fingerprint: {json.dumps(results['fingerprint_target'])}")

    models = {"digits-cnn": export("digits-cnn", (1, 1, 8, 8), work / "exp"),
              "resnet18": export("resnet18", (1, 3, 224, 224), work / "exp")}
    runners = {}
    for mname, art in models.items():
        for prec in ("fp32", "fp16"):
            t = TensorRTTarget(TensorRTConfig(precision=prec, max_batch=8, tf32=False))
            t0 = time.perf_counter()
            compiled = cache.put(f"{mname}-{prec}".ljust(64, "0"), t.compile(art, ctx))
            say(f"{mname} {prec}: compile {time.perf_counter() - t0:.1f}s, "
                f"engine {compiled.size_bytes() / 1e6:.2f} MB, "
                f"cache hit {compiled.metadata['tensorrt']['engine_cache_hit']}")
            r = t.runner(compiled)
            runners[(mname, prec)] = r
            for batch in (1, 8):
                x = np.random.default_rng(batch).standard_normal((batch, *art.inputs[0].shape[1:])).astype(np.float32)
                say(f"  batch {batch} vs ONNX Runtime: {compare(ort_run(art, x), r.infer({r.input_names[0]: x})[0])}")
        # engine cache hit: same settings, same cache
        t = TensorRTTarget(TensorRTConfig(precision="fp32", max_batch=8, tf32=False))
        t0 = time.perf_counter()
        again = t.compile(art, ctx)
        say(f"{mname} fp32 again: {time.perf_counter() - t0:.2f}s, "
            f"cache hit {again.metadata['tensorrt']['engine_cache_hit']}")
        # warm timing cache, cold engine cache
        t2 = TensorRTTarget(TensorRTConfig(precision="fp32", max_batch=8, tf32=False,
                                           engine_cache=str(work / f"ec2-{mname}")))
        tim = cache.root / "tensorrt" / "timing"
        (work / f"ec2-{mname}" / "timing").mkdir(parents=True, exist_ok=True)
        for f in tim.iterdir():
            shutil.copy2(f, work / f"ec2-{mname}" / "timing" / f.name)
        t0 = time.perf_counter()
        t2.compile(art, ctx)
        say(f"{mname} fp32 rebuild with warm timing cache: {time.perf_counter() - t0:.1f}s")

    for mname, art in models.items():
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, *art.inputs[0].shape[1:])).astype(np.float32)
            rs = {p: runners[(mname, p)] for p in ("fp32", "fp16")}
            for r in rs.values():
                for _ in range(20):
                    r.infer({r.input_names[0]: x})
                r.device_ms.clear()
                r.host_ms.clear()
            for _ in range(a.runs):  # interleaved rounds
                for r in rs.values():
                    r.infer({r.input_names[0]: x})
            for p, r in rs.items():
                g, h = np.array(r.device_ms), np.array(r.host_ms)
                say(f"{mname} {p} batch {batch}: GPU median {np.median(g):.4f} ms (p90 {np.percentile(g, 90):.4f}), "
                    f"host median {np.median(h):.4f} ms (p90 {np.percentile(h, 90):.4f}), {a.runs} runs")

    r = runners[("digits-cnn", "fp32")]
    try:
        r.infer({r.input_names[0]: np.zeros((9, 1, 8, 8), np.float32)})
        say("PROBLEM: batch 9 outside the profile was not refused")
    except InputError as e:
        say(f"outside profile refused: {e}")
    try:
        TensorRTTarget(TensorRTConfig()).compile(unknown_ops_model(work / "bad"), ctx)
        say("PROBLEM: a graph with unknown ops built")
    except BuildError as e:
        say(f"parser rejection:\n{e}")
    for rr in runners.values():
        rr.close()
    write(out, fp, results)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def write(out: Path, fp: dict, results: dict) -> None:
    text = ["# TensorRT target, GPU check", "",
            "Output of `benchmarks/gpu_check_tensorrt.py`, verbatim. Latency rounds are interleaved between the "
            "FP32 and FP16 engines of one model.", "", "```", *LINES, "```", "", "## Machine", "", "```",
            json.dumps(fp, indent=2, default=str), "```", ""]
    (out / "tensorrt_gpu.md").write_text("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
