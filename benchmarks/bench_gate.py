"""The budget gate's own statistics: false alarms, detection and inconclusive rates, time per check.

On the digits CNN (ONNX Runtime, batch 1, one intra-op thread), with a budget of
``p50 <= 1.05x recorded``: the baseline model A is recorded once with ``--update-baseline`` (its
compiled artifact is kept), then each check times the stored artifact interleaved with a candidate
in the same run and decides on the paired ratio's 95% interval:

* A/A: the candidate is A' - the same graph as A with different bytes (another doc string and graph
  name, so the compiled digests differ and the two are really raced, not short-cut as identical).
  It meets the budget by construction; a FAIL is a false alarm.
* A/B: the candidate is B - A plus a chain of redundant ``Max(x, x)`` nodes on the logits (exact:
  the outputs are unchanged; ORT does not fold them), the chain length calibrated to make B about
  10% slower; its true ratio is measured separately by a long interleaved run. A FAIL is a detection.

Checks alternate A/A, A/B so the machine's load hits both alike. Each is repeated at several
measurement lengths (min_time_s per candidate) to show the trade-off between check time and the
effect it can detect.

    python benchmarks/bench_gate.py [--aa 30] [--ab 20] [--times 0.01,0.05,0.25,1] [--quick]

Writes benchmarks/results/gate.md and gate.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.apps.budget import check  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import machine_fingerprint  # noqa: E402
from compress.inputs.models import load_model  # noqa: E402
from compress.measuring.measure import measure_interleaved  # noqa: E402
from compress.measuring.stats import ratio_ci  # noqa: E402
from compress.stages.recipe import ModelSpec  # noqa: E402

LIMIT = 1.05


def export_digits(work: Path, cache: Path) -> Path:
    """The digits CNN exported to ONNX by the product itself (random-init weights: latency only)."""
    import torch
    from compress.passes.export_onnx import ExportOnnx

    from compress.core.manager import PassContext, PassManager

    torch.set_num_threads(1)
    c = Cache(cache)
    root = load_model(ModelSpec(source="zoo:digits-cnn"), c)
    art, _ = PassManager([ExportOnnx()]).run(root, PassContext(cache=c, progress=False))
    dst = work / "A.onnx"
    shutil.copy(next(art.path.glob("*.onnx")), dst)
    return dst


def variant(src: Path, dst: Path, redundant: int, tag: str) -> Path:
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    m.doc_string = f"{tag}: {src.name} with {redundant} redundant Max(x, x) nodes"
    m.graph.name = f"{m.graph.name}_{tag}"
    g = m.graph
    out = g.output[0].name
    prev = f"{out}_r0"
    for node in g.node:
        node.output[:] = [prev if o == out else o for o in node.output]
    for i in range(redundant):
        nxt = out if i == redundant - 1 else f"{out}_r{i + 1}"
        g.node.append(helper.make_node("Max", [prev, prev], [nxt], name=f"redundant_{i}"))
        prev = nxt
    if redundant == 0:  # undo the rename
        for node in g.node:
            node.output[:] = [out if o == prev else o for o in node.output]
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def runners(paths: list[Path], cache: Path) -> list[Any]:
    """The product's own ONNX Runtime runners (compiled as a check compiles them, 1 thread)."""
    from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget

    from compress.core.manager import PassContext

    c = Cache(cache)
    ctx = PassContext(cache=c, progress=False)
    t = OnnxRuntimeTarget(OnnxRuntimeConfig())
    return [t.runner(t.compile(load_model(ModelSpec(source=str(p)), c), ctx), threads=1) for p in paths]


