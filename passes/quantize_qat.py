"""Quantization-aware fine-tuning with fake-quant modules that export as standard QDQ.

Each Conv2d/Linear is wrapped so its input activation (per-tensor, u8, observed
with a moving min/max) and its weight (per-output-channel, symmetric s8) pass
through ``torch.fake_quantize_per_*_affine``; both torch ONNX exporters (dynamo
and legacy) emit those as QuantizeLinear/DequantizeLinear, which ONNX Runtime,
TVM and TensorRT read. BatchNorm following a Conv in a Sequential is folded into
the conv first, so training sees the weights the deployed graph uses.

The wrapped module is an ordinary torch module: distillation (or more fine-tuning)
can run on it before export, and the ``quantize.qat`` structure hook rebuilds it
from disk.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed (used in eval)
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compress.core.artifact import Artifact
from compress.core.config import PassConfig
from compress.core.int8_scheme import choose_scheme
from compress.core.layers import (
    LayerSelecting,
    LayerSelector,
    check_on_root,
    expand,
    skip_field,
    torch_layers,
)
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError, RecipeError
from compress.inputs.torch_io import clone_module, register_structure_hook, torch_artifact

from ._quant_common import auto_scheme_env, calibration_batches, require_data

HOOK = "quantize.qat"


# The per-pass layer keys ``skip`` replaced, accepted for one release (compress.core.layers.renamed_keys).
_OLD_KEYS = {"keep_float": ""}


class QuantizeQat(LayerSelecting, PassConfig):
    """Insert fake quantization (INT8, QDQ on export) and fine-tune on the labelled training split."""

    kind: Literal["quantize.qat"] = "quantize.qat"
    epochs: int = Field(3, ge=0, le=1000)
    lr: float = Field(1e-4, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)
    calib_samples: int = Field(128, ge=8, description="samples that initialise the activation ranges")
    scheme: Literal["auto", "u8s8", "u8s8_reduce_range"] = "auto"
    skip: LayerSelector = skip_field("left unquantized (Conv2d/Linear modules, with a selected block's; 'first' / "
                                     "'last': the first / last of them)")
    renamed_layer_keys: ClassVar[Mapping[str, str]] = _OLD_KEYS
    momentum: float = Field(0.01, gt=0, le=1, description="moving-average rate of the activation ranges")

    def preflight(self, root: Any, text: Any) -> None:
        check_on_root(self.skip, root, "quantize.qat")

    def cache_env(self) -> dict[str, str]:
        """Facts outside the config that change the output (for the cache key)."""
        return auto_scheme_env(self.scheme)

    def data_needed(self) -> str | None:
        return "labelled"  # fine-tunes with cross-entropy


class FakeQuantAct(nn.Module):
    """Per-tensor affine u8 fake quantization with a moving min/max observer."""

    min_val: torch.Tensor
    max_val: torch.Tensor
    initialized: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.observe = False  # observe in eval mode too (calibration)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self._sync()
        # Buffers are the persistent state; the Python copies used by the exportable path follow them.
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._sync())

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)  # 0 stays exact
        if int(self.initialized) == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(1)
        elif self.observe and not self.training:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        scale = ((self.max_val - self.min_val) / 255.0).clamp(min=1e-8)
        self.scale.copy_(scale)
        self.zero_point.copy_(torch.round(-self.min_val / scale).clamp(0, 255).to(torch.int32))
        self._sync()

    def _sync(self, *_: Any) -> None:
        self._scale_f, self._zp_i = float(self.scale), int(self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.observe:
            self._update(x)
        if self.training:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        if torch.jit.is_tracing():  # the legacy (TorchScript) exporter knows this op, not the decomposed ones
            return torch.fake_quantize_per_tensor_affine(x, self._scale_f, self._zp_i, 0, 255)
        # torch.export has no symbolic-shape kernel for fake_quantize_per_tensor_affine, so a dynamic-batch
        # export fails on it; the decomposed Q/DQ ops with constant qparams export as QuantizeLinear/
        # DequantizeLinear and compute the same values.
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor(x, self._scale_f, self._zp_i, 0, 255, torch.uint8)
        return qd.dequantize_per_tensor(q, self._scale_f, self._zp_i, 0, 255, torch.uint8)


class QuantWrap(nn.Module):
    """A Conv2d or Linear with fake-quantized input and per-channel fake-quantized weight.

    Training fake-quantizes the float weight into ``[wq_min, wq_max]`` (straight-through gradients).
    In eval mode the weight is the integer tensor ``w_int`` (quantized offline, stored as INT8)
    dequantized per channel: the exporters emit that as an INT8 initializer feeding
    DequantizeLinear, the standard QDQ form every backend reads. The ONNX fake-quant range rule
    (only (-128,127), (0,127), (0,255)) then never sees the 7-bit range of the reduce-range scheme:
    7-bit weights are INT8 values that happen to lie in [-64, 63].
    """

    w_scale: torch.Tensor
    w_zero: torch.Tensor
    w_int: torch.Tensor
    module: nn.Conv2d | nn.Linear

    def __init__(self, module: nn.Module, wq_min: int = -128, wq_max: int = 127, momentum: float = 0.01) -> None:
        super().__init__()
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantWrap takes Conv2d or Linear, got {type(module).__name__}")
        if not -128 <= wq_min < 0 < wq_max <= 127:
            raise ValueError(f"QuantWrap: weight range [{wq_min}, {wq_max}] must lie within INT8 and hold 0")
        self.module = module
        self.act = FakeQuantAct(momentum)
        self.wq_min, self.wq_max = wq_min, wq_max
        out = module.weight.shape[0]
        self.register_buffer("w_scale", torch.ones(out))
        self.register_buffer("w_zero", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("w_int", torch.zeros(module.weight.shape, dtype=torch.int8))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Weight scales (symmetric, zero point 0) and the offline-quantized weight from the current weights."""
        w = self.module.weight.detach()
        amax = w.abs().reshape(w.shape[0], -1).amax(1)
        self.w_scale.copy_((amax / float(self.wq_max)).clamp(min=1e-12))
        scale = self.w_scale.reshape(-1, *([1] * (w.dim() - 1)))
        self.w_int.copy_(torch.round(w / scale).clamp(self.wq_min, self.wq_max).to(torch.int8))

    def train(self, mode: bool = True) -> QuantWrap:
        # Entering eval freezes the weight the deployed graph will hold: the last optimizer step came
        # after the last training forward, so the integer weight is re-derived here.
        super().train(mode)
        if not mode:
            self.refresh()
        return self

    def _eval_weight(self) -> torch.Tensor:
        if torch.jit.is_tracing():  # the legacy exporter: Q/DQ of on-grid values, which are exact in INT8
            w = self.w_int.to(self.w_scale.dtype) * self.w_scale.reshape(-1, *([1] * (self.w_int.dim() - 1)))
            return torch.fake_quantize_per_channel_affine(w, self.w_scale, self.w_zero, 0, -128, 127)
        qd = torch.ops.quantized_decomposed
        return qd.dequantize_per_channel(self.w_int, self.w_scale, self.w_zero, 0, -128, 127, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.refresh()
            w = torch.fake_quantize_per_channel_affine(self.module.weight, self.w_scale, self.w_zero, 0, self.wq_min,
                                                       self.wq_max)
        else:
            w = self._eval_weight()
        x = self.act(x)
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(x, w, self.module.bias)
        return F.linear(x, w, self.module.bias)


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _bn_pairs(model: nn.Module) -> list[list[str]]:
    """(conv, bn) names where a BatchNorm2d directly follows a Conv2d in a Sequential."""
    pairs = []
    for pname, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, ma), (b, mb) in itertools.pairwise(kids):
                if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d) and ma.out_channels == mb.num_features:
                    pre = f"{pname}." if pname else ""
                    pairs.append([pre + a, pre + b])
    return pairs


