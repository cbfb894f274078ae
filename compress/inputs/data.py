"""Data sources and the train / calibration / validation splits.

Splits are drawn once with a fixed seed and never overlap. Samples are stored
at their natural size and adapted to the model's input shape per batch
(resized, channels repeated), so a 224x224 model can be measured on 8x8 digits
without holding the whole upsampled set in memory.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, RecipeError


@dataclass
class Split:
    x: np.ndarray  # float32, (N, C, H, W) or (N, ...)
    y: np.ndarray | None  # int64 labels, or None when unlabelled
    # The other named inputs of a multi-input model (e.g. attention_mask beside input_ids), same N.
    extra: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class DataBundle:
    name: str
    train: Split
    calib: Split
    val: Split
    labelled: bool
    digest: str
    sample_shape: tuple[int, ...]  # as stored, without batch
    input_shape: tuple[int, ...]  # as the model wants it, without batch
    note: str = ""
    # Set when the data holds one named array per model input (an .npz of input_ids, attention_mask, ...).
    input_names: tuple[str, ...] = ()

    def feeds(self, split: Split, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` of a split as named model inputs (integer arrays keep their dtype)."""
        first = split.x[start:stop]
        if not self.input_names:
            return {"input": self.adapt(first).numpy()}
        out = {self.input_names[0]: np.ascontiguousarray(first)}
        for name in self.input_names[1:]:
            out[name] = np.ascontiguousarray((split.extra or {})[name][start:stop])
        return out

    def feed_batches(self, split: Split, batch_size: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        n = len(split) if limit is None else min(limit, len(split))
        return [self.feeds(split, i, min(n, i + batch_size)) for i in range(0, n, batch_size)]

    def adapt(self, x: np.ndarray) -> torch.Tensor:
        """Bring stored samples to the model's input shape (resize, repeat channels)."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        want = self.input_shape
        if tuple(t.shape[1:]) == tuple(want):
            return t
        if t.dim() == 4 and len(want) == 3:
            if t.shape[1] != want[0]:
                if t.shape[1] == 1:
                    t = t.expand(-1, want[0], -1, -1)
                else:
                    raise InputError(f"data has {t.shape[1]} channels, the model wants {want[0]}")
            if tuple(t.shape[2:]) != tuple(want[1:]):
                t = F.interpolate(t, size=tuple(want[1:]), mode="bilinear", align_corners=False)
            return t.contiguous()
        raise InputError(f"data samples of shape {tuple(t.shape[1:])} do not fit the model input {tuple(want)}")

    def model_inputs(self, split: Split, idx: np.ndarray | slice) -> tuple[torch.Tensor, ...]:
        """Samples ``idx`` of a split as the model's positional inputs, in the model's input order.

        One stored array is adapted to the model's float input (resize, channel repeat); data with one named
        array per input (token ids, attention mask, ...) gives every input with its own dtype, so integer
        ids stay integers for the embedding."""
        if not self.input_names:
            return (self.adapt(split.x[idx]),)
        extra = split.extra or {}
        return (torch.from_numpy(np.ascontiguousarray(split.x[idx])),
                *(torch.from_numpy(np.ascontiguousarray(extra[n][idx])) for n in self.input_names[1:]))

    @property
    def n_inputs(self) -> int:
        """How many model inputs each sample holds."""
        return len(self.input_names) or 1

    def batches(self, split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray | None]]:
        for i in range(0, len(split), batch_size):
            y = None if split.y is None else split.y[i:i + batch_size]
            yield self.adapt(split.x[i:i + batch_size]), y


def _digest(x: np.ndarray, y: np.ndarray | None, split: str = "") -> str:
    # The split spec is hashed too: the same samples split differently train and calibrate
    # differently, so cached pass outputs must not be shared between the two.
    h = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    if y is not None:
        h.update(np.ascontiguousarray(y).tobytes())
    h.update(split.encode())
    return h.hexdigest()


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # 0..16 -> [-1, 1]
    return x[:, None, :, :], d.target.astype(np.int64)


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise InputError(f"{path}: .npz data file not found")
    with path.open("rb") as f:
        magic = f.read(4)
    # np.load blames pickle for anything that is not a zip or .npy (a text file, say): say what it is.
    if magic != b"PK\x03\x04":
        raise InputError(f"{path}: not an .npz archive (it starts with {magic!r}); save it with "
                         "numpy.savez(path, x=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise InputError(f"{path}: .npz must hold an array 'x' (and optionally labels 'y'); "
                                 f"found {list(z.keys())}")
            x = _numeric(path, "x", z, np.float32)
            y = _numeric(path, "y", z, np.int64) if "y" in z else None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: the .npz archive is damaged or truncated ({e})") from e
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{path}: 'x' has shape {x.shape}; expected samples along the first axis, e.g. (N, C, H, W)")
    if y is not None and y.ndim != 1:
        raise InputError(f"{path}: 'y' has shape {y.shape}; expected one integer class label per sample")
    if y is not None and len(y) != len(x):
        raise InputError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return x, y


def _check_integer_inputs(src: str, inputs: tuple[Any, ...], arrays: dict[str, np.ndarray]) -> None:
    """Inputs the model takes as integers (token ids, masks) must be integers within their range: said here naming
    the input and the rule, not as an embedding's IndexError or a dtype error from inside the model."""
    for s in inputs:
        a = arrays.get(s.name)
        if a is None or np.issubdtype(np.dtype(s.dtype), np.floating):
            continue
        rule = "integers" if s.high is None else f"integers in 0..{s.high - 1}" + (
            " (the model's vocabulary)" if s.name == "input_ids" else "")
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"data source {src!r}: input {s.name!r} holds floating-point values; it takes {rule}; "
                             f"save it as an integer array")
        if s.high is None or not a.size:
            continue
        bad = (a < 0) | (a >= s.high)
        if bad.any():
            i = int(np.argwhere(bad.reshape(len(a), -1).any(axis=1))[0][0])
            value = int(a[i][bad[i]].flat[0])
            what = "token id" if s.name == "input_ids" else "value"
            raise InputError(f"data source {src!r}: input {s.name!r} holds {what} {value} (sample {i}), outside "
                             f"{rule}")


