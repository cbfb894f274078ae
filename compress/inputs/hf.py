"""Hugging Face models as pipeline modules: a model directory (config + safetensors) loaded offline.

``transformers`` is an optional extra (``pip install 'compress-pipeline[hf]'``), imported only here.
The task head is the user's choice; each task wraps the model in a module with explicit tensor
arguments and one tensor output, which is what export, pruning and every target expect:

- ``embedding``: text encoder, mask-aware mean of the last hidden states (a sentence embedding)
- ``hidden-states``: text encoder, the last hidden states (batch, seq, hidden)
- ``sequence-classification``: text classifier logits
- ``image-classification``: image classifier logits
- ``image-features``: vision backbone, pooled features (batch, channels)
- ``causal-lm``: decoder language model, next-token logits (batch, seq, vocab); exported with its KV
  cache and judged by generation and perplexity (``compress.inputs.causal_lm``)

Weights are read from ``.safetensors`` only (no pickle), with ``local_files_only`` (no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.artifact import InputSpec
from ..errors import InputError, RecipeError
from .hf_lib import _transformers, load_tokenizer

TEXT_TASKS = ("embedding", "hidden-states", "sequence-classification", "causal-lm")
VISION_TASKS = ("image-classification", "image-features")
TASKS = TEXT_TASKS + VISION_TASKS


def _first(out: Any, *names: str) -> torch.Tensor:
    for n in names:
        v = getattr(out, n, None)
        if isinstance(v, torch.Tensor):
            return v
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[no-any-return]


class TextModel(nn.Module):
    """(input_ids, attention_mask) -> one tensor, per ``task``."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.task == "sequence-classification":
            return _first(out, "logits")
        h = _first(out, "last_hidden_state")
        if self.task == "hidden-states":
            return h
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class VisionModel(nn.Module):
    """pixel_values -> logits or pooled features."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.task == "image-classification":
            return _first(out, "logits")
        pooled = getattr(out, "pooler_output", None)
        if isinstance(pooled, torch.Tensor):
            return pooled.flatten(1)
        h = _first(out, "last_hidden_state")
        return h.mean(1) if h.dim() == 3 else h.mean(dim=(2, 3))


def task_output_kind(task: str) -> str:
    """What a task's output is, for fidelity (compress.quality.fidelity): class logits or an embedding."""
    return "logits" if task.endswith("classification") or task == "causal-lm" else "embedding"


def _auto_class(tf: Any, task: str) -> Any:
    return {"sequence-classification": tf.AutoModelForSequenceClassification,
            "image-classification": tf.AutoModelForImageClassification,
            "causal-lm": tf.AutoModelForCausalLM}.get(task, tf.AutoModel)


def check_task(task: str | None, where: str) -> str:
    if task is None:
        raise RecipeError(f"{where}: a Hugging Face model needs model.task, one of {', '.join(TASKS)}")
    if task not in TASKS:
        raise RecipeError(f"{where}: task {task!r} not understood; use one of {', '.join(TASKS)}")
    return task


def from_config(config: Any, task: str, seed: int = 0) -> nn.Module:
    """A wrapped model with random weights built from a ``transformers`` config (tests, the benchmark)."""
    tf = _transformers()
    torch.manual_seed(seed)
    cls = _auto_class(tf, task)
    # Eager attention: the exported graph then holds plain MatMul/Softmax that every target runs.
    config._attn_implementation = "eager"
    _name_architecture(cls, config)
    model = cls.from_config(config, attn_implementation="eager")
    return wrap(model.eval(), task)


def _name_architecture(auto_cls: Any, config: Any) -> None:
    """Name the task's first class in a fresh config whose task maps to several (LeViT: with and without its
    distillation head): transformers' auto class then picks by ``config.architectures``, which is None here."""
    if getattr(config, "architectures", None):
        return
    try:
        found = auto_cls._model_mapping[type(config)]
    except (KeyError, AttributeError):  # an unknown config: transformers names it in its own error
        return
    if isinstance(found, (tuple, list)) and found:
        config.architectures = [found[0].__name__]


def wrap(model: nn.Module, task: str) -> nn.Module:
    if task == "causal-lm":
        from .causal_lm import CausalLMModel

        return CausalLMModel(model).eval()
    return (TextModel(model, task) if task in TEXT_TASKS else VisionModel(model, task)).eval()


