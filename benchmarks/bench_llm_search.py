"""compress search on SmolLM2-135M against hand-written recipes (issue 30: "the search finds a point on the front at
least as good as the best hand-written recipe, within its time budget").

    python benchmarks/bench_llm_search.py --hf-dir HF_DIR [--trials 4] [--timeout 600] [--out runs/bench-llm-search]

1. ``compress search`` over blocks removed (``prune.depth``, optional, 2 to 8 of 30) and the INT4 group size (32 or
   128; RTN, INT8 activations inside MatMulNBits, the fastest INT4 of bench_llm.py) with objectives decode time
   (``decode_time_ratio``) and perplexity rise, ``--trials`` trials or ``--timeout`` seconds, whichever ends first.
2. One run, interleaved: the search's front and the hand-written recipes of bench_llm_structure.py that fit a short
   budget (INT4 alone, and 8 blocks removed then INT4; no distillation: this machine trains at tens of tokens/s)
   timed together against the FP32 build, so that their ratios come from the same rounds.
3. Each hand-written recipe: is a front point at least as good on both figures (same run)?

ONNX Runtime, 1 thread, batch 1. Perplexity over the held-out last 1,024 tokens of pydoc_data.topics (windows of
256); time to first token for a 64-token prompt and decode tokens/s over 32 greedy tokens, paired rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURE = ("lm_window = 256, lm_eval_tokens = 1024, lm_calib_tokens = 2048, lm_prompt = 64, lm_new_tokens = 32, "
           "lm_rounds = 3, lm_peak_memory = false, threads = 1")


def _head(name: str, hf_dir: Path, trials: int) -> str:
    """The part every space here shares: the model, its text, the measurement and the sampler."""
    return f'''name = "{name}"
model = {{ source = "hf:{hf_dir}", task = "causal-lm" }}
data = {{ source = "builtin:pydoc-topics" }}
measure = {{ {MEASURE} }}

[search]
trials = {trials}
sampler = "tpe"
'''


def space_text(hf_dir: Path, trials: int) -> str:
    return _head("smollm2-search", hf_dir, trials) + '''objectives = ["decode_time_ratio", "perplexity_rise"]
retime_front = false          # step 2 re-times the front beside the hand-written recipes

[[passes]]
kind = "prune.depth"
optional = true
blocks = [2, 8]
windows = 4

[[passes]]
kind = "quantize.weight_only"
bits = 4
group_size = { choices = [32, 128] }
accuracy_level = 4

[[targets]]
kind = "onnxruntime"
'''


def draft_space_text(hf_dir: Path, trials: int) -> str:
    """``--draft``: each trial's model drafts for the FP32 original (speculative decoding on ONNX Runtime); PyTorch
    eager is the reference the ratios divide by. The hand-written draft of bench_llm_structure.py (INT4 alone, k = 3)
    is the point with the depth pass off and draft_k = 3."""
    return _head("smollm2-draft-search", hf_dir, trials) + '''draft = true
objectives = ["decode_time_ratio", "size_mb"]

[[passes]]
kind = "prune.depth"
optional = true
blocks = [4, 16]
windows = 4

[[passes]]
kind = "quantize.weight_only"
optional = true               # both passes off: the original generating plainly, the verifier's own speed
bits = 4
group_size = 32
accuracy_level = 4

[[targets]]
kind = "torch"

[[targets]]
kind = "onnxruntime"
draft_k = { choices = [3, 5] }
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", required=True, help="SmolLM2-135M as a Hugging Face folder")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600, help="stop starting trials after this many seconds")
    ap.add_argument("--out", default="runs/bench-llm-search")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--reuse", action="store_true", help="compare again from --out's files, measuring nothing")
    ap.add_argument("--draft", action="store_true", help="search drafts for speculative decoding instead "
                    "(draft_space_text); the search alone")
    a = ap.parse_args()
    from compress.apps.search import run_search
    from compress.core.registry import get_pass
    from compress.reporting.report_schema import load_report
    from compress.reporting.report_tables import generation_lines
    from compress.stages.pipeline import run
    from compress.stages.recipe import parse_pipeline, recipe_from_dict

    out = Path(a.out)
    t0 = time.perf_counter()
    if a.reuse:  # the comparison again from a finished benchmark's files (no new measurement)
        res = json.loads((out / "search" / "search.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        space = out / "space.toml"
        space.write_text((draft_space_text if a.draft else space_text)(Path(a.hf_dir).resolve(), a.trials))
        res = run_search(space, out / "search", cache_dir=a.cache, timeout_s=a.timeout, log=print)
        print(f"search: {time.perf_counter() - t0:.0f} s, {len(res['trials'])} trial(s), front {res['front']}")
    if a.draft:
        keys = ("decode_speedup", "decode_time_ratio_ci", "ttft_ratio", "size_mb", "draft_acceptance",
                "tokens_per_verifier_pass", "greedy_agreement")
        for t in res["trials"]:
            m = t["metrics"]
            print(f"trial {t['number']} {t['state']} {t['recipe']} draft_k={t['params'].get('targets[2].draft_k')}"
                  f" repeat_of={t.get('repeat_of')}: " + ", ".join(f"{k}={m.get(k)}" for k in keys))
        print((out / "search" / "front.md").read_text())
        return
    front = {f"trial{t['number']}": t for t in res["trials"] if t["number"] in res["front"]}

    wo, depth = get_pass("quantize.weight_only").config_cls, get_pass("prune.depth").config_cls
    int4 = wo(bits=4, group_size=32, accuracy_level=4)
    hand = {"hand-int4": [int4], "hand-depth8-int4": [depth(blocks=8, windows=4), int4]}
    variants = {name: list(parse_pipeline(t["recipe"])[0]) for name, t in front.items()}
    variants.update(hand)
    if a.reuse:
        report = load_report(out / "together" / "report.json")
    else:
        rec = recipe_from_dict({"name": "bench-llm-search", "data": {"source": "builtin:pydoc-topics"},
                                "model": {"source": f"hf:{Path(a.hf_dir).resolve()}", "task": "causal-lm"},
                                "measure": {k.strip(): json.loads(v.strip()) for k, v in
                                            (kv.split("=") for kv in MEASURE.split(","))},
                                "targets": [{"kind": "onnxruntime"}]}, "bench_llm_search")
        t1 = time.perf_counter()
        report = run(rec, out_dir=out / "together", cache_dir=a.cache, variants=variants, log=print)
        print(f"together: {time.perf_counter() - t1:.0f} s")
    print("\n".join(generation_lines(report)))
    compare_front(report, front, hand)
    print(f"total {time.perf_counter() - t0:.0f} s")


def compare_front(report: Any, front: dict[str, Any], hand: dict[str, Any]) -> None:
    """The same-run table, and for each hand-written recipe the front points at least as good: the same compiled
    model (equal digests: only timing noise can tell them apart), or no worse on both figures."""
    from compress.apps.search import trial_metrics

    m = {name: trial_metrics(report, name, "onnxruntime", 1) for name in [*front, *hand]}
    digest = {r.variant: (r.compiled_digest or "")[:12] for r in report.results}
    print("\n| variant | recipe | build digest | decode time ratio [95%] | decode speed-up | perplexity | rise | "
          "TTFT ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, x in m.items():
        lo, hi = x["decode_time_ratio_ci"]
        recipe = front[name]["recipe"] if name in front else " + ".join(p.kind for p in hand[name])
        print(f"| {name} | `{recipe}` | {digest[name]} | {x['decode_time_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | "
              f"{x['decode_speedup']:.2f}x | {x['perplexity']:.2f} | {x['perplexity_rise']:+.1%} | "
              f"{x['ttft_ratio']:.3f} |")
    for h in hand:
        same = [f for f in front if digest[f] == digest[h]]
        better = [f for f in front if f not in same and m[f]["decode_time_ratio"] <= m[h]["decode_time_ratio"]
                  and m[f]["perplexity_rise"] <= m[h]["perplexity_rise"]]
        print(f"{h}: the same model on the front: {', '.join(same) or 'none'}; other front points at least as good "
              f"on decode time and perplexity rise (same run): {', '.join(better) or 'none'}")


if __name__ == "__main__":
    main()
