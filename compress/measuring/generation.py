"""Generation runners for decoder language models, and how they are timed and scored.

A runner (``LMRunner``) has two verbs: ``logits(window)`` (one forward over a window of tokens, for
perplexity and agreement) and ``generate(prompt, new)`` (greedy decoding with the KV cache kept across
steps). PyTorch eager is the reference; an ONNX decoder exported with its KV cache runs in ONNX
Runtime. With fused attention (``GroupQueryAttention``, what the exporter emits) the cache stays in place in
buffers allocated once per generation, bound as both past and present (``KVBuffers``): a step writes only its
new positions. Other graphs hand the cache from one step to the next as ONNX Runtime values (bound through
``IOBinding``, so no step copies it through numpy). Measured on SmolLM2-135M INT4 (1 thread): the in-place cache
decodes about 1.1x faster than handing the growing ``present`` tensors on, with the same tokens.

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
        self.shared_cache = shares_cache(folder / "model.onnx", self.io.layers)

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
        if self.shared_cache:
            return self._generate_in_place(prompt, new)
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

    def _generate_in_place(self, prompt: np.ndarray, new: int) -> Generated:
        """Greedy decoding with the cache in place (:class:`KVBuffers`): one binding for the whole generation;
        each step writes the next token into the bound ``input_ids`` and rebinds the mask to its new length."""
        b, p = prompt.shape
        t0 = time.perf_counter()  # the cache's allocation counts in the first token, as on the other path
        kv = KVBuffers(self, b, p + new)
        ones = np.ones((b, p + new), np.int64)  # every mask is a prefix of it: bound by pointer, never refilled
        ids, pos = np.zeros((b, 1), np.int64), np.zeros((b, 1), np.int64)
        first, step = np.empty((b, p, self.io.vocab), np.float32), np.empty((b, 1, self.io.vocab), np.float32)
        binding = self.sess.io_binding()
        kv.bind(binding)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(prompt, np.int64))
        if "position_ids" in self.inputs:
            binding.bind_cpu_input("position_ids", np.broadcast_to(np.arange(p, dtype=np.int64), (b, p)).copy())
        bind_array(binding, "attention_mask", ones, (b, p), out=False)
        bind_array(binding, "logits", first, first.shape, out=True)
        self.sess.run_with_iobinding(binding)
        nxt = first[:, -1].argmax(-1)
        toks = [nxt]
        t1 = time.perf_counter()
        bind_array(binding, "input_ids", ids, ids.shape, out=False)
        if "position_ids" in self.inputs:
            bind_array(binding, "position_ids", pos, pos.shape, out=False)
        bind_array(binding, "logits", step, step.shape, out=True)
        for i in range(1, new):
            ids[:, 0], pos[:, 0] = nxt, p + i - 1
            bind_array(binding, "attention_mask", ones, (b, p + i), out=False)
            self.sess.run_with_iobinding(binding)
            nxt = step[:, -1].argmax(-1)
            toks.append(nxt)
        t2 = time.perf_counter()
        return Generated(np.stack(toks, 1), t1 - t0, t2 - t1)

    def close(self) -> None:
        self.sess = None  # type: ignore[assignment]


def bind_array(binding: Any, name: str, a: np.ndarray, shape: tuple[int, ...], out: bool) -> None:
    """Bind ``name`` to the first prod(shape) elements of ``a`` (C-contiguous, kept alive by the caller)."""
    bind = binding.bind_output if out else binding.bind_input
    bind(name, "cpu", 0, a.dtype, list(shape), a.ctypes.data)


def shares_cache(model: Path, layers: int) -> bool:
    """Whether every layer's attention is ONNX Runtime's ``GroupQueryAttention`` (the exporter's fused
    attention), which reads its past and writes its present in one buffer when both are bound to the same
    memory (``past_present_share_buffer``). Other graphs concatenate past and new positions into a new present."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return sum(n.op_type == "GroupQueryAttention" for n in graph.node) == layers


class KVBuffers:
    """Every layer's key and value cache in one preallocated ONNX Runtime value each, of ``capacity`` positions,
    bound as both the ``past`` input and the ``present`` output: a step writes only its new positions (at the
    cached length the attention mask gives), so nothing is copied or allocated per token, and cutting the cache
    back is only a shorter mask. ``grow`` moves the cache into larger buffers when a stepper outgrows them."""

    def __init__(self, runner: OrtLMRunner, batch: int, capacity: int) -> None:
        self.r, self.batch, self.capacity = runner, batch, capacity
        io = runner.io
        self.pairs = [(io.past_key % i, io.present_key % i) for i in range(io.layers)]
        self.pairs += [(io.past_value % i, io.present_value % i) for i in range(io.layers)]
        self.arrays = {past: self._zeros(capacity) for past, _ in self.pairs}
        self._wrap()

    def _zeros(self, capacity: int) -> np.ndarray:
        return np.zeros((self.batch, self.r.io.kv_heads, capacity, self.r.io.head_dim), self.r.kv_dtype)

    def _wrap(self) -> None:
        # ortvalue_from_numpy shares the array's memory: ONNX Runtime writes into the arrays themselves.
        self.values = {k: self.r._ort.OrtValue.ortvalue_from_numpy(a) for k, a in self.arrays.items()}

    def bind(self, binding: Any) -> None:
        for past, present in self.pairs:
            binding.bind_ortvalue_input(past, self.values[past])
            binding.bind_ortvalue_output(present, self.values[past])

    def grow(self, need: int, length: int) -> None:
        """Room for ``need`` positions, keeping the first ``length``: doubling, so growth copies O(n) in all."""
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for k, a in self.arrays.items():
            bigger = self._zeros(cap)
            bigger[:, :, :length] = a[:, :, :length]
            self.arrays[k] = bigger
        self.capacity = cap
        self._wrap()