def _npz_named(path: Path, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None] | None:
    """One array per named model input (integer arrays as int64, others float32), or None if the names are absent."""
    if not path.exists():
        raise InputError(f"{path}: .npz data file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" in z or not all(n in z for n in names):
                missing = [n for n in names if n not in z]
                if "x" not in z and missing:
                    raise InputError(f"{path}: the model's inputs are {', '.join(names)}; the .npz lacks "
                                     f"{', '.join(missing)} (found {', '.join(z.keys())})")
                return None
            arrays = {n: (z[n].astype(np.int64) if np.issubdtype(z[n].dtype, np.integer) else z[n].astype(np.float32))
                      for n in names}
            y = z["y"].astype(np.int64) if "y" in z else None
    except ValueError as e:
        raise InputError(f"{path}: cannot read .npz without pickle ({e})") from e
    lens = {n: len(a) for n, a in arrays.items()}
    if len(set(lens.values())) != 1 or (y is not None and len(y) != len(arrays[names[0]])):
        raise InputError(f"{path}: the arrays differ in sample count ({lens}{'' if y is None else f', y: {len(y)}'})")
    return arrays, y


MAX_JSON_DEPTH = 64  # a JSONL sample is a flat object; Python's JSON reader recurses per level


def _text_file(path: Path, what: str, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, read line by line; a line longer than ``max_line_bytes`` or
    bytes that are not UTF-8 are one clear line saying where."""
    if not path.is_file():
        raise InputError(f"{path}: {what} data file not found")
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    raise InputError(f"{path}: line {n} is longer than data.max_line_bytes ({max_line_bytes} "
                                     "bytes); split it into samples one per line, or raise data.max_line_bytes")
                try:
                    yield n, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}: line {n}: not UTF-8 text (byte {e.start} of the line); save it as "
                                     "UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None


def _text(path: Path, max_line_bytes: int) -> list[str]:
    """``text:FILE``: one sample per line; blank lines are skipped."""
    texts = [t.strip() for _, t in _text_file(path, "text", max_line_bytes) if t.strip()]
    if not texts:
        raise InputError(f"{path}: no text in it (empty, or only blank lines); write one sentence per line")
    return texts


def _json_depth(line: str) -> int:
    """How deep a JSON text nests (brackets inside strings not counted); cheap when it barely nests."""
    if line.count("[") + line.count("{") <= MAX_JSON_DEPTH:
        return 0
    import re

    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", line).encode()
    b = np.frombuffer(bare, dtype=np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _jsonl(path: Path, text_field: str, label_field: str | None, label_ids: Callable[[], dict[str, int]],
           max_line_bytes: int) -> tuple[list[str], np.ndarray | None]:
    """``jsonl:FILE``: one JSON object per line, text in ``text_field``, an optional label in ``label_field``
    (a class index, or a class name the model's config knows)."""
    import json

    texts: list[str] = []
    labels: list[int] = []
    names: dict[str, int] | None = None
    for n, line in _text_file(path, "JSONL", max_line_bytes):
        if not line.strip():
            continue
        if _json_depth(line) > MAX_JSON_DEPTH:
            raise InputError(f"{path}: line {n}: JSON nested deeper than {MAX_JSON_DEPTH} levels; a sample is one "
                             f"flat object like {{\"{text_field}\": \"...\"}}")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: not valid JSON ({e.msg}); JSONL holds one object per line") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}: line {n}: expected a JSON object like {{\"{text_field}\": \"...\"}}, "
                             f"got {type(rec).__name__}")
        if text_field not in rec:
            raise InputError(f"{path}: line {n}: no field {text_field!r} (fields: {', '.join(rec) or 'none'}); "
                             "set data.text_field to the one holding the text")
        if not isinstance(rec[text_field], str):
            raise InputError(f"{path}: line {n}: field {text_field!r} holds {type(rec[text_field]).__name__}, "
                             "expected a string")
        texts.append(rec[text_field])
        if label_field is None:
            continue
        if label_field not in rec:
            raise InputError(f"{path}: line {n}: no label field {label_field!r} (fields: {', '.join(rec)}); every "
                             "line needs one, or leave data.label_field unset")
        lab = rec[label_field]
        if isinstance(lab, int) and not isinstance(lab, bool):
            labels.append(lab)
        elif isinstance(lab, str):
            names = label_ids() if names is None else names
            if lab not in names:
                raise InputError(f"{path}: line {n}: label {lab!r} is not a class of the model (its config's "
                                 f"label2id: {', '.join(names) or 'none'}); use class indices or those names")
            labels.append(names[lab])
        else:
            raise InputError(f"{path}: line {n}: label {lab!r} is neither a class index nor a class name")
    if not texts:
        raise InputError(f"{path}: no samples in it (empty, or only blank lines); write one JSON object per line")
    return texts, (np.asarray(labels, dtype=np.int64) if label_field is not None else None)


def _tokenized(src: str, spec: Any, inputs: tuple[Any, ...] | None,
               model_source: str | None) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """Text or JSONL data as the model's named inputs, tokenized offline with the model's own tokenizer."""
    kind, _, rest = src.partition(":")
    if model_source is None or not model_source.startswith("hf:") or not inputs:
        raise RecipeError(f"data source {src!r}: text is tokenized with the model's tokenizer, so it needs a Hugging "
                          f"Face model directory (model.source = \"hf:DIR\"){'' if model_source is None else '; got '}"
                          f"{'' if model_source is None else repr(model_source)}; otherwise give an .npz of inputs")
    from . import hf

    model_dir = Path(model_source[3:]).expanduser()
    path = Path(rest)
    if kind == "text":
        texts, y = _text(path, spec.max_line_bytes), None
    else:
        texts, y = _jsonl(path, spec.text_field, spec.label_field, lambda: hf.label_ids(model_dir), spec.max_line_bytes)
    arrays, note = hf.tokenize(model_dir, texts, tuple(inputs))
    return arrays, y, note


def _numeric(path: Path, key: str, z: Any, dtype: type) -> np.ndarray:
    """Array ``key`` of an open .npz as ``dtype``, with a message naming the array when it is not numbers."""
    try:
        a = z[key]
    except ValueError as e:  # only object arrays need pickle inside an .npz
        raise InputError(f"{path}: array {key!r} holds Python objects, which only pickle can read (refused); "
                         "save plain numeric arrays") from e
    if a.dtype.kind not in "biuf":
        raise InputError(f"{path}: array {key!r} holds {a.dtype} values, expected numbers")
    if dtype is np.int64 and a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise InputError(f"{path}: labels {key!r} are not whole numbers; expected integer class indices")
    return a.astype(dtype)


def _folder(path: Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    if not path.is_dir():
        raise InputError(f"{path}: image folder not found")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{path}: expected one subfolder per class (e.g. {path}/cat/1.png)")
    if len(classes) == 1:
        raise InputError(f"{path}: only one class subfolder ({classes[0]!r}); a classifier needs one subfolder "
                         "per class, at least two")
    c, h, w = input_shape
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"):
                continue
            try:
                img = Image.open(f).convert("L" if c == 1 else "RGB").resize((w, h))
            except OSError as e:
                raise InputError(f"{f}: not a readable image ({e})") from e
            a = np.asarray(img, dtype=np.float32) / 255.0
            a = a[None] if c == 1 else a.transpose(2, 0, 1)
            xs.append((a - 0.5) / 0.5)
            ys.append(label)
    if not xs:
        raise InputError(f"{path}: no images found in its class subfolders")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def load_data(spec: object, input_shape: tuple[int, ...], inputs: tuple[Any, ...] | None = None,
              model_source: str | None = None) -> DataBundle | None:
    """Load the recipe's ``data`` table. ``random`` returns None: accuracy is then not measured.

    ``inputs`` (the model's input specs): a model with several named inputs reads an .npz holding one
    array per input name (and optionally ``y``). ``model_source`` (the recipe's ``model.source``): text
    and JSONL data are tokenized with a Hugging Face model directory's own tokenizer.
    """
    src: str = spec.source  # type: ignore[attr-defined]
    want = tuple(input_shape[1:])
    if src == "random":
        return None
    if spec.label_field is not None and not src.startswith("jsonl:"):  # type: ignore[attr-defined]
        raise RecipeError(f"data.label_field applies to jsonl:FILE data, not {src!r}")
    y: np.ndarray | None
    extra: dict[str, np.ndarray] = {}
    names: tuple[str, ...] = ()
    named = None
    note = ""
    if src.startswith(("text:", "jsonl:")):
        arrays, y, note = _tokenized(src, spec, inputs, model_source)
        named = arrays, y
    elif inputs and len(inputs) > 1 and (src.startswith("npz:") or src.endswith(".npz")):
        named = _npz_named(Path(src[4:] if src.startswith("npz:") else src), [s.name for s in inputs])
        if named is None:
            raise InputError(f"data source {src!r}: the model has inputs {', '.join(s.name for s in inputs)}; "
                             "give the .npz one array per input name (not 'x')")
    if named is not None:
        arrays, y = named
        _check_integer_inputs(src, inputs or (), arrays)
        names = tuple(arrays)
        x = arrays[names[0]]
        extra = {n: arrays[n] for n in names[1:]}
        want = tuple(x.shape[1:])
    elif src == "builtin:digits":
        x, y = _digits()
    elif src.startswith("npz:") or src.endswith(".npz"):
        x, y = _npz(Path(src[4:] if src.startswith("npz:") else src))
    elif src.startswith("folder:"):
        if len(want) != 3:
            raise RecipeError(f"data source {src!r}: image folders need a model input of shape (N, C, H, W)")
        x, y = _folder(Path(src[7:]), want)
    else:
        raise RecipeError(f"data source {src!r} not understood; use builtin:digits, folder:PATH, npz:PATH, "
                          "text:FILE, jsonl:FILE or random")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0][0])
        raise InputError(f"data source {src!r}: sample {bad} contains NaN or Inf")
    n = len(x)
    n_val = max(1, round(n * spec.val_fraction))  # type: ignore[attr-defined]
    n_cal = max(1, round(n * spec.calib_fraction))  # type: ignore[attr-defined]
    if n - n_val - n_cal < 1:
        raise InputError(f"data source {src!r}: {n} samples are too few to split into train, "
                         "calibration and validation")
    perm = np.random.default_rng(spec.seed).permutation(n)  # type: ignore[attr-defined]
    iv, ic, it = perm[:n_val], perm[n_val:n_val + n_cal], perm[n_val + n_cal:]
    if spec.max_val_samples:  # type: ignore[attr-defined]
        iv = iv[: spec.max_val_samples]  # type: ignore[attr-defined]

    def take(idx: np.ndarray) -> Split:
        return Split(x[idx], None if y is None else y[idx], {n: a[idx] for n, a in extra.items()} or None)

    split = (f"val={spec.val_fraction};calib={spec.calib_fraction};seed={spec.seed};"  # type: ignore[attr-defined]
             f"max_val={spec.max_val_samples};input={want}")  # type: ignore[attr-defined]
    digest = _digest(x, y, split + "".join(f";{n}={hashlib.sha256(a.tobytes()).hexdigest()}" for n, a in extra.items()))
    bundle = DataBundle(src, take(it), take(ic), take(iv), y is not None, digest,
                        tuple(x.shape[1:]), want, note=note, input_names=names)
    if bundle.sample_shape != want:
        bundle.note = f"samples {bundle.sample_shape} adapted to model input {want} (resize / channel repeat)"
        bundle.adapt(x[:1])  # fail now, not mid-run, if they cannot be adapted
    return bundle