def load_dir(path: Path, task: str) -> nn.Module:
    """Load a model directory offline: config.json + *.safetensors (pickled weights are refused)."""
    tf = _transformers()
    if not (path / "config.json").exists():
        raise InputError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"{path}: no .safetensors weights; pickled weights (pytorch_model.bin) are not loaded "
                         "for safety; convert them with safetensors first")
    cls = _auto_class(tf, task)
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                    attn_implementation="eager")
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for a bad directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers could not load it as {task} ({first[:300]})") from e
    return wrap(model.eval(), task)


def input_specs(config: Any, task: str, shape: tuple[int, ...] | None) -> tuple[InputSpec, ...]:
    """Named inputs for a task: token ids within the vocabulary and a 0/1 mask, or pixel values."""
    if task in TEXT_TASKS:
        seq = int(shape[1]) if shape and len(shape) >= 2 else 128
        batch = int(shape[0]) if shape else 1
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise InputError(f"{type(config).__name__} has no vocab_size; is it a text model? (task {task!r})")
        dyn = ((1, "seq"),)
        return (InputSpec("input_ids", (batch, seq), "int64", high=vocab, dynamic_axes=dyn),
                InputSpec("attention_mask", (batch, seq), "int64", high=2, dynamic_axes=dyn))
    if shape and len(shape) == 4:
        return (InputSpec("pixel_values", tuple(int(s) for s in shape)),)
    size = getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    ch = int(getattr(config, "num_channels", 3))
    return (InputSpec("pixel_values", (1, ch, int(size), int(size))),)


# Files one of which a saved tokenizer always has (fast tokenizer, WordPiece, BPE, SentencePiece).
def _head(tok: Any, text: str, seq: int) -> str:
    """The start of ``text`` that gives the same first ``seq`` tokens as the whole of it: tokenizers split into
    words at whitespace first, so a prefix cut at a space that already gives more than ``seq`` tokens begins as
    the whole text does. Tried at growing lengths; a tokenizer given truncation still tokenizes the whole text
    before cutting it (a 6.4 MB line: 52 s and 1.7 GB), a prefix costs what the sequence length does."""
    n = max(1024, 64 * seq)
    while n < len(text):
        cut = text.rfind(" ", 0, n)
        head = text[:cut] if cut > 0 else text[:n]
        if len(tok(head, truncation=True, max_length=seq + 1)["input_ids"]) > seq:
            return head
        n *= 4
    return text


def tokenize(path: Path, texts: list[str], inputs: tuple[InputSpec, ...]) -> tuple[dict[str, np.ndarray], str]:
    """Texts as the model's named inputs at its sequence length (padded, truncated), and a note saying so.

    Every input the model takes must come out of the tokenizer (``input_ids``, ``attention_mask``, ...),
    and every token id must lie in the model's vocabulary: a tokenizer that is not the model's own fails
    here, in one line, instead of as an index error inside the embedding."""
    tok = load_tokenizer(path)
    seq = int(inputs[0].shape[1]) if len(inputs[0].shape) >= 2 else 128
    try:
        texts = [_head(tok, t, seq) for t in texts]
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        # Which texts were cut: tokenized to one token more than kept, never whole (a long line costs no more).
        longer = tok(texts, truncation=True, max_length=seq + 1)["input_ids"]
    except (ValueError, TypeError) as e:  # e.g. a tokenizer without a padding token
        raise InputError(f"{path}: its tokenizer cannot pad/truncate to {seq} tokens "
                         f"({str(e).splitlines()[0][:200]})") from e
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in enc:
            raise InputError(f"{path}: the model takes {spec.name!r} but its tokenizer gives only "
                             f"{', '.join(enc.keys())}")
        a = np.asarray(enc[spec.name]).astype(spec.dtype)
        if spec.high is not None and len(a) and (int(a.max()) >= spec.high or int(a.min()) < 0):
            raise InputError(f"{path}: the tokenizer gives {spec.name} values up to {int(a.max())}, outside the "
                             f"model's range 0..{spec.high - 1}; is it the model's own tokenizer?")
        out[spec.name] = a
    cut = sum(len(ids) > seq for ids in longer)
    note = (f"{len(texts)} texts tokenized with the model's tokenizer to {seq} tokens"
            + (f" ({cut} truncated)" if cut else ""))
    return out, note


def label_ids(path: Path) -> dict[str, int]:
    """Class names the model's config knows (``label2id``), for text labels in JSONL data."""
    cfg = read_config(path)
    names = {str(k): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
    # Configs written with id2label alone (label2id left empty) name their classes there.
    return names or {str(v): int(k) for k, v in (getattr(cfg, "id2label", None) or {}).items()}


def read_config(path: Path) -> Any:
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a missing or malformed config.json
        raise InputError(f"{path}: cannot read its config.json ({str(e).splitlines()[0][:200]})") from e
