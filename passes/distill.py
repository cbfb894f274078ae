"""Knowledge distillation: the model as it entered the pipeline teaches the compressed one.

The student is the input artifact (a channel-pruned model with other widths, a
fake-quantized QAT model, or anything else ``nn.Module``); the teacher is, by
default, ``ctx.original``. The loss is the temperature-scaled KL divergence of
the logits, plus cross-entropy when the data has labels, plus optional feature
matching at named layers through a learned projection when widths differ.

Training is resumable: after every epoch a checkpoint (weights, optimizer,
progress) is written under ``<cache>/resume/<key>``, keyed by the input digest,
the config, the teacher, the data and the seed. A run killed mid-way and started
again continues from the last finished epoch and ends with the same weights as
an uninterrupted run. The directory is removed when the pass finishes.

The student's structure is not changed (projections live outside it), so the
output inherits the parent's structure steps and needs no new hook.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.core.artifact import Artifact, sha256_json
from compress.core.config import PassConfig
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import InputError, PassError
from compress.inputs.data import DataBundle, Split
from compress.inputs.torch_io import clone_module, safe_torch_load, torch_artifact, torch_meta, write_torch

VERSION = 1
CKPT = "checkpoint.pt"
LAST_GOOD = "last_good"


class Distill(PassConfig):
    """Train the model to match a teacher's outputs (the original model by default)."""

    kind: Literal["distill"] = "distill"
    teacher: str | None = Field(None, description="None = the model as it entered the pipeline; else zoo:NAME, "
                                                   "a zoo name, package.module:factory or a .pt2 file")
    teacher_weights: str | None = Field(None, description="state dict (.pt / .safetensors) for a named teacher")
    allow_unsafe_pt2: bool = Field(False, description="allow a .pt2 teacher (loaded with pickle: only files you trust)")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs cross-entropy")
    labels: Literal["auto", "ignore"] = "auto"
    features: list[str] = Field(default_factory=list, description="module names matched between teacher and student")
    feature_weight: float = Field(1.0, ge=0)
    # What the output is matched by: KD on class logits, or cosine / MSE for embeddings and hidden states
    # (softmax over embedding dimensions means nothing). auto: KD unless the teacher's output is not
    # one score vector per sample (compress.quality.fidelity.infer_kind); set "cosine" for 2-D sentence embeddings.
    output_loss: Literal["auto", "kd", "cosine", "mse"] = "auto"
    epochs: int = Field(10, ge=1, le=100_000)
    steps: int | None = Field(None, ge=1, description="optimizer steps; replaces epochs when set")
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0, lt=1)
    batch_size: int = Field(64, ge=2, le=1 << 16)
    patience: int = Field(5, ge=0, description="stop after this many epochs without improvement; 0 = never")
    min_val_samples: int = Field(20, ge=1, description="refuse to run with a smaller validation split")

    @model_validator(mode="after")
    def _consistent(self) -> Distill:
        if self.steps is not None and "epochs" in self.model_fields_set:
            raise ValueError("set either epochs or steps, not both")
        if self.teacher_weights is not None and self.teacher is None:
            raise ValueError("teacher_weights needs teacher (the default teacher is the pipeline's original model)")
        if len(set(self.features)) != len(self.features):
            raise ValueError("features lists a module twice")
        return self

    def data_needed(self) -> str | None:
        return "any"  # labels are optional


def _epoch_end_hook(epoch: int, info: dict[str, Any]) -> None:
    """Called after each epoch's checkpoint is written (tests replace it to simulate a kill)."""


# ---------------------------------------------------------------- teacher