def true_ratio(a: Path, b: Path, seconds: float, cache: Path) -> dict[str, Any]:
    """B's latency over A's, from a long interleaved run of the two compiled models through the
    product's runners, as a check times them (p50, block-bootstrap interval)."""
    ra, rb = runners([a, b], cache)
    x = {ra.input_names[0]: np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    assert np.array_equal(ra.infer(x)[0], rb.infer(x)[0]), "the slow variant must compute the same outputs"
    t = measure_interleaved({"A": lambda: ra.infer(x), "B": lambda: rb.infer(x)}, warmup=50,
                            min_runs=10**9, min_time_s=0, max_time_s=seconds)
    r = ratio_ci(t.samples["B"], t.samples["A"], "p50", resamples=1000)
    ra.close()
    rb.close()
    return {**r.to_json(), "p50_a_ms": float(np.median(t.samples["A"])), "p50_b_ms": float(np.median(t.samples["B"]))}


def calibrate(work: Path, a: Path, seconds: float, cache: Path, target: float = 1.10) -> tuple[int, dict[str, Any]]:
    best: tuple[float, int, dict[str, Any]] | None = None
    for k in (4, 6, 8, 10, 12, 16, 20):
        r = true_ratio(a, variant(a, work / f"B{k}.onnx", k, f"B{k}"), seconds, cache)
        print(f"  calibrate: {k} redundant nodes -> x{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]", flush=True)
        d = abs(r["ratio"] - target)
        if best is None or d < best[0]:
            best = (d, k, r)
        if r["ratio"] > target + 0.03:
            break
    assert best is not None
    return best[1], best[2]


def write_setup(work: Path, min_time: float, rounds: int) -> Path:
    (work / "r.toml").write_text(
        'name = "digits"\nmodel = { source = "A.onnx" }\ndata = { source = "random" }\n'
        f"measure = {{ batch_sizes = [1], warmup = 20, min_runs = {rounds}, min_time_s = {min_time}, "
        "max_time_s = 50, threads = 1 }\n[[targets]]\nkind = \"onnxruntime\"\n")
    b = work / "budgets.toml"
    b.write_text(f'models = {{ digits = "r.toml" }}\nresamples = 2000\n[[budget]]\nmodel = "digits"\n'
                 f'target = "onnxruntime"\nmetric = "p50"\nmax = "{LIMIT}x recorded"\n')
    return b


def use_model(work: Path, name: str) -> None:
    r = work / "r.toml"
    text = r.read_text()
    start = text.index('source = "') + len('source = "')
    r.write_text(text[:start] + str(work / name) + text[text.index('"', start):])


def one_check(work: Path, budgets: Path, cache: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = check(budgets, out_dir=work / "out", cache_dir=cache)
    secs = time.perf_counter() - t0
    v = res.verdicts[0]
    rep = next(iter(res.reports.values())).to_json()
    lat = next(r for r in rep["results"] if r["variant"] == "baseline")["latency"]["1"]
    cont = rep.get("contention") or {}
    during = list(cont.get("during", {}).values())
    return {"status": v.status, "value": v.value, "low": v.low, "high": v.high, "detail": v.detail,
            "seconds": round(secs, 2), "rounds": lat["runs"], "p50_ms": lat["p50_ms"],
            "others_cores": during[0]["others_cores"] if during else None,
            "busy_warnings": len(cont.get("warnings", [])), "paired": "re-timed" in v.detail}


def rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    st = [r["status"] for r in rows]
    widths = [r["high"] / r["low"] - 1 for r in rows if r["low"]]
    return {"n": n, "fail": st.count("fail") / n, "pass": st.count("pass") / n,
            "inconclusive": st.count("inconclusive") / n,
            "median_ratio": float(np.median([r["value"] for r in rows])),
            "median_interval_width": float(np.median(widths)) if widths else None,
            "mean_s": float(np.mean([r["seconds"] for r in rows])), "max_s": float(max(r["seconds"] for r in rows)),
            "median_rounds": float(np.median([r["rounds"] for r in rows])),
            "busy_share": sum(r["busy_warnings"] > 0 for r in rows) / n,
            "excludes_1": sum(not (r["low"] <= 1.0 <= r["high"]) for r in rows) / n,
            "all_paired": all(r["paired"] for r in rows)}


def cli_overhead(work: Path, budgets: Path, cache: Path) -> float:
    """Wall time of one whole `compress check` process (imports included), for the 60 s goal."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress", "check", str(budgets), "--cache", str(cache), "--out",
                    str(work / "out-cli")], cwd=ROOT, capture_output=True, check=False)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aa", type=int, default=30)
    ap.add_argument("--ab", type=int, default=20)
    ap.add_argument("--times", default="0.01,0.05,0.25,1", help="min_time_s per candidate, comma list")
    ap.add_argument("--rounds", type=int, default=20, help="minimum rounds per check")
    ap.add_argument("--calibrate-s", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true", help="3 A/A, 2 A/B, one length (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--render", help="only rewrite gate.md from this gate.json (no measuring)")
    a = ap.parse_args()
    if a.render:
        res = json.loads(Path(a.render).read_text())
        for r in res["by_time"].values():  # figures derived from the stored rows
            r["aa"], r["ab"] = rates(r["aa_rows"]), rates(r["ab_rows"])
        started = (dt.datetime.fromisoformat(res["started"]) if "started" in res else
                   dt.datetime.fromtimestamp(Path(a.render).stat().st_mtime - res["seconds"], dt.UTC))
        command = res.get("command") or f"--times {','.join(res['by_time'])}"
        (Path(a.out) / "gate.md").write_text(render(res, command, started))
        print((Path(a.out) / "gate.md").read_text())
        return 0
    if a.quick:
        a.aa, a.ab, a.times, a.calibrate_s = 3, 2, "0.05", 2.0
    t_start = time.perf_counter()
    started = dt.datetime.now(dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    cache = work / "cache"
    print(f"work dir {work}", flush=True)
    a_path = export_digits(work, cache)
    variant(a_path, work / "A2.onnx", 0, "A2")
    k, truth = calibrate(work, a_path, a.calibrate_s, cache)
    b_path = work / f"B{k}.onnx"
    shutil.copy(b_path, work / "B.onnx")
    truth = true_ratio(a_path, work / "B.onnx", 2 * a.calibrate_s, cache)  # a fresh, longer look at the chosen one
    print(f"B = A + {k} redundant nodes: true ratio x{truth['ratio']:.3f} [{truth['low']:.3f}, {truth['high']:.3f}]",
          flush=True)
    results: dict[str, Any] = {"limit": LIMIT, "redundant_nodes": k, "true_ratio": truth, "by_time": {}}
    for mt in [float(x) for x in a.times.split(",")]:
        budgets = write_setup(work, mt, a.rounds)
        use_model(work, "A.onnx")
        shutil.rmtree(work / "budgets.baseline.artifacts", ignore_errors=True)
        (work / "budgets.baseline.json").unlink(missing_ok=True)
        check(budgets, out_dir=work / "out", cache_dir=cache, update_baseline=True)
        aa: list[dict[str, Any]] = []
        ab: list[dict[str, Any]] = []
        for i in range(max(a.aa, a.ab)):
            for kind, rows, n, model in (("A/A", aa, a.aa, "A2.onnx"), ("A/B", ab, a.ab, "B.onnx")):
                if i >= n:
                    continue
                use_model(work, model)
                r = one_check(work, budgets, cache)
                rows.append(r)
                print(f"  t={mt:g}s {kind} #{len(rows)}: {r['status']:12s} x{r['value']:.3f} "
                      f"[{r['low']:.3f}, {r['high']:.3f}] {r['seconds']:.1f}s {r['rounds']} rounds "
                      f"others {r['others_cores']}", flush=True)
        use_model(work, "B.onnx")
        overhead = cli_overhead(work, budgets, cache)
        results["by_time"][str(mt)] = {"aa": rates(aa), "ab": rates(ab), "aa_rows": aa, "ab_rows": ab,
                                       "cli_seconds": round(overhead, 1)}
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["started"] = started.isoformat()
    results["command"] = " ".join(sys.argv[1:])
    results["machine"] = machine_fingerprint()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(results, indent=1))
    (out / "gate.md").write_text(render(results, " ".join(sys.argv[1:]), started))
    print((out / "gate.md").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return 0


def render(res: dict[str, Any], args: str, started: dt.datetime) -> str:
    m = res["machine"]["cpu"]
    tr = res["true_ratio"]
    lines = [
        "# Budget gate benchmark (A/A and A/B)",
        "",
        f"- Command: `.venv/bin/python benchmarks/bench_gate.py{' ' + args if args else ''}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M')} UTC; total wall time {res['seconds']:.0f} s",
        f"- Machine: {m['model']}, {m['cores']} cores, shared with other engineers' jobs while this ran "
        "(see 'busy' below: the share of checks whose contention probe warned that other processes held CPU)",
        f"- Budget: `p50 <= {res['limit']}x recorded` on ONNX Runtime, batch 1, 1 intra-op thread; the recorded "
        "baseline's artifact is re-timed in every check, interleaved with the candidate (paired, block-bootstrap "
        "95% interval); pass = whole interval within the limit, fail = whole interval beyond, else inconclusive.",
        f"- A/A: A against A' (same graph, different bytes: raced, not short-cut as identical). "
        f"A/B: B = A + {res['redundant_nodes']} redundant `Max(x, x)` nodes on the logits (outputs bit-identical), "
        f"true ratio x{tr['ratio']:.3f} [{tr['low']:.3f}, {tr['high']:.3f}] from a separate long interleaved run "
        f"of the two compiled models through the product's runners ({tr['rounds']} rounds; p50 "
        f"{tr['p50_a_ms'] * 1000:.1f} vs {tr['p50_b_ms'] * 1000:.1f} us).",
        "",
        "| min_time_s per candidate | check s (mean / max, in-process) | whole CLI process s | rounds (median) | "
        "A/A false alarms | A/A pass | A/A inconclusive | A/B detected | A/B missed (pass) | A/B inconclusive | "
        "interval width A/A, A/B (median) | A/A interval excludes 1 | A/B ratio (median) | "
        "detectable ratio (est.) | busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mt, r in res["by_time"].items():
        aa, ab = r["aa"], r["ab"]
        lines.append(
            f"| {mt} | {aa['mean_s']:.1f} / {max(aa['max_s'], ab['max_s']):.1f} | {r['cli_seconds']} | "
            f"{aa['median_rounds']:.0f} | {round(aa['fail'] * aa['n'])}/{aa['n']} | "
            f"{round(aa['pass'] * aa['n'])}/{aa['n']} | {round(aa['inconclusive'] * aa['n'])}/{aa['n']} | "
            f"{round(ab['fail'] * ab['n'])}/{ab['n']} | {round(ab['pass'] * ab['n'])}/{ab['n']} | "
            f"{round(ab['inconclusive'] * ab['n'])}/{ab['n']} | "
            f"{100 * (aa['median_interval_width'] or 0):.1f}%, {100 * (ab['median_interval_width'] or 0):.1f}% | "
            f"{round(aa['excludes_1'] * aa['n'])}/{aa['n']} | x{ab['median_ratio']:.3f} | "
            f"x{res['limit'] * (1 + (aa['median_interval_width'] or 0)) ** 0.92:.3f} | "
            f"{100 * (aa['busy_share'] + ab['busy_share']) / 2:.0f}% |")
    lines.append("")
    best = None
    for mt, r in res["by_time"].items():
        ok = r["ab"]["fail"] >= 0.95 and r["aa"]["fail"] <= 0.01 and max(r["aa"]["max_s"], r["ab"]["max_s"]) < 60
        if ok and best is None:
            best = mt
    goal = "not met at any measured length (see the rows above)"
    if best:
        seen = res["by_time"][best]["ab"]["median_ratio"]
        goal = (f"met at min_time_s = {best} (on a regression that measured x{seen:.3f} inside the checks, "
                f"x{tr['ratio']:.3f} in the separate calibration run)")
    lines += [
        f"Goal from the issue: a 10% regression detected in >= 95% of checks with <= 1% false alarms, each check "
        f"under 60 s. In this run: {goal}.",
        "",
        "Notes: a false alarm needs the whole interval above the limit; with 30 A/A checks a 1% rate cannot be "
        "confirmed (0/30 bounds it at about 10% with 95% confidence), only refuted. Inconclusive is the gate "
        "saying the machine was too noisy to decide, which is the honest answer under load. Interval width is "
        "high/low - 1. 'Detectable ratio (est.)' is the true latency ratio a check of that length would fail "
        "about 95% of the time, estimated from the A/A interval width (limit x (1 + width)^0.92: the interval's "
        "lower end must clear the limit with 95% probability) - the trade-off of check time against the "
        "effect it can see.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
