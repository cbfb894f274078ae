"""Tiny decoder language models for the tests: random weights from a transformers config, and a word-level
tokenizer over the standard library's help text, saved as a Hugging Face folder (offline, seconds)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any


def tiny_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer whose vocabulary is the most common words of pydoc_data.topics."""
    from pydoc_data.topics import topics

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for t in topics.values() for w in re.findall(r"\w+|[^\w\s]", t))
    special = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(special + [w for w, _ in words.most_common(vocab_size - len(special))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_llama(folder: Path, layers: int = 2, vocab: int = 512, seed: int = 0, kind: str = "llama",
               hidden: int = 64) -> Path:
    """A small random causal LM (Llama or Qwen2 layout, grouped-query attention) with its tokenizer."""
    import torch
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    cfg = cls[0](vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    model.save_pretrained(str(folder))
    tiny_tokenizer(vocab).save_pretrained(str(folder))
    return folder
