"""Short supervised training and evaluation of torch modules on a DataBundle.

Used to train the built-in example once and by passes that fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import PassError
from .data import DataBundle, Split
from .torch_io import set_eval


def fit(
    model: nn.Module,
    data: DataBundle,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    heartbeat: Callable[[str], None] | None = None,
    every_s: float = 5.0,
) -> list[float]:
    """Train ``model`` in place with Adam + cosine schedule; return validation top-1 per epoch.

    Without a progress bar (stderr is not a terminal: a CI log), ``heartbeat`` gets a line after an epoch
    whenever ``every_s`` seconds passed since the last one, and after the last epoch, so a long training
    never looks hung."""
    if not data.labelled:
        raise PassError(f"{desc}: training needs labelled data; {data.name} has no labels")
    from tqdm import tqdm

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data.train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    ce = nn.CrossEntropyLoss()
    curve = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    import time

    t0 = last = time.monotonic()
    for epoch in bar:
        model.train()
        perm = g.permutation(len(data.train))
        x_all, y_all = data.train.x[perm], data.train.y[perm]  # type: ignore[index]
        for i in range(0, len(perm), batch_size):
            x = data.adapt(x_all[i:i + batch_size])
            y = torch.from_numpy(y_all[i:i + batch_size])
            out = model(x)
            loss = ce(out, y) if loss_fn is None else loss_fn(out, y, x)
            if not torch.isfinite(loss):
                raise PassError(f"{desc}: loss became {loss.item()}; lower the learning rate")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = top1(model, data, data.val)
        curve.append(acc)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_top1=f"{acc:.3f}")
        now = time.monotonic()
        if heartbeat is not None and not progress and (now - last >= every_s or epoch == epochs - 1):
            heartbeat(f"{desc}: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}, val top-1 {100 * acc:.2f}%, "
                      f"{now - t0:.0f} s")
            last = now
    set_eval(model)
    return curve


@torch.inference_mode()
def predict(model: nn.Module, data: DataBundle, split: Split, batch_size: int = 256) -> np.ndarray:
    set_eval(model)
    outs = [model(x).float().numpy() for x, _ in data.batches(split, batch_size)]
    return np.concatenate(outs)


def top1(model: nn.Module, data: DataBundle, split: Split) -> float:
    if split.y is None:
        raise PassError("top-1 needs labels")
    logits = predict(model, data, split)
    return float((logits.argmax(1) == split.y).mean())
