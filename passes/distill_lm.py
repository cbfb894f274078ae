"""Distillation for decoder language models (``distill.lm``): the original model teaches the pruned one its
next-token distribution on real text, for a budget of tokens.

The loss is the temperature-scaled KL divergence KL(teacher || student) of the next-token distributions at
every position of the run's calibration windows (``ctx.text.calib``), Minitron's logit-only recipe. The
budget counts the tokens the student trains on; when it exceeds the calibration text, the windows are
visited again in a new order (said in the pass's notes: more text, ``measure.lm_calib_tokens``, is better
than repeats). The last calibration windows (up to ``val_windows``) are held back from training to judge
the KL before and after; the held-out text of the run (the perplexity windows) is never trained on.

Progress is logged in tokens per second and loss. Training is resumable: every ``checkpoint_every`` steps
the student, the optimizer and the step are written under ``<cache>/resume/<key>`` (the key covers the
input, the config, the teacher, the text and the seed); a run started again continues from the last
checkpoint, and since each step's windows derive from (seed, step), it ends with the same weights as an
uninterrupted run. The structure is not changed, so the output inherits its parent's structure steps.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from compress.core.artifact import Artifact, sha256_json
from compress.core.config import PassConfig
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import InputError, PassError, RecipeError
from compress.inputs.torch_io import clone_module, safe_torch_load, torch_artifact

PASS = "distill.lm"
CKPT = "checkpoint.pt"


class DistillLM(PassConfig):
    """Logit distillation of a causal LM from the original on calibration text, for a token budget."""

    kind: Literal["distill.lm"] = "distill.lm"
    tokens: int = Field(65_536, ge=1, description="training token budget (tokens the student sees)")
    batch: int = Field(4, ge=1, le=4096, description="windows per optimizer step")
    lr: float = Field(1e-4, gt=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps with a linear warm-up")
    weight_decay: float = Field(0.0, ge=0, lt=1)
    temperature: float = Field(1.0, gt=0, le=100)
    val_windows: int = Field(2, ge=0, le=1024, description="calibration windows held back to judge the KL")
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints")
    log_every: int = Field(10, ge=1, description="steps between progress lines")

    def data_needed(self) -> str | None:
        return None  # it reads ctx.text (a causal LM's windows), checked in preflight and at run time

    def preflight(self, root: Any, text: Any) -> None:
        if text is None:
            raise RecipeError(f"{PASS} trains a causal LM on text: set model.task = \"causal-lm\" and data.source = "
                              "\"builtin:pydoc-topics\" or text:FILE")
        _check_budget(self, text.window)


def _check_budget(cfg: DistillLM, window: int) -> None:
    one = cfg.batch * window
    if cfg.tokens < one:
        raise RecipeError(f"{PASS}: tokens = {cfg.tokens:,} is smaller than one batch ({cfg.batch} window(s) of "
                          f"{window} tokens = {one:,}); give tokens >= {one:,} or a smaller batch")


def _step_windows(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The windows of one step: every window once per pass over the text, in an order drawn per pass."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
    return out


def _kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(teacher || student) per token, averaged; T^2 keeps the gradient scale (Hinton et al.)."""
    s = s.reshape(-1, s.shape[-1]).float()
    t = t.reshape(-1, t.shape[-1]).float()
    kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True, reduction="sum")
    return kl / s.shape[0] * temp * temp


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, torch.ones_like(ids))  # type: ignore[no-any-return]  # CausalLMModel: (ids, mask) -> logits


@torch.inference_mode()
def _val_kl(student: Any, teacher: Any, windows: np.ndarray, temp: float) -> float | None:
    if not len(windows):
        return None
    was = student.training
    student.eval()
    tot = 0.0
    for w in windows:
        ids = torch.from_numpy(w[None].astype(np.int64))
        tot += float(_kl(_logits(student, ids), _logits(teacher, ids), temp))
    student.train(was)
    return tot / len(windows)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def _step_hook(step: int, info: dict[str, Any]) -> None:
    """Called after each checkpoint is written (tests replace it to simulate a kill)."""


def _models(art: Artifact, orig: Artifact | None) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """The student (a copy of the input), the frozen teacher (the pipeline's original model) and its digest."""
    from compress.inputs.causal_lm import is_causal_lm

    if orig is None or orig.kind != "pytorch":
        raise PassError(f"{PASS}: the teacher is the pipeline's original PyTorch model, which is not known here")
    student = clone_module(art)
    teacher = clone_module(orig).eval()
    if not (is_causal_lm(student) and is_causal_lm(teacher)):
        raise PassError(f"{PASS}: the model is not a causal LM (model.task = \"causal-lm\"); use distill for others")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, orig.digest


def _budget_notes(cfg: DistillLM, total: int, per_step: int, n_train: int) -> list[str]:
    notes = []
    passes_over = total * cfg.batch / n_train
    if passes_over > 1:
        notes.append(f"the budget of {cfg.tokens:,} tokens visits the {n_train} calibration window(s) "
                     f"{passes_over:.1f} times; more distinct text (measure.lm_calib_tokens) generalizes better")
    if cfg.tokens % per_step:
        notes.append(f"budget rounded down to {total * per_step:,} tokens ({total} steps of {per_step:,})")
    return notes


