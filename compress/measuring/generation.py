"""Generation runners for decoder language models, and how they are timed and scored.

A runner (``LMRunner``) has two verbs: ``logits(window)`` (one forward over a window of tokens, for
perplexity and agreement) and ``generate(prompt, new)`` (greedy decoding with the KV cache kept across
steps). PyTorch eager is the reference; an ONNX decoder exported with its KV cache runs in ONNX
Runtime with the cache handed from one step to the next as ONNX Runtime values (bound through
``IOBinding``, so no step copies the cache through numpy).

Timing follows the rest of the product (``compress.measuring.measure``): every runner generates once per round,
in an order that changes every round, and ratios come from paired rounds with bootstrap intervals
(``compress.measuring.stats.ratio_ci``). Time to first token is the prefill of the prompt and the first token's
choice; decode tokens/s counts the tokens after it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import InputError


@dataclass
class Generated:
    tokens: np.ndarray  # (batch, new) greedy tokens
    ttft_s: float  # prompt prefill and the first token
    decode_s: float  # the remaining new - 1 tokens

    @property
    def decode_tps(self) -> float:
        """Decoded tokens per second after the first, summed over the batch."""
        n = self.tokens.shape[1] - 1
        return n * self.tokens.shape[0] / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


class LMRunner(Protocol):
    name: str

    def logits(self, ids: np.ndarray) -> np.ndarray: ...  # (seq,) -> (seq, vocab) float32

    def generate(self, prompt: np.ndarray, new: int) -> Generated: ...  # (batch, p) -> greedy

    def close(self) -> None: ...


class TorchLMRunner:
    """PyTorch eager with the model's own KV cache (``past_key_values``): the reference."""

    def __init__(self, module: torch.nn.Module, threads: int, name: str = "pytorch-eager") -> None:
        from ..inputs.causal_lm import CausalLMModel

        # The pipeline's wrapper holds the *ForCausalLM (whose own ``.model`` is the bare decoder).
        self.model = module.model if isinstance(module, CausalLMModel) else module
        self.name = name
        self.threads = threads
        import inspect

        # transformers 5.25 renamed the cache argument (``past_key_values`` still works, with a warning).
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids[None].astype(np.int64)), use_cache=False)
        return out.logits[0].float().numpy()  # type: ignore[no-any-return]

    def generate(self, prompt: np.ndarray, new: int) -> Generated:
        torch.set_num_threads(self.threads)
        ids = torch.from_numpy(prompt.astype(np.int64))
        b, p = ids.shape
        toks = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=torch.ones(b, p, dtype=torch.long), use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            toks.append(nxt)
            t1 = time.perf_counter()
            past = out.past_key_values
            for i in range(1, new):
                out = self.model(input_ids=nxt[:, None], attention_mask=torch.ones(b, p + i, dtype=torch.long),
                                 use_cache=True, **{self.cache_arg: past})
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
                toks.append(nxt)
            t2 = time.perf_counter()
        return Generated(torch.stack(toks, 1).numpy(), t1 - t0, t2 - t1)

    def close(self) -> None:
        pass


@dataclass
class DecoderIO:
    """The I/O contract of an ONNX decoder with a KV cache (``decoder.json`` beside the model)."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    eos: list[int] = field(default_factory=list)
    context: int = 0

    @classmethod
    def load(cls, folder: Path) -> DecoderIO:
        p = folder / "decoder.json"
        if not p.is_file():
            raise InputError(f"{folder}: no decoder.json; is this an ONNX decoder exported with its KV cache "
                             "(export.onnx of a causal-lm model)?")
        return cls(**json.loads(p.read_text()))


class OrtLMRunner:
    """An ONNX decoder with its KV cache in ONNX Runtime; the cache stays in ONNX Runtime values."""

    def __init__(self, folder: Path, threads: int, name: str = "onnx-runtime") -> None:
        import onnxruntime as ort

        self.name = name
        self.io = DecoderIO.load(folder)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # Sessions are timed side by side: spinning threads would steal the CPU from the next one.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        kinds = {i.name: i.type for i in self.sess.get_inputs()}
        self.kv_dtype = np.float16 if "float16" in kinds.get(self.io.past_key % 0, "") else np.float32
        self.inputs = set(kinds)
        self._ort = ort

    def _past(self, b: int) -> dict[str, np.ndarray]:
        z = np.zeros((b, self.io.kv_heads, 0, self.io.head_dim), self.kv_dtype)
        out = {}
        for i in range(self.io.layers):
            out[self.io.past_key % i] = z
            out[self.io.past_value % i] = z
        return out

    def _feeds(self, ids: np.ndarray, total: int, past: dict[str, Any]) -> dict[str, Any]:
        b, s = ids.shape
        f: dict[str, Any] = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, total), np.int64)}
        if "position_ids" in self.inputs:
            f["position_ids"] = np.broadcast_to(np.arange(total - s, total, dtype=np.int64), (b, s)).copy()
        f.update(past)
        return f

    def logits(self, ids: np.ndarray) -> np.ndarray:
        out = self.sess.run(["logits"], self._feeds(ids[None], len(ids), self._past(1)))
        return np.asarray(out[0][0], dtype=np.float32)

    def generate(self, prompt: np.ndarray, new: int) -> Generated:
        b, p = prompt.shape
        names = [o.name for o in self.sess.get_outputs()]
        presents = {n: n.replace("present", "past_key_values") for n in names if n.startswith("present")}
        binding = self.sess.io_binding()
        t0 = time.perf_counter()
        feeds = self._feeds(prompt, p, self._past(b))
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for n in names:
            binding.bind_output(n, "cpu")
        self.sess.run_with_iobinding(binding)
        outs = dict(zip(names, binding.get_outputs(), strict=True))
        nxt = outs["logits"].numpy()[:, -1].argmax(-1)
        toks = [nxt]
        t1 = time.perf_counter()
        for i in range(1, new):
            binding = self.sess.io_binding()
            total = p + i
            binding.bind_cpu_input("input_ids", nxt[:, None].astype(np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((b, total), np.int64))
            if "position_ids" in self.inputs:
                binding.bind_cpu_input("position_ids", np.full((b, 1), total - 1, np.int64))
            for out_name, in_name in presents.items():
                binding.bind_ortvalue_input(in_name, outs[out_name])
            for n in names:
                binding.bind_output(n, "cpu")
            self.sess.run_with_iobinding(binding)
            outs = dict(zip(names, binding.get_outputs(), strict=True))
            nxt = outs["logits"].numpy()[:, -1].argmax(-1)
            toks.append(nxt)
        t2 = time.perf_counter()
        return Generated(np.stack(toks, 1), t1 - t0, t2 - t1)

    def close(self) -> None:
        self.sess = None  # type: ignore[assignment]
