"""Speculative decoding: a small draft model proposes ``k`` tokens greedily, the verifier checks them all in one
forward pass with its KV cache, and the output is the verifier's own greedy output; only the speed changes.

Each round: the verifier is fed the last emitted token and the ``k`` proposals at once (``k + 1`` positions);
proposal ``i`` is accepted while it equals the verifier's argmax after the tokens before it, and the
verifier's argmax after the last accepted token is emitted too (the correction, or one token more when every
proposal was accepted). Both caches are then cut back to the accepted context: PyTorch's ``DynamicCache``
with ``crop``; an ONNX decoder with fused attention by a shorter cached length (its cache stays in place), any
other ONNX decoder's ``present`` tensors by slicing the past axis (axis 2).

Timing: the time to the first token holds both prefills (verifier and draft), the decode time everything after.

Greedy output is identical to the verifier's greedy decoding up to floating point: the verifier scores
``k + 1`` positions in one pass instead of one at a time, so a next-token choice between two logits equal to
the last bits could differ. The tests compare token for token with the verifier's plain loop.

Draft length: at most ``k`` proposals per round; with ``threshold`` set, the draft also stops after a proposal
whose softmax probability (the draft's own confidence) is below it, as Kangaroo (Liu et al., 2024) and other
dynamic-draft-length methods do: a proposal the draft itself doubts is likely rejected, and every draft step after
a rejection is wasted. The verifier still checks every proposal, so the output does not depend on the threshold.

Draft and verifier must share the tokenizer (``DecoderFacts.tokenizer_digest``): a draft with another
vocabulary proposes ids that mean other words, refused in one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import InputError
from .cell import Live
from .generation import Generated, KVBuffers, OrtLMRunner, TorchLMRunner, bind_array


class Stepper(Protocol):
    """A decoder with its KV cache, fed tokens in chunks: ``length`` tokens are in its cache."""

    length: int

    def reset(self, prompt: np.ndarray) -> np.ndarray: ...  # (p,) -> logits (p, vocab); cache holds p tokens

    def feed(self, toks: np.ndarray) -> np.ndarray: ...  # (n,) -> logits (n, vocab); cache grows by n

    def crop(self, length: int) -> None: ...  # keep the first ``length`` cached tokens


class TorchStepper:
    """PyTorch with the model's ``DynamicCache`` (cut back with ``crop``)."""

    def __init__(self, runner: TorchLMRunner) -> None:
        self.model, self.arg, self.threads = runner.model, runner.cache_arg, runner.threads
        self.past: Any = None
        self.length = 0

    def _run(self, toks: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(toks, np.int64)[None])
        mask = torch.ones(1, self.length + ids.shape[1], dtype=torch.long)
        with torch.inference_mode():
            kw = {self.arg: self.past} if self.past is not None else {}
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        self.past = out.past_key_values
        self.length += ids.shape[1]
        return out.logits[0].float().numpy()  # type: ignore[no-any-return]

    def reset(self, prompt: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        self.past, self.length = None, 0
        return self._run(prompt)

    def feed(self, toks: np.ndarray) -> np.ndarray:
        return self._run(toks)

    def crop(self, length: int) -> None:
        if length < self.length:
            self.past.crop(length - self.length)  # negative: tokens to remove (every transformers version)
            self.length = length


class OrtStepper:
    """An ONNX decoder in ONNX Runtime. A graph with fused attention keeps its cache in place (``KVBuffers``:
    cutting back is only a shorter length); any other graph's cache is its ``present`` outputs, sliced along the
    past axis to cut."""

    def __init__(self, runner: OrtLMRunner) -> None:
        self.r = runner
        self.names = [o.name for o in runner.sess.get_outputs()]
        self.presents = {n: n.replace("present", "past_key_values") for n in self.names if n.startswith("present")}
        self.past: dict[str, Any] = {}
        self.kv: KVBuffers | None = None
        self.length = 0

    def _run(self, toks: np.ndarray) -> np.ndarray:
        r = self.r
        ids = np.asarray(toks, np.int64)[None]
        total = self.length + ids.shape[1]
        b = r.sess.io_binding()
        for k, v in r._feeds(ids, total, {}).items():
            b.bind_cpu_input(k, v)
        if self.kv is not None:
            self.kv.grow(total, self.length)
            self.kv.bind(b)
            logits = np.empty((1, ids.shape[1], r.io.vocab), np.float32)
            bind_array(b, "logits", logits, logits.shape, out=True)
            r.sess.run_with_iobinding(b)
            self.length = total
            return logits[0]
        for name, value in self.past.items():
            if isinstance(value, np.ndarray):
                b.bind_cpu_input(name, value)
            else:
                b.bind_ortvalue_input(name, value)
        for n in self.names:
            b.bind_output(n, "cpu")
        r.sess.run_with_iobinding(b)
        outs = dict(zip(self.names, b.get_outputs(), strict=True))
        self.past = {inp: outs[out] for out, inp in self.presents.items()}
        self.length = total
        return np.asarray(outs["logits"].numpy()[0], dtype=np.float32)

    def reset(self, prompt: np.ndarray) -> np.ndarray:
        self.length = 0
        if self.r.shared_cache:  # the buffers outlive a generation: positions past the length are never read
            self.kv = self.kv or KVBuffers(self.r, 1, len(prompt) + 256)
        else:
            self.past = self.r._past(1)
        return self._run(prompt)

    def feed(self, toks: np.ndarray) -> np.ndarray:
        return self._run(toks)

    def crop(self, length: int) -> None:
        if length >= self.length:
            return
        if self.kv is None:
            # The present tensors are (batch, kv_heads, length, head_dim): keep the first ``length`` positions.
            self.past = {k: np.ascontiguousarray(v.numpy()[:, :, :length]) for k, v in self.past.items()}
        self.length = length


def stepper(runner: Any) -> Stepper:
    if isinstance(runner, TorchLMRunner):
        return TorchStepper(runner)
    if isinstance(runner, OrtLMRunner):
        return OrtStepper(runner)
    if hasattr(runner, "stepper"):  # a target's own runner that brings its stepper (OpenVINO's)
        return runner.stepper()  # type: ignore[no-any-return]
    raise InputError(f"speculative decoding: runner {getattr(runner, 'name', type(runner).__name__)!r} has no "
                     "stepping interface (PyTorch, ONNX Runtime and OpenVINO decoders have one)")


def check_same_tokenizer(draft_digest: str | None, verifier_digest: str | None, draft: str, verifier: str) -> None:
    """Refuse a draft whose tokenizer is not the verifier's (one line)."""
    if draft_digest and verifier_digest and draft_digest != verifier_digest:
        raise InputError(f"speculative decoding: the draft {draft!r} has another tokenizer than the verifier "
                         f"{verifier!r} (vocabulary digest {draft_digest[:12]} vs {verifier_digest[:12]}); the draft "
                         "must be a compressed copy of the same model family with the same tokenizer")
    if not draft_digest or not verifier_digest:
        missing = draft if not draft_digest else verifier
        raise InputError(f"speculative decoding: {missing!r} records no tokenizer digest (DecoderFacts); export it "
                         "with export.onnx of a causal-lm model so draft and verifier can be checked to match")


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    verifier_calls: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")


class SpeculativeRunner:
    """An ``LMRunner`` whose ``generate`` is speculative (batch 1); ``logits`` are the verifier's own."""

    def __init__(self, verifier: Any, draft: Any, k: int = 4, name: str | None = None,
                 threshold: float | None = None) -> None:
        if k < 1:
            raise InputError(f"speculative decoding: k = {k}; the draft must propose at least 1 token per round")
        check_threshold(threshold)
        self.verifier, self.draft, self.k, self.threshold = verifier, draft, k, threshold
        self.name = name or f"{verifier.name}+draft"
        self.v, self.d = stepper(verifier), stepper(draft)
        self.stats = SpecStats()
        self.last = SpecStats()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.verifier.logits(ids)  # type: ignore[no-any-return]

    def generate(self, prompt: np.ndarray, new: int) -> Generated:
        if prompt.shape[0] != 1:
            raise InputError(f"speculative decoding runs at batch 1 (got a batch of {prompt.shape[0]})")
        p = prompt[0]
        st = SpecStats()
        t0 = time.perf_counter()
        last = int(self.v.reset(p)[-1].argmax())
        out = [last]
        # The draft's prefill is prompt processing too: it counts in the time to the first token, as the
        # verifier's does (it costs a fraction of the verifier's; decode tokens/s is what speculation changes).
        self.d.reset(p)
        t1 = time.perf_counter()
        # Invariant: both caches hold the prompt and out[:-1]; ``last`` = out[-1] is in neither yet.
        pending: list[int] = []  # accepted tokens the draft has not been fed (before ``last``)
        while len(out) < new:
            k = min(self.k, new - len(out))
            x = np.asarray([*pending, last], np.int64)
            props = self._draft(x, k)
            k = len(props)
            base = self.v.length
            vlog = self.v.feed(np.asarray([last, *props], np.int64))  # k + 1 positions in one pass
            choice = vlog.argmax(-1)
            m = 0
            while m < k and int(choice[m]) == props[m]:
                m += 1
            bonus = int(choice[m])
            st.proposed += k
            st.accepted += m
            st.verifier_calls += 1
            out += [*props[:m], bonus]
            # Keep the context, ``last`` and the accepted proposals; the bonus is the new ``last``.
            keep = base + 1 + m
            self.v.crop(keep)
            self.d.crop(min(self.d.length, keep))
            # The draft was fed ``last`` and all but its final proposal: when every proposal was accepted, that
            # final one is missing from its cache and is fed first next round.
            seq, missing = [last, *props[:m]], keep - self.d.length
            pending = seq[len(seq) - missing:] if missing > 0 else []
            last = bonus
        t2 = time.perf_counter()
        self.last = st
        self.stats.proposed += st.proposed
        self.stats.accepted += st.accepted
        self.stats.verifier_calls += st.verifier_calls
        return Generated(np.asarray([out[:new]], np.int64), t1 - t0, t2 - t1)

    def _draft(self, x: np.ndarray, k: int) -> list[int]:
        """Up to ``k`` greedy proposals, fed ``x`` first; stops early after one below the confidence threshold."""
        props: list[int] = []
        for _ in range(k):
            row = self.d.feed(x)[-1]
            nxt = int(row.argmax())
            props.append(nxt)
            # The top token's softmax probability: 1 / sum(exp(logit - max)).
            if self.threshold and float(np.exp(row - row[nxt]).sum()) * self.threshold > 1.0:
                break
            x = np.asarray([nxt], np.int64)
        return props

    def close(self) -> None:
        self.verifier.close()
        self.draft.close()


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise InputError(f"speculative decoding: draft threshold = {threshold}; it is the draft's top-token "
                         "probability below which it stops proposing, a number in [0, 1) (0: always k tokens)")


def from_artifacts(verifier: Any, draft: Any, k: int = 4, threads: int = 1, threshold: float | None = None,
                   draft_threads: int | None = None) -> SpeculativeRunner:
    """A speculative runner over two ONNX decoders (``compress.core.artifact.Artifact`` exported with their KV cache,
    e.g. a run's baseline and a pruned, INT4 variant): refused in one line unless they share the tokenizer."""
    facts = [a.known_facts().decoder for a in (verifier, draft)]
    for a, f in zip((verifier, draft), facts, strict=True):
        if f is None:
            raise InputError(f"speculative decoding: {a.path} is not an ONNX decoder with its KV cache (export.onnx "
                             "of a causal-lm model)")
    check_same_tokenizer(facts[1].tokenizer_digest, facts[0].tokenizer_digest, str(draft.path), str(verifier.path))
    if facts[0].vocab != facts[1].vocab:
        raise InputError(f"speculative decoding: the draft's vocabulary has {facts[1].vocab} entries, the verifier's "
                         f"{facts[0].vocab}; they must be the same")
    return SpeculativeRunner(OrtLMRunner(verifier.path, threads, "verifier"),
                             OrtLMRunner(draft.path, draft_threads or threads, "draft"), k=k, name="speculative",
                             threshold=threshold)


def attach_draft(target: Any, cells: list[Any], rt: Live, variants: list[Any], threads: int) -> None:
    """A target setting ``draft = "VARIANT"``: every other variant's cell on ``target`` generates speculatively
    with that variant's build on the same target as its draft (the draft's own cell runs plain). A draft
    with another tokenizer is refused on each cell in one line."""
    spec = target.config.speculative_draft()
    if spec is None:
        return
    name, k = spec.variant, spec.k
    by_variant = {c.variant: c for c in cells if c.target == target.name}
    arts = {v.name: v.onnx_art for v in variants}
    d_cell = by_variant.get(name)
    for v_name, cell in by_variant.items():
        if v_name == name or cell.status != "ok":
            continue
        if d_cell is None or d_cell.status != "ok" or d_cell.compiled is None:
            why = d_cell.reason if d_cell is not None else "no such variant in this run"
            cell.status, cell.reason = "failed", f"refused: draft {name!r} is not available ({why})"
            continue
        try:
            facts = [arts[n].known_facts().decoder if arts.get(n) is not None else None for n in (v_name, name)]
            check_same_tokenizer(facts[1].tokenizer_digest if facts[1] else None,
                                 facts[0].tokenizer_digest if facts[0] else None, name, v_name)
        except InputError as e:
            cell.status, cell.reason = "failed", f"refused: {e}"
            continue
        runner = rt.runners[cell.ref] = SpeculativeRunner(rt[cell], target.lm_runner(d_cell.compiled, threads),
                                                          k=k, name=f"{target.name}+{name}", threshold=spec.threshold)
        stop = f", fewer once its top token's probability is below {runner.threshold}" if runner.threshold else ""
        cell.notes.append(f"generated by speculative decoding: variant {name!r} drafts {runner.k} token(s){stop} "
                          "per pass of this model; the output is this model's greedy output up to its kernels' "
                          "rounding on several tokens at once (greedy agreement shows any divergence)")


def speculative_figures(runner: Any) -> dict[str, Any]:
    """The acceptance figures of a speculative runner (over every generation of the cell), else nothing."""
    if not isinstance(runner, SpeculativeRunner) or not runner.stats.verifier_calls:
        return {}
    st = runner.stats
    return {"draft_acceptance": st.accepted / st.proposed if st.proposed else None,
            "tokens_per_verifier_pass": (st.accepted + st.verifier_calls) / st.verifier_calls}