def _load_teacher(art: Artifact, cfg: Distill, ctx: PassContext) -> tuple[nn.Module, str, str]:
    """(teacher module in eval mode, its digest, a description)."""
    if cfg.teacher is None:
        orig = ctx.original
        if orig is None:
            raise PassError("distill: no teacher: the pipeline's original model is unknown (ctx.original is None); "
                            "name one with teacher = \"zoo:NAME\" and teacher_weights = PATH")
        if orig.kind != "pytorch":
            raise PassError(f"distill: the original model is a {orig.kind} model; the teacher must be a PyTorch model "
                            "(name one with teacher = ... and teacher_weights = ...)")
        # A copy, so switching to eval mode never touches a module the caller still holds.
        return clone_module(orig).eval(), orig.digest, "original"

    from compress.inputs import zoo
    from compress.inputs.models import classify_source, load_model, unsafe_pt2_message
    from compress.stages.recipe import ModelSpec

    src = f"zoo:{cfg.teacher}" if cfg.teacher in zoo.ZOO else cfg.teacher
    kind = classify_source(src)
    if kind == "onnx":
        raise PassError(f"distill: teacher {cfg.teacher!r} is an ONNX file; the teacher must be a PyTorch model "
                        "(zoo:NAME, package.module:factory or .pt2)")
    if kind == "pt2" and not cfg.allow_unsafe_pt2:
        raise InputError(unsafe_pt2_message(Path(src.removeprefix("pt2:")), "distill{allow_unsafe_pt2=true}"))
    if kind == "zoo" and cfg.teacher_weights is None:
        raise PassError(f"distill: teacher {src!r} has random weights; give its trained weights with "
                        "teacher_weights = PATH (a state dict)")
    spec = ModelSpec(source=src, input_shape=list(art.inputs[0].shape), weights=cfg.teacher_weights,
                     allow_unsafe_pt2=cfg.allow_unsafe_pt2)
    t_art = load_model(spec, ctx.cache)
    return clone_module(t_art).eval(), t_art.digest, src


# ---------------------------------------------------------------- features


class _Tap:
    """Records the outputs of named submodules on each forward."""

    def __init__(self, model: nn.Module, names: list[str], who: str) -> None:
        mods = dict(model.named_modules())
        for n in names:
            if n not in mods or n == "":
                some = [k for k in mods if k][:12]
                raise PassError(f"distill: features: the {who} has no module named {n!r}; "
                                f"its modules include: {', '.join(some)}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(self._hook(n, who)) for n in names]

    def _hook(self, name: str, who: str) -> Any:
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                raise PassError(f"distill: features: the {who}'s module {name!r} returns {type(out).__name__}, "
                                "not a tensor; choose a layer that outputs one tensor")
            self.out[name] = out

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _projection(name: str, t: torch.Tensor, s: torch.Tensor) -> nn.Module:
    """Maps the student's feature to the teacher's width (1x1 conv or linear); identity when equal."""
    ts, ss = tuple(t.shape), tuple(s.shape)
    if ts == ss:
        return nn.Identity()
    if t.dim() == s.dim() and t.dim() >= 2:
        if t.dim() in (3, 4) and ts[2:] == ss[2:]:  # channels first: (N, C, L) or (N, C, H, W)
            conv = nn.Conv2d if t.dim() == 4 else nn.Conv1d
            return conv(ss[1], ts[1], 1, bias=False)
        if ts[:-1] == ss[:-1]:  # channels last: (N, C) or (N, T, C)
            return nn.Linear(ss[-1], ts[-1], bias=False)
    raise PassError(f"distill: features: layer {name!r} has shape {list(ts[1:])} in the teacher but "
                    f"{list(ss[1:])} in the student; only the channel width may differ (a 1x1 projection is "
                    "learned for it), so choose layers whose spatial / token sizes agree")


# ---------------------------------------------------------------- helpers


def _logits(out: Any, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise PassError(f"distill: the {who} returns {type(out).__name__}; distillation needs a model returning "
                        "one logits tensor")
    return out


def _kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    # T^2 keeps the gradient scale independent of the temperature (Hinton et al.).
    kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1), log_target=True,
                  reduction="none")
    return kl.sum(1).mean() * temp * temp


def _split_digest(split: Split) -> str:
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(split.x).tobytes())
    if split.y is not None:
        h.update(np.ascontiguousarray(split.y).tobytes())
    for name in sorted(split.extra or {}):  # the other inputs (attention masks ...) train too
        h.update(name.encode() + np.ascontiguousarray((split.extra or {})[name]).tobytes())
    return h.hexdigest()


