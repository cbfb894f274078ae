"""``transformers`` and a model folder's tokenizer, imported on demand: shared by the Hugging Face sources
(``hf``) and the causal-LM wrapper (``causal_lm``), which ``hf`` itself hands causal models to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise InputError("a Hugging Face model needs transformers: pip install 'compress-pipeline[hf]'") from e
    transformers.logging.set_verbosity_error()  # load reports and progress bars would drown the run's output
    transformers.logging.disable_progress_bar()
    return transformers


def load_tokenizer(path: Path) -> Any:
    """The model directory's own tokenizer, offline (``local_files_only``; no remote code)."""
    tf = _transformers()
    if not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer in the model directory (none of {', '.join(_TOKENIZER_FILES)}); "
                         "text data is tokenized with the model's tokenizer: save it there with "
                         "tokenizer.save_pretrained(DIR), or give the data as .npz of token ids")
    try:
        return tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for a damaged tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers could not load its tokenizer ({first[:300]})") from e