@torch.no_grad()
def _fold_bn(model: nn.Module, pairs: list[list[str]], numeric: bool) -> None:
    for c, b in pairs:
        conv, bn = _get(model, c), _get(model, b)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise PassError(f"quantize.qat: expected Conv2d/BatchNorm2d at {c}/{b}, found "
                            f"{type(conv).__name__}/{type(bn).__name__}")
        if bn.running_var is None or bn.running_mean is None:
            raise PassError(f"quantize.qat: {b} tracks no running statistics; cannot fold it into {c}")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
        if numeric:
            std = torch.sqrt(bn.running_var + bn.eps)
            g = bn.weight / std if bn.affine else 1.0 / std
            conv.weight.mul_(g.reshape(-1, 1, 1, 1))
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            conv.bias.copy_((conv.bias - bn.running_mean) * g + beta)
        _set(model, b, nn.Identity())


def _wrap(model: nn.Module, names: list[str], wq_min: int, wq_max: int, momentum: float) -> None:
    for n in names:
        _set(model, n, QuantWrap(_get(model, n), wq_min, wq_max, momentum))


@register_structure_hook(HOOK)
def _restore(module: nn.Module, data: Any) -> nn.Module:
    _fold_bn(module, data["folded_bn"], numeric=False)  # weights come from the state dict next
    _wrap(module, data["modules"], int(data["wq_min"]), int(data["wq_max"]), float(data["momentum"]))
    return module


