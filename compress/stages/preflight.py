"""Checks a run makes before any expensive work, so a careless input fails in a second, not after
minutes of measuring: the output folder is writable, the labels fit the model's classes, and a
target's settings are accepted by its library.

Each failure is a typed usage error (exit 2) naming the file, key or value and what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, RecipeError


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written, without creating it.

    The nearest existing ancestor is probed with a temporary file (removed at once), because
    ``os.access`` says yes to root on a read-only bind mount in some containers.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a folder; choose another output folder")
    probe_dir = out
    while not probe_dir.exists():
        parent = probe_dir.parent
        if parent == probe_dir:
            break
        probe_dir = parent
    if not probe_dir.is_dir():
        raise InputError(f"{flag} {out}: {probe_dir} is a file, so the folder cannot be created there; "
                         "choose another output folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".compress-write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{flag} {out}: cannot write in {probe_dir} ({e.strerror or e}); "
                         "choose a writable output folder") from None


def model_classes(root: Any, data: Any) -> int | None:
    """The number of classes the model outputs (the last dim of 2-D logits), found with one forward
    pass on one data sample; None when the output is not (batch, classes) or cannot be known cheaply."""
    if data is not None and len(data.val) == 0:
        return None
    if root.kind == "pytorch":
        import torch

        from ..inputs.torch_io import load_torch, sample_inputs

        model = load_torch(root)
        # One sample of the data (or of the declared input shape): a shape the model cannot take
        # fails here, in a second, rather than in the exporter or mid-measurement.
        if data is not None and bool(getattr(data, "input_names", None)):  # one named array per input
            xs = tuple(torch.from_numpy(a) for a in data.feeds(data.val, 0, 1).values())
        elif data is not None:
            xs = (data.adapt(data.val.x[:1]),)
        else:  # every declared input (token ids within the vocabulary, masks), not just the first
            xs = sample_inputs(root.inputs, batch=1)
        x = xs[0]
        what = f"data {data.name!r}: the model fails on a sample adapted to" if data is not None else \
            "model: it fails on an input of the given"
        try:
            with torch.inference_mode():
                out = model(*xs)
        except Exception as e:  # a model that cannot run on its input is a usage error, named here
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{what} shape {tuple(x.shape)}: {type(e).__name__}: {first[:200]}; check "
                             "model.input_shape (--input-shape)") from None
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        shape = tuple(getattr(out, "shape", ()))
    elif root.kind == "onnx":
        import onnx

        m = onnx.load(str(root.path / "model.onnx"), load_external_data=False)
        if not m.graph.output:
            return None
        dims = m.graph.output[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    else:
        return None
    if len(shape) != 2 or shape[1] < 2:  # one output column is a score, not classes: nothing to check
        return None
    return int(shape[1])


def check_labels(data: Any, n_classes: int | None) -> None:
    """Labels must be class indices the model can output, and there must be more than one class."""
    if data is None or not data.labelled:
        return
    ys = [s.y for s in (data.train, data.calib, data.val) if s.y is not None and len(s.y)]
    if not ys:
        return
    y = np.concatenate(ys)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise InputError(f"data {data.name!r}: label {lo} is negative; labels must be class indices 0..N-1")
    if n_classes is not None and hi >= n_classes:
        n_bad = int((y >= n_classes).sum())
        raise InputError(f"data {data.name!r}: label {hi} is outside the model's {n_classes} classes "
                         f"(0..{n_classes - 1}; {n_bad} of {len(y)} samples); relabel the data or set "
                         "model.num_classes")
    if lo == hi:
        raise InputError(f"data {data.name!r}: every sample has label {lo} (one class); accuracy on one class "
                         "says nothing: give at least two classes")


def check_data_needed(steps: list[Any], data: Any, synthetic_ok: bool = False, inputs: tuple[Any, ...] = ()) -> None:
    """Passes that cannot run without (labelled) data are refused before the run starts.

    ``synthetic_ok``: the model's inputs are token ids / masks, for which valid synthetic samples
    exist, so a pass that needs "any" data (INT8 calibration) runs on those and says so.
    ``inputs``: the model's input specs; a pass that feeds data to a model with several inputs needs one
    array per input, refused here rather than after the passes before it (export ...) ran."""
    for cfg in steps:
        need = cfg.data_needed()
        if need is not None and data is not None:
            cfg.check_data(data)  # what the pass would refuse of the data only after the passes before it ran
        if need is None or (need == "any" and data is None and synthetic_ok):
            continue
        if data is None:
            raise RecipeError(f"pass '{cfg.kind}' needs data but the run has none (data.source = \"random\"); set "
                              "data = { source = \"builtin:digits\" }, folder:PATH or npz:PATH (--data)")
        if len(inputs) > 1 and not getattr(data, "input_names", ()):
            names = ", ".join(s.name for s in inputs)
            raise RecipeError(f"pass '{cfg.kind}' feeds the data to the model's {len(inputs)} inputs ({names}), but "
                              f"{data.name} gives one array per sample; give an .npz with one array per input name "
                              f"({names}), or text:FILE / jsonl:FILE data for a Hugging Face text model")
        if need == "labelled" and not data.labelled:
            raise RecipeError(f"pass '{cfg.kind}' with these settings needs labelled data; {data.name} has no labels "
                              "(add 'y' to the .npz, or use an image folder)")


CHANCE_FACTOR = 1.5  # top-1 below 1.5x chance (1/classes) is "at chance level"


def chance_note(accuracy: float | None, n_classes: int | None, source: str, trained: bool) -> str | None:
    """A note when the baseline's top-1 is at chance level, saying why that may be."""
    if accuracy is None or not n_classes or n_classes < 2 or accuracy > CHANCE_FACTOR / n_classes:
        return None
    pct, chance = 100 * accuracy, 100 / n_classes
    if source.startswith("zoo:") and not trained:
        return (f"baseline top-1 {pct:.2f}% is chance level ({chance:.1f}% for {n_classes} classes): zoo models "
                "carry random weights until trained; set model.train_epochs (--train-epochs) or give --weights")
    return (f"baseline top-1 {pct:.2f}% is chance level ({chance:.1f}% for {n_classes} classes): are these the "
            "model's trained weights, and do the data's labels and preprocessing match its training?")