def _mask(data: DataBundle, split: Split, idx: np.ndarray | slice) -> torch.Tensor | None:
    """The attention mask of samples ``idx`` when the model takes one: padded tokens are not matched."""
    if "attention_mask" not in data.input_names[1:] or not split.extra:
        return None
    return torch.from_numpy(np.ascontiguousarray(split.extra["attention_mask"][idx]))


def _batches(n: int, bs: int) -> list[tuple[int, int]]:
    # A final batch of one sample is dropped: BatchNorm cannot train on it.
    return [(i, min(i + bs, n)) for i in range(0, n, bs) if min(i + bs, n) - i >= 2]


def _clone_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@torch.inference_mode()
def _val_logits(model: nn.Module, data: DataBundle, split: Split, bs: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([_logits(model(*data.model_inputs(split, slice(i, i + bs))), "model").float()
                     for i in range(0, len(split), bs)])
    model.train(was)
    return out


def _token_weights(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token weights (batch, tokens) for hidden states under a mask of the same length, else None."""
    if mask is None or s.dim() != 3 or tuple(mask.shape) != tuple(s.shape[:2]):
        return None
    return mask.to(s.dtype)


def _cosine_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine per sample (per real token for hidden states, padding excluded), averaged."""
    if s.dim() >= 3:
        per_token = 1 - F.cosine_similarity(s, t, dim=-1)
        w = _token_weights(s, mask)
        return per_token.mean() if w is None else (per_token * w).sum() / w.sum().clamp(min=1.0)
    return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()


def _out_loss(kind: str, s: torch.Tensor, t: torch.Tensor, temp: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "kd":
        return _kd(s, t, temp)
    if kind == "cosine":
        return _cosine_loss(s, t, mask)
    w = _token_weights(s, mask)
    if w is None:
        return F.mse_loss(s, t)
    return (((s - t) ** 2).mean(-1) * w).sum() / w.sum().clamp(min=1.0)


def _auto_loss(ctx: PassContext, art: Artifact, t_out: torch.Tensor) -> tuple[str, str]:
    """(loss, why) that fits the output: a Hugging Face task head says what its output is, else its shape."""
    from compress.quality.fidelity import infer_kind

    task = next((a.metadata.get("task") for a in (ctx.original, art) if a is not None and a.metadata.get("task")),
                None)
    if task:
        from compress.inputs.hf import task_output_kind

        kind, why = task_output_kind(str(task)), f"the model's task {task!r}"
    else:
        kind, why = infer_kind(t_out.numpy())
    return {"logits": "kd", "embedding": "cosine"}.get(kind, "mse"), why


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _top1(a: torch.Tensor, y: np.ndarray) -> float:
    return float((a.argmax(1).numpy() == y).mean())


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


@dataclass
class _State:
    epoch: int = 0  # last finished epoch
    step: int = 0
    curve: list[float] = field(default_factory=list)  # val metric per epoch
    val_kd: list[float] = field(default_factory=list)
    train: dict[str, list[float]] = field(default_factory=dict)  # mean loss term per epoch
    best_epoch: int = 0
    best_score: tuple[float, float] = (-1.0, 0.0)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_epochs: int = 0


# ---------------------------------------------------------------- the pass


@register_pass(Distill, consumes="pytorch", produces="pytorch", version=VERSION, trains_only=True,
               path_fields=("teacher_weights",), source_fields=("teacher",))
def distill(art: Artifact, cfg: Distill, ctx: PassContext) -> Artifact:
    """Knowledge distillation from the original (or a named) teacher into the current model."""
    data: DataBundle | None = ctx.data
    if data is None:
        raise PassError("distill: no data: training needs samples; set data = { source = \"builtin:digits\" }, "
                        "an image folder or an .npz (labels are optional: x alone works)")
    if len(data.val) < cfg.min_val_samples:
        raise PassError(f"distill: the validation split has {len(data.val)} samples, fewer than min_val_samples="
                        f"{cfg.min_val_samples}; the best epoch cannot be chosen reliably. Use more data or a "
                        "larger data.val_fraction (or lower min_val_samples)")
    n_in = len(art.inputs)
    if data.n_inputs != n_in:
        names = ", ".join(s.name for s in art.inputs)
        raise PassError(f"distill: the model takes {n_in} input(s) ({names}) but the data gives "
                        f"{data.n_inputs} per sample; give one array per input (an .npz with arrays named "
                        f"{names}, or text:FILE / jsonl:FILE data for a Hugging Face text model)")
    batches = _batches(len(data.train), cfg.batch_size)
    if not batches:
        raise PassError(f"distill: the training split has {len(data.train)} samples; at least 2 are needed")

    teacher, t_digest, t_desc = _load_teacher(art, cfg, ctx)
    student = clone_module(art)
    use_labels = cfg.labels == "auto" and data.train.y is not None and data.val.y is not None
    notes: list[str] = []
    if not use_labels:
        why = "labels='ignore'" if cfg.labels == "ignore" else "the data has no labels"
        notes.append(f"label-free ({why}): trained on the teacher's outputs only; the validation metric is "
                     "top-1 agreement with the teacher")
    if t_digest == art.digest:
        notes.append("the teacher is the input model itself (distill ran before any compression): self-distillation")

    # One probe batch checks shapes before any training and sizes the projections.
    x0 = data.model_inputs(data.train, slice(0, 2))
    t_tap = _Tap(teacher, cfg.features, "teacher")
    s_tap = _Tap(student, cfg.features, "student")
    try:
        student.eval()
        with torch.no_grad():
            t_out = _logits(teacher(*x0), "teacher")
            s_out = _logits(student(*x0), "student")
        if t_out.shape != s_out.shape:
            raise PassError(f"distill: the teacher ({t_desc}) outputs shape {list(t_out.shape[1:])} per sample but the "
                            f"student outputs {list(s_out.shape[1:])}; logits are matched one to one, so use a "
                            "teacher with the same classes")
        out_loss: str = cfg.output_loss
        if out_loss == "auto":
            out_loss, why = _auto_loss(ctx, art, t_out)
            notes.append(f"output_loss auto: {out_loss} ({why})")
        if out_loss != "kd":
            notes[:] = [n for n in notes if "top-1 agreement with the teacher" not in n]
            if use_labels:
                use_labels = False
                notes.append(f"labels not used: the output is matched by {out_loss}, not class logits")
            notes.append(f"output matched by {out_loss} (not softmax KD); the validation metric is the mean "
                         "per-sample cosine to the teacher")
        if use_labels and t_out.dim() != 2:
            raise PassError(f"distill: cross-entropy needs (batch, classes) logits, got shape {list(t_out.shape)}; "
                            "set labels = \"ignore\" to distil without labels")
        torch.manual_seed(ctx.seed)
        projs = nn.ModuleList([_projection(n, t_tap.out[n], s_tap.out[n]) for n in cfg.features])
        return _run(art, cfg, ctx, data, teacher, student, projs, t_tap, s_tap, batches, use_labels,
                    t_digest, t_desc, notes, out_loss)
    finally:
        t_tap.close()
        s_tap.close()


class _Trainer:
    """One distillation run: the models, the optimizer, the resume checkpoint and the progress state."""

    def __init__(self, art: Artifact, cfg: Distill, ctx: PassContext, data: DataBundle, teacher: nn.Module,
                 student: nn.Module, projs: nn.ModuleList, t_tap: _Tap, s_tap: _Tap, batches: list[tuple[int, int]],
                 use_labels: bool, t_digest: str, out_loss: str) -> None:
        self.art, self.cfg, self.ctx, self.data = art, cfg, ctx, data
        self.teacher, self.student, self.projs, self.t_tap, self.s_tap = teacher, student, projs, t_tap, s_tap
        self.batches, self.use_labels, self.out_loss = batches, use_labels, out_loss
        self.resume_dir = ctx.cache.root / "resume" / sha256_json({
            "input": art.digest, "config": cfg.canonical(), "teacher": t_digest, "seed": ctx.seed, "version": VERSION,
            "train": _split_digest(data.train), "val": _split_digest(data.val),
        })
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.resume_dir / CKPT
        params = list(student.parameters()) + list(projs.parameters())
        if cfg.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        spe = len(batches)
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
        self.n_epochs = math.ceil(self.total / spe)
        # Frozen teacher: its validation logits are computed once.
        self.t_val = _val_logits(teacher, data, data.val)
        self.y_val = data.val.y if use_labels else None
        self.m_val = _mask(data, data.val, slice(None))
        self.metric = "top1" if use_labels else "teacher_agreement" if out_loss == "kd" else "teacher_cosine"
        self.st = _State()
        self.last_good: dict[str, torch.Tensor] = {}
        self.last_good_epoch = 0

    def evaluate(self) -> tuple[float, float, torch.Tensor]:
        """The student's validation score, its output loss to the teacher, and its validation outputs."""
        s_val = _val_logits(self.student, self.data, self.data.val)
        if self.y_val is not None:
            score = _top1(s_val, self.y_val)
        elif self.out_loss == "kd":
            score = _agreement(s_val, self.t_val)
        else:
            score = 1 - float(_cosine_loss(s_val, self.t_val, self.m_val))
        return score, float(_out_loss(self.out_loss, s_val, self.t_val, self.cfg.temperature, self.m_val)), s_val

    def resume(self) -> int | None:
        """Load the checkpoint of an interrupted run with the same key; the epoch it resumes after, or None."""
        if not self.ckpt_path.exists():
            return None
        try:
            ck = safe_torch_load(self.ckpt_path)
        except InputError as e:
            self.ctx.log(f"distill: ignoring unreadable checkpoint {self.ckpt_path} ({e}); starting over")
            return None
        self.student.load_state_dict(ck["student"])
        self.projs.load_state_dict(ck["projections"])
        self.opt.load_state_dict(ck["optimizer"])
        self.st = _State(epoch=ck["epoch"], step=ck["step"], curve=list(ck["curve"]), val_kd=list(ck["val_kd"]),
                         train={k: list(v) for k, v in ck["train"].items()}, best_epoch=ck["best_epoch"],
                         best_score=(float(ck["best_score"][0]), float(ck["best_score"][1])),
                         best_state=ck["best_state"], bad_epochs=ck["bad_epochs"])
        self.ctx.log(f"distill: resuming after epoch {self.st.epoch} from {self.ckpt_path}")
        return self.st.epoch

    def step(self, idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """One optimizer step on the training samples ``idx``; the loss terms and their weighted total."""
        cfg, data, st, out_loss = self.cfg, self.data, self.st, self.out_loss
        xs = data.model_inputs(data.train, idx)
        mask = _mask(data, data.train, idx)
        lr = cfg.lr if cfg.schedule == "constant" else cfg.lr * 0.5 * (1 + math.cos(math.pi * st.step / self.total))
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            t_log = _logits(self.teacher(*xs), "teacher")
        s_log = _logits(self.student(*xs), "student")
        terms: dict[str, torch.Tensor] = {out_loss: _out_loss(out_loss, s_log, t_log, cfg.temperature, mask)}
        if self.use_labels:
            y = torch.from_numpy(data.train.y[idx])  # type: ignore[index]
            terms["ce"] = F.cross_entropy(s_log, y)
            loss = cfg.alpha * terms[out_loss] + (1 - cfg.alpha) * terms["ce"]
        else:
            loss = terms[out_loss]
        if cfg.features:
            feat = sum((F.mse_loss(p(self.s_tap.out[n]), self.t_tap.out[n].detach())
                        for n, p in zip(cfg.features, self.projs, strict=True)), torch.zeros(()))
            terms["feature"] = feat
            loss = loss + cfg.feature_weight * feat
        if not torch.isfinite(loss):
            self.fail_nan(epoch, float(loss.detach()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        st.step += 1
        return {**terms, "total": loss}

    def epoch(self, epoch: int, bar: Any) -> None:
        """Train one epoch, then score it, keep the best student and write the resume checkpoint."""
        st = self.st
        # Seeds derive from (seed, epoch), not from a running generator, so a resumed run shuffles identically.
        torch.manual_seed(self.ctx.seed * 1_000_003 + epoch)
        perm = np.random.default_rng([self.ctx.seed, epoch]).permutation(len(self.data.train))
        self.student.train()
        self.projs.train()
        sums: dict[str, float] = {}
        n_b = 0
        for lo, hi in self.batches:
            if st.step >= self.total:
                break
            terms = self.step(perm[lo:hi], epoch)
            n_b += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['total'].detach()):.3f}",
                            val=f"{st.curve[-1]:.3f}" if st.curve else "-")
        if any(not torch.isfinite(p).all() for p in self.student.parameters()):
            self.fail_nan(epoch, float("nan"))
        score, vkd, _ = self.evaluate()
        st.epoch = epoch
        st.curve.append(score)
        st.val_kd.append(vkd)
        for k, total_k in sums.items():
            st.train.setdefault(k, []).append(total_k / max(1, n_b))
        if (score, -vkd) > st.best_score:
            st.best_score, st.best_epoch, st.best_state = (score, -vkd), epoch, _clone_state(self.student)
            st.bad_epochs = 0
        else:
            st.bad_epochs += 1
        self.last_good, self.last_good_epoch = _clone_state(self.student), epoch
        _save_atomic({
            "epoch": st.epoch, "step": st.step, "student": self.last_good, "projections": self.projs.state_dict(),
            "optimizer": self.opt.state_dict(), "curve": st.curve, "val_kd": st.val_kd, "train": st.train,
            "best_epoch": st.best_epoch, "best_score": list(st.best_score), "best_state": st.best_state,
            "bad_epochs": st.bad_epochs,
        }, self.ckpt_path)
        bar.set_postfix(loss=f"{st.train['total'][-1]:.3f}" if "total" in st.train else "-", val=f"{score:.3f}")
        self.ctx.log(f"distill epoch {epoch}/{self.n_epochs}: loss {st.train.get('total', [float('nan')])[-1]:.4f}, "
                     f"val {self.metric} {score:.4f}")
        _epoch_end_hook(epoch, {"checkpoint": self.ckpt_path, "score": score, "student": self.student})

    def fail_nan(self, epoch: int, value: float) -> None:
        _fail_nan(self.art, self.cfg, self.ctx, self.student, self.last_good, self.last_good_epoch, epoch, self.st,
                  self.resume_dir, value)

    def loss_terms(self) -> dict[str, Any]:
        cfg, out_loss = self.cfg, self.out_loss
        return {out_loss: {"weight": cfg.alpha if self.use_labels else 1.0,
                           **({"temperature": cfg.temperature} if out_loss == "kd" else {})},
                **({"ce": {"weight": 1 - cfg.alpha}} if self.use_labels else {}),
                **({"feature": {"weight": cfg.feature_weight, "layers": list(cfg.features),
                                "projections": [type(p).__name__ for p in self.projs]}} if cfg.features else {})}

    def comparisons(self, s_val0: torch.Tensor, s_val: torch.Tensor) -> dict[str, float]:
        """The student before and after against the labels and the teacher."""
        out: dict[str, float] = {}
        t_val, y = self.t_val, self.data.val.y
        if y is not None:
            out.update(teacher_top1=_top1(t_val, y), top1_before=_top1(s_val0, y), top1_after=_top1(s_val, y))
        if self.out_loss == "kd":
            out.update(teacher_agreement_before=_agreement(s_val0, t_val),
                       teacher_agreement_after=_agreement(s_val, t_val))
        else:  # argmax agreement over embedding dimensions means nothing
            out.update(teacher_cosine_before=1 - float(_cosine_loss(s_val0, t_val, self.m_val)),
                       teacher_cosine_after=1 - float(_cosine_loss(s_val, t_val, self.m_val)))
        return out


def _run(art: Artifact, cfg: Distill, ctx: PassContext, data: DataBundle, teacher: nn.Module, student: nn.Module,
         projs: nn.ModuleList, t_tap: _Tap, s_tap: _Tap, batches: list[tuple[int, int]], use_labels: bool,
         t_digest: str, t_desc: str, notes: list[str], out_loss: str = "kd") -> Artifact:
    from tqdm import tqdm

    tr = _Trainer(art, cfg, ctx, data, teacher, student, projs, t_tap, s_tap, batches, use_labels, t_digest, out_loss)
    before, before_kd, s_val0 = tr.evaluate()
    resumed_from = tr.resume()
    st = tr.st
    if resumed_from is None:
        # The input itself is a candidate: distillation never returns something worse on validation.
        st.best_score, st.best_state = (before, -before_kd), _clone_state(student)
    tr.last_good, tr.last_good_epoch = _clone_state(student), st.epoch
    bar = tqdm(total=tr.total, initial=st.step, desc="distill", disable=not ctx.progress, leave=False)
    try:
        for epoch in range(st.epoch + 1, tr.n_epochs + 1):
            if st.step >= tr.total or (cfg.patience and st.bad_epochs >= cfg.patience):
                break
            tr.epoch(epoch, bar)
        stopped_early = bool(cfg.patience) and st.bad_epochs >= cfg.patience and st.epoch < tr.n_epochs
    finally:
        bar.close()

    student.load_state_dict(st.best_state)
    student.eval()
    after, _, s_val = tr.evaluate()
    if st.best_epoch == 0:
        notes.append("no epoch improved on the input model's validation score; the input weights are returned")
    if stopped_early:
        notes.append(f"stopped early after epoch {st.epoch}: no improvement for {cfg.patience} epochs")
    info: dict[str, Any] = {
        "teacher": t_desc, "teacher_digest": t_digest, "labels_used": use_labels, "metric": tr.metric,
        "output_loss": out_loss, "loss_terms": tr.loss_terms(), "train_loss_curve": st.train,
        "epochs_run": st.epoch, "steps_run": st.step, "best_epoch": st.best_epoch, "stopped_early": stopped_early,
        "resumed_from_epoch": resumed_from, "val_curve": st.curve, "val_kd_curve": st.val_kd,
        "accuracy_before": before, "accuracy_after": after, "notes": notes, **tr.comparisons(s_val0, s_val),
    }
    ctx.log(f"distill: val {tr.metric} {before:.4f} -> {after:.4f} (best epoch {st.best_epoch} of {st.epoch})")
    out = torch_artifact(student, art, ctx, metadata={"distill": info})
    # Finished: the output is in the cache now, so the resume state is no longer needed.
    shutil.rmtree(tr.resume_dir, ignore_errors=True)
    return out


def _fail_nan(art: Artifact, cfg: Distill, ctx: PassContext, student: nn.Module, last_good: dict[str, torch.Tensor],
              last_good_epoch: int, epoch: int, st: _State, resume_dir: Path, value: float) -> None:
    """Stop on a non-finite loss, keeping the last student that finished an epoch with finite weights."""
    student.load_state_dict(last_good)
    student.eval()
    source, structure = torch_meta(art)
    dst = resume_dir / LAST_GOOD
    shutil.rmtree(dst, ignore_errors=True)
    digest = write_torch(dst, student, source, structure)
    kept = Artifact("pytorch", dst, digest, art.inputs, parent=art.digest, producer="distill (last good, NaN stop)",
                    metadata={**art.metadata, "distill": {"last_good_epoch": last_good_epoch, "failed_epoch": epoch}})
    kept.save_meta()
    when = f"the student after epoch {last_good_epoch}" if last_good_epoch else "the input model (no epoch finished)"
    raise PassError(
        f"distill: the loss became {value} at epoch {epoch}, step {st.step + 1} with lr={cfg.lr:g}; training stopped. "
        f"The last good student, {when}, is kept at {dst} (load it with "
        "compress.inputs.torch_io.load_torch(compress.core.artifact.Artifact.load(path))). "
        f"Lower the learning rate (e.g. lr={cfg.lr / 10:g}) and run again"
    )
