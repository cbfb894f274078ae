"""``compress generate``: greedy text from a prompt with a causal language model, with its KV cache.

MODEL is a model source (``hf:DIR``, a ``.gguf`` file: run on PyTorch eager) or a folder holding an ONNX
decoder exported by a run (``decoder.json`` beside ``model.onnx``: run on ONNX Runtime, or on OpenVINO with
``--target openvino``), e.g. a run's compiled model under ``.compress-cache/objects/<digest>`` or a bundle.
The text goes to stdout; time to first token and decode speed to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError, RecipeError


def add_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt with a causal language model (greedy, KV "
                       "cache): hf:DIR, a .gguf file or an exported ONNX decoder folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", metavar="MODEL", help="hf:DIR, FILE.gguf, or a folder with decoder.json and model.onnx")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--tokens", type=int, default=64, help="new tokens to generate at most (default 64)")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    g.add_argument("--cache", help="cache folder (GGUF files are dequantized into it once)")
    g.add_argument("--target", metavar="KIND",
                   help="run an exported ONNX decoder on this target (one that generates from a decoder folder, "
                        "e.g. openvino); default: ONNX Runtime")


def _decoder_runner(folder: Path, threads: int, target: str | None) -> Any:
    from ..measuring.generation import OrtLMRunner

    if target is None:
        return OrtLMRunner(folder, threads)
    from ..core.registry import get_target_config, make_target, targets

    able = sorted(k for k, (_, cls) in targets().items() if hasattr(cls, "lm_runner_for_folder"))
    if target not in able:
        raise InputError(f"--target {target}: cannot generate from an exported decoder folder (targets that can: "
                         f"{', '.join(able) or 'none'}; without --target it runs on ONNX Runtime)")
    t = make_target(get_target_config(target)())
    why = t.unavailable_reason()
    if why:
        raise InputError(f"--target {target}: unavailable: {why}")
    return t.lm_runner_for_folder(folder, threads)  # type: ignore[attr-defined]


def _runner(model: str, threads: int, cache: str | None,
            target: str | None = None) -> tuple[Any, Path, list[int], int]:
    from ..measuring.generation import DecoderIO

    folder = Path(model)
    if folder.is_dir() and (folder / "decoder.json").is_file():
        io = DecoderIO.load(folder)
        return _decoder_runner(folder, threads, target), folder, io.eos, io.context
    if target is not None:
        raise InputError(f"--target {target} runs an exported ONNX decoder folder; {model} runs on PyTorch eager")
    from ..core.cache import Cache
    from ..inputs.causal_lm import CAUSAL_LM, is_causal_lm
    from ..inputs.models import hf_dir, load_model
    from ..inputs.torch_io import load_torch
    from ..measuring.generation import TorchLMRunner
    from ..stages.recipe import ModelSpec

    if folder.is_dir() and not model.startswith("hf:"):
        raise InputError(f"{folder}: no decoder.json; give hf:{folder} for a Hugging Face folder, or the folder of "
                         "an ONNX decoder a run exported")
    root = load_model(ModelSpec(source=model, task=CAUSAL_LM if not model.endswith(".gguf") else None),
                      Cache(Path(cache) if cache else None))
    module = load_torch(root)
    if not is_causal_lm(module):
        raise InputError(f"{model}: not a causal language model")
    d = hf_dir(root)
    assert d is not None
    cfg: Any = module.model.config  # type: ignore[union-attr]
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    return TorchLMRunner(module, threads), d, [e for e in eos if e is not None], int(
        getattr(cfg, "max_position_embeddings", 0) or 0)


def run(a: argparse.Namespace) -> int:
    import numpy as np

    from ..inputs.hf import load_tokenizer

    if a.tokens < 1:
        raise RecipeError(f"--tokens {a.tokens}: generate at least 1 token")
    runner, folder, eos, context = _runner(a.model, a.threads, a.cache, a.target)
    tok = load_tokenizer(folder)
    ids = np.asarray([tok(a.prompt)["input_ids"]], dtype=np.int64)
    if context and ids.shape[1] + a.tokens > context:
        raise InputError(f"the prompt is {ids.shape[1]} tokens; with --tokens {a.tokens} it exceeds the model's "
                         f"context of {context} tokens")
    out = runner.generate(ids, a.tokens)
    toks = out.tokens[0].tolist()
    cut = next((i for i, t in enumerate(toks) if t in set(eos)), len(toks))
    print(tok.decode(toks[:cut], skip_special_tokens=True))
    print(f"{runner.name}: prompt {ids.shape[1]} tokens, time to first token {out.ttft_s * 1e3:.1f} ms, "
          f"{out.decode_tps:.1f} tokens/s decoding ({len(toks)} generated)", file=sys.stderr)
    runner.close()
    return 0