def quant_wraps(model: nn.Module) -> list[QuantWrap]:
    return [m for m in model.modules() if isinstance(m, QuantWrap)]


# version 2: weights stored as offline-quantized INT8 (w_int) so every scheme exports as standard QDQ.
@register_pass(QuantizeQat, consumes="pytorch", produces="pytorch", version=2, training_fields=("epochs",))
def quantize_qat(art: Artifact, cfg: QuantizeQat, ctx: PassContext) -> Artifact:
    """Fold BN, insert fake quantization (QDQ on export), calibrate, then fine-tune on labelled data."""
    from compress.inputs.training import fit, top1

    data = require_data(ctx, "quantize.qat", labelled=True)
    model = clone_module(art)
    if quant_wraps(model):
        raise PassError("quantize.qat: the model already holds fake-quant modules (quantize.qat ran before); "
                        "run it once")
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not candidates:
        raise PassError(f"quantize.qat: {type(model).__name__} has no Conv2d or Linear layer to quantize")
    selected = cfg.skip.select(torch_layers(model), "quantize.qat", eligible=candidates)
    keep = set(expand(selected, candidates))
    if selected and not keep:
        raise RecipeError(f"quantize.qat: skip selects {', '.join(selected[:5])}, which hold no Conv2d/Linear "
                          f"layer (only those are quantized); use 'first', 'last' or some of: "
                          f"{', '.join(candidates[:40])}")
    names = [n for n in candidates if n not in keep]
    scheme, why = choose_scheme(cfg.scheme)
    wq_min, wq_max = (-64, 63) if scheme == "u8s8_reduce_range" else (-128, 127)
    calib = calibration_batches(data, cfg.calib_samples, "quantize.qat", 8, batch=cfg.batch_size)

    top1_float = top1(model, data, data.val)
    pairs = _bn_pairs(model)
    model.eval()
    _fold_bn(model, pairs, numeric=True)
    _wrap(model, names, wq_min, wq_max, cfg.momentum)
    model.eval()  # new wrappers start in training mode; calibration must observe min/max, not a moving average
    wraps = quant_wraps(model)
    for w in wraps:
        w.act.observe = True
    with torch.no_grad():
        for b in calib:
            model(torch.from_numpy(b))
    for w in wraps:
        w.act.observe = False
    top1_ptq = top1(model, data, data.val)
    curve = fit(model, data, cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=ctx.seed, progress=ctx.progress,
                desc="quantize.qat", heartbeat=ctx.log) if cfg.epochs else []
    for w in wraps:
        w.refresh()  # the last optimizer step came after the last training forward
    model.eval()
    top1_after = top1(model, data, data.val)
    from compress.inputs.training import predict

    # ONNX and torch may round a tie the other way, moving a value by one quantization step; export.onnx's
    # parity check needs this much slack (2% of the largest validation output) on a fake-quantized model.
    export_atol = max(1e-3, 0.02 * float(abs(predict(model, data, data.val)).max()))
    info = {"scheme": scheme, "scheme_reason": why, "quantized_modules": names, "kept_float": sorted(keep),
            "folded_bn": len(pairs), "epochs": cfg.epochs, "lr": cfg.lr, "top1_float": top1_float,
            "top1_fakequant_before_finetune": top1_ptq, "top1_fakequant_after": top1_after, "curve": curve,
            "export_atol": export_atol,
            "notes": [f"QAT scheme: {why}",
                      f"QAT fake-quantizes inputs and weights of {len(names)} Conv2d/Linear layer(s); "
                      "export.onnx turns them into QuantizeLinear/DequantizeLinear"]}
    step = {"hook": HOOK, "data": {"modules": names, "folded_bn": pairs, "wq_min": wq_min, "wq_max": wq_max,
                                   "momentum": cfg.momentum}}
    facts = art.known_facts().lower_precision("int8").evolve(quantization="qdq", lowering_atol=export_atol)
    return torch_artifact(model, art, ctx, structure_step=step, metadata={"quantize.qat": info}, facts=facts)
