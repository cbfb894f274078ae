"""Decoder language models as pipeline models: a causal LM from a Hugging Face directory or a GGUF file,
the text it is judged on (token windows of real text), and the figures that judge it (perplexity, KL
divergence and top-1 agreement with the original, greedy-token agreement).

A decoder is not a special pipeline: its PyTorch form is a module ``(input_ids, attention_mask) ->
logits`` like any other task head, so pruning, caching and the report treat it as they treat every
model; what differs is how it is lowered (with its KV cache, :mod:`compress.decoder_export`), run (a
generate loop, :mod:`compress.measuring.generation`) and scored (here).

``transformers`` (and ``gguf`` for GGUF files) are optional extras, imported only when used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, RecipeError

CAUSAL_LM = "causal-lm"
# Real text that ships with every Python: the standard library's help topics (~465k characters).
BUILTIN_TEXT = "builtin:pydoc-topics"


class CausalLMModel(nn.Module):
    """(input_ids, attention_mask) -> next-token logits (batch, seq, vocab) of a Hugging Face causal LM.

    ``model`` is the ``*ForCausalLM`` itself, kept whole so the decoder export can save it with its
    config and the generation runner can use its KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits  # type: ignore[no-any-return]


def is_causal_lm(module: Any) -> bool:
    return isinstance(module, CausalLMModel)


# ----------------------------------------------------------------------------------------- GGUF files


def gguf_to_dir(path: Path, cache_root: Path, say: Any = None) -> Path:
    """A Hugging Face directory (float safetensors, config, tokenizer) made from a GGUF file, once per file
    content: the GGUF's quantized weights are dequantized to float32 by ``transformers``' own loader.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its config
    without the quantization record and given the dequantized state dict."""
    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (its first bytes are not 'GGUF')")
    from ..core.artifact import sha256_file

    out = cache_root / "gguf" / sha256_file(path)
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise InputError("a GGUF model needs the gguf package: pip install 'compress-pipeline[llm]'") from e
    from .hf_lib import _transformers

    tf = _transformers()
    if say:
        say(f"gguf: dequantizing {path.name} to float32 through transformers (once per file)")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/NotImplementedError for types it lacks
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers cannot load this GGUF file ({first[:240]}); the quantization types "
                         "it dequantizes are listed in transformers' GGUF documentation") from e
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = type(model)(cfg)
    clean.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    clean.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "gguf_source.json").write_text(json.dumps({"file": str(path.resolve()), "sha256": out.name}))
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------ text


@dataclass(frozen=True)
class LMText:
    """Token windows of real text: ``calib`` for data-aware passes, ``eval`` (held out) for judging."""

    calib: np.ndarray  # (n, window) int64
    eval: np.ndarray  # (n, window) int64
    window: int
    source: str
    note: str
    tokenizer_digest: str

    @property
    def digest(self) -> str:
        """The calibration windows' content (what passes read; the held-out windows only judge): passes that
        calibrate or train on them are cached under it."""
        h = hashlib.sha256(f"{self.calib.shape}".encode())
        h.update(np.ascontiguousarray(self.calib).tobytes())
        return h.hexdigest()


def read_text(source: str, base: Path | None = None) -> tuple[str, str]:
    """(text, label) of an LM data source: ``builtin:pydoc-topics`` or ``text:FILE`` (the whole file)."""
    if source == BUILTIN_TEXT:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "Python's pydoc_data.topics"
    if source.startswith("text:"):
        p = Path(source[5:]).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        if not p.is_file():
            raise InputError(f"{p}: text file not found (data.source {source!r})")
        return p.read_text(encoding="utf-8", errors="replace"), p.name
    raise RecipeError(f"data source {source!r} cannot feed a causal LM; use {BUILTIN_TEXT} or text:FILE "
                      "(plain text, read whole and cut into token windows)")


def tokenizer_digest(tok: Any) -> str:
    """A digest of the tokenizer's vocabulary: two models share a tokenizer when these agree."""
    vocab = tok.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items()), separators=(",", ":")).encode()).hexdigest()


def lm_text(model_dir: Path, source: str, window: int, eval_tokens: int, calib_tokens: int,
            base: Path | None = None) -> LMText:
    """Cut the text into windows of ``window`` tokens: the last ``eval_tokens`` are held out for judging,
    calibration takes windows from the start, never from the held-out part."""
    from .hf_lib import load_tokenizer

    if window < 2:
        raise RecipeError(f"measure.lm_window = {window}: a perplexity window needs at least 2 tokens")
    text, label = read_text(source, base)
    tok = load_tokenizer(model_dir)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n_eval = max(1, eval_tokens // window)
    need = (n_eval + 1) * window
    if len(ids) < need:
        raise InputError(f"{label}: {len(ids)} tokens, fewer than one calibration window and "
                         f"{n_eval} evaluation window(s) of {window} tokens ({need}); give more text or a "
                         "smaller measure.lm_window")
    windows = ids[: len(ids) // window * window].reshape(-1, window)
    ev = windows[-n_eval:]
    n_cal = max(1, min(len(windows) - n_eval, calib_tokens // window))
    cal = windows[:n_cal]
    note = (f"{label}: {len(ids):,} tokens; {n_eval} held-out window(s) of {window} tokens for perplexity "
            f"(the text's last {n_eval * window:,} tokens), {n_cal} calibration window(s) from its start")
    return LMText(cal, ev, window, label, note, tokenizer_digest(tok))


# ------------------------------------------------------------------------------------------ scores


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class WindowScores:
    """Running sums over windows: negative log-likelihood, and against a reference, KL and agreement."""

    nll: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    agree: int = 0
    compared: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray, ref_logits: np.ndarray | None = None) -> None:
        """``logits`` (seq, vocab) predicting ``ids[1:]`` from ``ids[:-1]``."""
        lp = _log_softmax(logits[:-1])
        tgt = ids[1:]
        self.nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        self.tokens += len(tgt)
        if ref_logits is not None:
            rp = _log_softmax(ref_logits[:-1])
            self.kl += float((np.exp(rp) * (rp - lp)).sum())
            self.agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
            self.compared += len(tgt)

    def figures(self) -> dict[str, float]:
        out = {"perplexity": float(np.exp(self.nll / max(self.tokens, 1))), "tokens": float(self.tokens)}
        if self.compared:
            out["kl"] = self.kl / self.compared
            out["top1_agreement"] = self.agree / self.compared
        return out