def _resume(ckpt: Path, student: torch.nn.Module, opt: torch.optim.Optimizer, ctx: PassContext, total: int
            ) -> tuple[int, list[float], int | None]:
    """The step, loss curve and resumed-from step of an interrupted run's checkpoint (0, [], None: none)."""
    if ckpt.exists():
        try:
            ck = safe_torch_load(ckpt)
            student.load_state_dict(ck["student"])
            opt.load_state_dict(ck["optimizer"])
            step = int(ck["step"])
            ctx.log(f"{PASS}: resuming at step {step} of {total} from {ckpt}")
            return step, [float(x) for x in ck["curve"]], step
        except (InputError, KeyError, RuntimeError) as e:
            ctx.log(f"{PASS}: ignoring unreadable checkpoint {ckpt} ({e}); starting over")
    return 0, [], None


def _lr(cfg: DistillLM, step: int, warm: int, total: int) -> float:
    """Linear warm-up, then constant or cosine decay."""
    if warm and step < warm:
        return cfg.lr * min(1.0, (step + 1) / warm)
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@register_pass(DistillLM, consumes="pytorch", produces="pytorch", trains_only=True)
def distill_lm(art: Artifact, cfg: DistillLM, ctx: PassContext) -> Artifact:
    """Logit distillation of a causal LM from the original model on calibration text, for a token budget."""
    text = ctx.text
    if text is None:
        raise PassError(f"{PASS} trains a causal LM on text; it needs model.task = \"causal-lm\" and text data")
    try:
        _check_budget(cfg, text.window)
    except RecipeError as e:
        raise PassError(str(e)) from e
    student, teacher, t_digest = _models(art, ctx.original)
    n_val = min(cfg.val_windows, max(0, len(text.calib) - cfg.batch))
    train = np.asarray(text.calib[: len(text.calib) - n_val])
    val = np.asarray(text.calib[len(text.calib) - n_val:])
    per_step = cfg.batch * text.window
    total = cfg.tokens // per_step
    notes = _budget_notes(cfg, total, per_step, len(train))

    resume_dir = ctx.cache.root / "resume" / sha256_json({
        "pass": PASS, "input": art.digest, "config": cfg.canonical(), "teacher": t_digest, "seed": ctx.seed,
        "text": text.digest})
    resume_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_dir / CKPT
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    kl_before = _val_kl(student, teacher, val, cfg.temperature)
    step, curve, resumed = _resume(ckpt, student, opt, ctx, total)
    warm = max(1, int(total * cfg.warmup)) if cfg.warmup else 0
    ctx.log(f"{PASS}: {total} steps of {cfg.batch} x {text.window} tokens ({total * per_step:,} tokens) on "
            f"{len(train)} calibration window(s); teacher: the original model")
    student.train()
    t0, tok0, window_loss = time.perf_counter(), step * per_step, []
    while step < total:
        lr = _lr(cfg, step, warm, total)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(ctx.seed * 1_000_003 + step)
        ids = torch.from_numpy(train[_step_windows(len(train), cfg.batch, step, ctx.seed)].astype(np.int64))
        with torch.no_grad():
            t_log = _logits(teacher, ids)
        loss = _kl(_logits(student, ids), t_log, cfg.temperature)
        if not torch.isfinite(loss):
            raise PassError(f"{PASS}: the loss became {float(loss)} at step {step + 1} with lr={cfg.lr:g}; lower the "
                            f"learning rate (e.g. lr={cfg.lr / 10:g}) and run again")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        window_loss.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == total:
            secs = time.perf_counter() - t0
            done = step * per_step
            curve.append(sum(window_loss) / len(window_loss))
            window_loss = []
            ctx.log(f"{PASS}: {done:,}/{total * per_step:,} tokens, {(done - tok0) / max(secs, 1e-9):,.0f} tokens/s, "
                    f"loss {curve[-1]:.4f}, lr {lr:.2g}")
        if step % cfg.checkpoint_every == 0 and step < total:
            _save_atomic({"student": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "curve": curve}, ckpt)
            _step_hook(step, {"checkpoint": ckpt})
    student.eval()
    secs = time.perf_counter() - t0
    kl_after = _val_kl(student, teacher, val, cfg.temperature)
    if kl_before is not None and kl_after is not None:
        notes.append(f"KL to the original on {len(val)} held-back calibration window(s): {kl_before:.4f} -> "
                     f"{kl_after:.4f} after {total * per_step:,} tokens")
    info = {"tokens": total * per_step, "steps": total, "batch": cfg.batch, "window": text.window,
            "loss_curve": curve, "log_every": cfg.log_every, "kl_before": kl_before, "kl_after": kl_after,
            "val_windows": len(val), "train_windows": len(train), "resumed_from_step": resumed,
            "tokens_per_s": (total * per_step - tok0) / secs if secs > 0 and step > 0 else None, "notes": notes}
    out = torch_artifact(student, art, ctx, metadata={PASS: info})
    shutil.rmtree(resume_dir, ignore_errors=True)  # finished: the output is cached now
    return out
