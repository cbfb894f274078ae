"""Structured pruning of decoder language models: whole blocks (``prune.depth``) and widths (``prune.width``:
the MLP's intermediate size and whole key/value groups of attention heads), ranked on the run's calibration
text (``ctx.text``).

Why its own passes and not ``prune.channels``: a decoder's shapes live in its config (``num_hidden_layers``,
``intermediate_size``, ``num_key_value_heads``, ``head_dim``), which the ONNX export (onnxruntime-genai's
model builder, through ``save_pretrained``) and the KV cache (each attention's ``layer_idx``) read. These
passes edit the module and its config together and keep every block the same shape, so the pruned model
is again an ordinary Hugging Face model of its architecture: it saves, exports with its KV cache and
generates like the original.

Importance (measured, never weight magnitude alone):

* depth, ``importance = "cosine"``: ShortGPT's Block Influence, 1 - cos(block input, block output) averaged
  over calibration tokens; a block that barely turns the residual stream does little. ``"perplexity"``:
  the calibration perplexity with that one block left out (slower: one forward per block and window).
* MLP channels (Minitron): the root-mean-square of each intermediate activation (``act(gate(x)) * up(x)``,
  the input of ``down_proj``) over calibration tokens, times the norm of the ``down_proj`` column it feeds.
* key/value groups: the same for the attention output (the input of ``o_proj``), summed over the query
  heads that share each key/value head, so grouped-query attention keeps ``heads / kv_heads`` queries per
  group.

The structure is stored as a replayable step (``{"hook": ..., "data": ...}``, see ``compress.inputs.torch_io``),
so a cached pruned model rebuilds from the source folder and its weights.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from compress.core.artifact import Artifact
from compress.core.config import PassConfig
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import PassError, RecipeError
from compress.inputs.torch_io import clone_module, register_structure_hook, torch_artifact

DEPTH = "prune.depth"
WIDTH = "prune.width"


# ------------------------------------------------------------------------------------ decoder anatomy


def hf_lm(module: nn.Module) -> Any:
    """The ``*ForCausalLM`` inside the pipeline's wrapper (``compress.inputs.causal_lm.CausalLMModel``)."""
    from compress.inputs.causal_lm import CausalLMModel

    return module.model if isinstance(module, CausalLMModel) else module


def decoder_layers(module: nn.Module, where: str) -> nn.ModuleList:
    """The decoder's block list (``model.layers`` in Llama, Qwen2, Mistral, Phi-3, Gemma ...)."""
    base = getattr(hf_lm(module), "base_model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(hf_lm(module), "config"):
        raise PassError(f"{where}: {type(hf_lm(module)).__name__} has no decoder block list (model.layers); "
                        "only Hugging Face decoders laid out like Llama/Qwen2/Mistral can be pruned by block")
    return layers


def decoder_macs(module: nn.Module) -> dict[str, int]:
    """Multiply-accumulates per token of the matrix products: the blocks' linear layers and the LM head
    (attention's q.k and att.v products grow with the context and are left out, as in Minitron's counts)."""
    layers = decoder_layers(module, "macs")
    blocks = sum(m.weight.numel() for lay in layers for m in lay.modules() if isinstance(m, nn.Linear))
    head = hf_lm(module).get_output_embeddings()
    return {"blocks": int(blocks), "lm_head": int(head.weight.numel()) if head is not None else 0}


def _mlp(layer: nn.Module, where: str) -> Any:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj",
                                                                                     "down_proj")):
        raise PassError(f"{where}: the decoder block {type(layer).__name__} has no gated MLP "
                        "(mlp.gate_proj/up_proj/down_proj); its MLP width cannot be pruned")
    return mlp


def _attn(layer: nn.Module, where: str) -> Any:
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj",
                                                                                       "o_proj")):
        raise PassError(f"{where}: the decoder block {type(layer).__name__} has no separate q/k/v/o projections; "
                        "its attention heads cannot be pruned")
    return attn


def _calib(ctx: PassContext, where: str, windows: int) -> np.ndarray:
    text = ctx.text
    if text is None:
        raise PassError(f"{where} ranks by activations on calibration text; it runs on a causal LM "
                        "(model.task = \"causal-lm\") with data.source = \"builtin:pydoc-topics\" or text:FILE")
    return np.asarray(text.calib[:windows])


# ------------------------------------------------------------------------------------ depth


class DepthPrune(PassConfig):
    """Remove whole decoder blocks, the least important on calibration text first (ShortGPT, Minitron depth)."""

    kind: Literal["prune.depth"] = "prune.depth"
    blocks: int | None = Field(None, ge=1, description="how many blocks to remove")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the blocks to remove (rounded)")
    importance: Literal["cosine", "perplexity"] = "cosine"
    windows: int = Field(8, ge=1, le=4096, description="calibration windows the importance is measured on")

    @model_validator(mode="after")
    def _one(self) -> DepthPrune:
        if (self.blocks is None) == (self.ratio is None):
            raise ValueError("give exactly one of blocks (how many decoder blocks to remove) or ratio (a fraction)")
        return self

    def to_remove(self, n: int) -> int:
        return self.blocks if self.blocks is not None else round(n * (self.ratio or 0))

    def preflight(self, root: Artifact, text: Any) -> None:
        n = _root_config_value(root, "num_hidden_layers")
        if n is not None:
            _check_depth(self, n)


def _check_depth(cfg: DepthPrune, n: int) -> int:
    k = cfg.to_remove(n)
    if k >= n:
        raise RecipeError(f"{DEPTH}: removing {k} of the model's {n} decoder blocks leaves none; remove at most "
                          f"{n - 1} (blocks = {n - 1})")
    if k < 1:
        raise RecipeError(f"{DEPTH}{{ratio={cfg.ratio}}} removes no block of {n}; use a larger ratio or blocks = 1")
    return k


def _root_config_value(root: Artifact, name: str) -> int | None:
    """A value of the root model's config, read from its folder (None when the model is not a HF decoder)."""
    from compress.inputs.models import hf_dir

    folder = hf_dir(root)
    if folder is None or not (folder / "config.json").is_file():
        return None
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    v = cfg.get(name)
    return int(v) if isinstance(v, int) else None


def remove_blocks(module: nn.Module, removed: list[int]) -> nn.Module:
    """Drop the given blocks, renumber the rest (``layer_idx`` indexes the KV cache) and update the config."""
    layers = decoder_layers(module, DEPTH)
    gone = set(removed)
    keep = [lay for i, lay in enumerate(layers) if i not in gone]
    hf_lm(module).base_model.layers = nn.ModuleList(keep)
    for new_i, lay in enumerate(keep):
        for m in lay.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                setattr(m, "layer_idx", new_i)  # noqa: B010  (indexes the KV cache)
    cfg = hf_lm(module).config
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        cfg.layer_types = [t for i, t in enumerate(types) if i not in gone]
    if isinstance(getattr(cfg, "max_window_layers", None), int):
        cfg.max_window_layers = min(cfg.max_window_layers, len(keep))
    cfg.num_hidden_layers = len(keep)
    return module


@register_structure_hook(DEPTH)
def _replay_depth(module: nn.Module, data: Any) -> nn.Module:
    return remove_blocks(module, [int(i) for i in data["removed"]])


def _block_io(lay: nn.Module, store: dict[str, Any]) -> Any:
    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        store["in"] = args[0] if args else kwargs["hidden_states"]

    def post(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
        store["out"] = out[0] if isinstance(out, tuple) else out

    return [lay.register_forward_pre_hook(pre, with_kwargs=True), lay.register_forward_hook(post, with_kwargs=True)]


@torch.inference_mode()
def block_influence(module: nn.Module, windows: np.ndarray) -> list[float]:
    """ShortGPT's Block Influence per block: 1 - cosine(input, output) averaged over every calibration token."""
    layers = decoder_layers(module, DEPTH)
    sums = [0.0] * len(layers)
    n_tok = 0
    stores: list[dict[str, Any]] = [{} for _ in layers]
    handles = [h for lay, st in zip(layers, stores, strict=True) for h in _block_io(lay, st)]
    try:
        for w in windows:
            ids = torch.from_numpy(w[None].astype(np.int64))
            hf_lm(module)(input_ids=ids, use_cache=False)
            for i, st in enumerate(stores):
                cos = torch.nn.functional.cosine_similarity(st["in"].float(), st["out"].float(), dim=-1)
                sums[i] += float((1 - cos).sum())
            n_tok += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return [s / max(n_tok, 1) for s in sums]


@torch.inference_mode()
def _nll(module: nn.Module, windows: np.ndarray) -> float:
    total, n = 0.0, 0
    for w in windows:
        ids = torch.from_numpy(w[None].astype(np.int64))
        logits = hf_lm(module)(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return total / max(n, 1)


def leave_one_out_perplexity(module: nn.Module, windows: np.ndarray) -> list[float]:
    """Calibration perplexity with each block left out in turn (higher: the block matters more)."""
    lm = hf_lm(module)
    layers = decoder_layers(module, DEPTH)
    cfg = lm.config
    n = len(layers)
    out = []
    try:
        for i in range(n):
            lm.base_model.layers = nn.ModuleList([lay for j, lay in enumerate(layers) if j != i])
            cfg.num_hidden_layers = n - 1
            out.append(math.exp(_nll(module, windows)))
    finally:
        lm.base_model.layers = layers
        cfg.num_hidden_layers = n
    return out


@register_pass(DepthPrune, consumes="pytorch", produces="pytorch")
def prune_depth(art: Artifact, cfg: DepthPrune, ctx: PassContext) -> Artifact:
    """Remove the decoder blocks that change the residual stream least on calibration text."""
    model = clone_module(art)
    n = len(decoder_layers(model, DEPTH))
    try:
        k = _check_depth(cfg, n)
    except RecipeError as e:
        raise PassError(str(e)) from e
    windows = _calib(ctx, DEPTH, cfg.windows)
    macs0 = decoder_macs(model)
    ctx.log(f"{DEPTH}: scoring {n} blocks by {cfg.importance} on {len(windows)} calibration window(s)")
    if cfg.importance == "cosine":
        scores = block_influence(model, windows)
    else:
        scores = leave_one_out_perplexity(model, windows)
    removed = sorted(int(i) for i in np.argsort(np.asarray(scores), kind="stable")[:k])
    remove_blocks(model, removed)
    macs1 = decoder_macs(model)
    cut = 1 - macs1["blocks"] / macs0["blocks"]
    label = "block influence (1 - cos)" if cfg.importance == "cosine" else "perplexity without the block"
    notes = [f"{label} per block: " + ", ".join(f"{i}:{s:.4g}" for i, s in enumerate(scores)),
             f"removed blocks {removed} ({k} of {n}): {cut:.1%} fewer decoder-block MACs per token "
             f"({1 - sum(macs1.values()) / sum(macs0.values()):.1%} with the LM head)"]
    ctx.log(f"{DEPTH}: {notes[1]}")
    info = {"importance": cfg.importance, "scores": [float(s) for s in scores], "removed": removed,
            "blocks_before": n, "blocks_after": n - k, "macs_per_token_before": macs0,
            "macs_per_token_after": macs1, "block_macs_reduction": cut, "windows": len(windows), "notes": notes}
    return torch_artifact(model, art, ctx, structure_step={"hook": DEPTH, "data": {"removed": removed}},
                          metadata={DEPTH: info})


# ------------------------------------------------------------------------------------ width


class WidthPrune(PassConfig):
    """Shrink every decoder block's MLP intermediate size and/or key/value head groups by activation importance."""

    kind: Literal["prune.width"] = "prune.width"
    intermediate_size: int | None = Field(None, ge=1, description="the MLP width every block keeps")
    mlp_ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the MLP width removed")
    kv_heads: int | None = Field(None, ge=1, description="key/value head groups every block keeps (with their "
                                                         "query heads)")
    multiple_of: int = Field(32, ge=1, le=4096, description="the MLP width is a multiple of this (INT4 groups)")
    windows: int = Field(8, ge=1, le=4096, description="calibration windows the importance is measured on")

    @model_validator(mode="after")
    def _something(self) -> WidthPrune:
        if self.intermediate_size is not None and self.mlp_ratio is not None:
            raise ValueError("give intermediate_size or mlp_ratio, not both")
        if self.intermediate_size is None and self.mlp_ratio is None and self.kv_heads is None:
            raise ValueError("nothing to prune: give intermediate_size or mlp_ratio (MLP width) and/or kv_heads")
        return self

    def target_width(self, width: int) -> int | None:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp_ratio is not None:
            return max(self.multiple_of, int(width * (1 - self.mlp_ratio)) // self.multiple_of * self.multiple_of)
        return None

    def preflight(self, root: Artifact, text: Any) -> None:
        vals = {k: _root_config_value(root, k) for k in ("intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads")}
        if vals["intermediate_size"] is not None:
            _check_width(self, vals["intermediate_size"], vals["num_attention_heads"] or 1,
                         vals["num_key_value_heads"] or vals["num_attention_heads"] or 1)


def _check_width(cfg: WidthPrune, width: int, heads: int, kv: int) -> None:
    k = cfg.target_width(width)
    if k is not None:
        if k >= width:
            raise RecipeError(f"{WIDTH}: intermediate_size = {k} does not shrink the MLP (its width is {width}); "
                              f"give a width below {width}")
        if k % cfg.multiple_of:
            raise RecipeError(f"{WIDTH}: intermediate_size = {k} is not a multiple of {cfg.multiple_of} "
                              f"(multiple_of; INT4 packs the MLP in groups of that size); use "
                              f"{max(cfg.multiple_of, k // cfg.multiple_of * cfg.multiple_of)} or set multiple_of")
    if cfg.kv_heads is not None and cfg.kv_heads >= kv:
        raise RecipeError(f"{WIDTH}: kv_heads = {cfg.kv_heads} does not shrink attention (the model has {kv} "
                          f"key/value heads for {heads} query heads); give fewer than {kv}")


def _shrink_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
                   ) -> nn.Linear:
    w = lin.weight.data
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[out_idx] if out_idx is not None else lin.bias.data)
    return new


def shrink_mlp(module: nn.Module, keep: list[list[int]]) -> None:
    """Keep the given intermediate channels in each block's MLP (the same count in every block)."""
    for lay, idx in zip(decoder_layers(module, WIDTH), keep, strict=True):
        mlp = _mlp(lay, WIDTH)
        t = torch.as_tensor(idx, dtype=torch.long)
        mlp.gate_proj = _shrink_linear(mlp.gate_proj, out_idx=t)
        mlp.up_proj = _shrink_linear(mlp.up_proj, out_idx=t)
        mlp.down_proj = _shrink_linear(mlp.down_proj, in_idx=t)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    hf_lm(module).config.intermediate_size = len(keep[0])


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def shrink_kv_groups(module: nn.Module, keep: list[list[int]]) -> None:
    """Keep the given key/value heads, with the query heads that read them, in each block's attention."""
    cfg = hf_lm(module).config
    hd = _head_dim(cfg)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for lay, groups in zip(decoder_layers(module, WIDTH), keep, strict=True):
        attn = _attn(lay, WIDTH)
        kv_idx = torch.as_tensor([g * hd + i for g in groups for i in range(hd)], dtype=torch.long)
        q_idx = torch.as_tensor([(g * rep + r) * hd + i for g in groups for r in range(rep) for i in range(hd)],
                                dtype=torch.long)
        attn.q_proj = _shrink_linear(attn.q_proj, out_idx=q_idx)
        attn.k_proj = _shrink_linear(attn.k_proj, out_idx=kv_idx)
        attn.v_proj = _shrink_linear(attn.v_proj, out_idx=kv_idx)
        attn.o_proj = _shrink_linear(attn.o_proj, in_idx=q_idx)
        attn.head_dim = hd
        for a, v in (("num_heads", len(groups) * rep), ("num_key_value_heads", len(groups))):
            if isinstance(getattr(attn, a, None), int):
                setattr(attn, a, v)
    # The head width no longer follows from hidden_size / heads: it is written down.
    cfg.head_dim = hd
    cfg.num_key_value_heads = len(keep[0])
    cfg.num_attention_heads = len(keep[0]) * rep


@register_structure_hook(WIDTH)
def _replay_width(module: nn.Module, data: Any) -> nn.Module:
    n = len(decoder_layers(module, WIDTH))
    if data.get("intermediate_size") is not None:
        shrink_mlp(module, [list(range(int(data["intermediate_size"])))] * n)
    if data.get("kv_heads") is not None:
        shrink_kv_groups(module, [list(range(int(data["kv_heads"])))] * n)
    return module


@torch.inference_mode()
def _activation_rms(module: nn.Module, windows: np.ndarray, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """Root-mean-square over calibration tokens of each input feature of the given linear layers."""
    sums = [torch.zeros(lin.in_features, dtype=torch.float64) for lin in linears]
    count = [0]

    def hook(i: int) -> Any:
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[i] += x.pow(2).sum(0)
            if i == 0:
                count[0] += x.shape[0]
        return fn

    handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(linears)]
    try:
        for w in windows:
            hf_lm(module)(input_ids=torch.from_numpy(w[None].astype(np.int64)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(s / max(count[0], 1)).sqrt().float() for s in sums]


@register_pass(WidthPrune, consumes="pytorch", produces="pytorch")
def prune_width(art: Artifact, cfg: WidthPrune, ctx: PassContext) -> Artifact:
    """Shrink the MLP width and/or the key/value head groups of every decoder block by activation importance."""
    model = clone_module(art)
    hf_cfg = hf_lm(model).config
    layers = decoder_layers(model, WIDTH)
    width = int(hf_cfg.intermediate_size)
    heads, kv = int(hf_cfg.num_attention_heads), int(getattr(hf_cfg, "num_key_value_heads", None) or
                                                       hf_cfg.num_attention_heads)
    try:
        _check_width(cfg, width, heads, kv)
    except RecipeError as e:
        raise PassError(str(e)) from e
    windows = _calib(ctx, WIDTH, cfg.windows)
    macs0 = decoder_macs(model)
    notes: list[str] = []
    info: dict[str, Any] = {"windows": len(windows), "macs_per_token_before": macs0}
    k = cfg.target_width(width)
    if k is not None:
        downs = [_mlp(lay, WIDTH).down_proj for lay in layers]
        rms = _activation_rms(model, windows, downs)
        # Importance of a channel: how large it is on real text, times how much of it reaches the output.
        scores = [r * d.weight.detach().float().norm(dim=0) for r, d in zip(rms, downs, strict=True)]
        keep = [sorted(torch.topk(s, k).indices.tolist()) for s in scores]
        shrink_mlp(model, keep)
        info["intermediate_size"] = {"before": width, "after": k}
        notes.append(f"MLP intermediate size {width} -> {k} in every block (activation RMS x down_proj column norm)")
    if cfg.kv_heads is not None:
        hd, rep = _head_dim(hf_cfg), heads // kv
        os_ = [_attn(lay, WIDTH).o_proj for lay in layers]
        rms = _activation_rms(model, windows, os_)
        group_keep = []
        group_scores = []
        for r, o in zip(rms, os_, strict=True):
            ch = r * o.weight.detach().float().norm(dim=0)
            g = ch.reshape(kv, rep * hd).sum(1)  # the query heads of a group sit together (repeat_kv's layout)
            group_scores.append([float(x) for x in g])
            group_keep.append(sorted(torch.topk(g, cfg.kv_heads).indices.tolist()))
        shrink_kv_groups(model, group_keep)
        info["kv_heads"] = {"before": kv, "after": cfg.kv_heads, "heads_after": cfg.kv_heads * rep,
                            "group_scores": group_scores, "kept": group_keep}
        notes.append(f"attention {heads} heads / {kv} key-value groups -> {cfg.kv_heads * rep} / {cfg.kv_heads} in "
                     f"every block (head width {hd} kept)")
    macs1 = decoder_macs(model)
    cut = 1 - macs1["blocks"] / macs0["blocks"]
    notes.append(f"{cut:.1%} fewer decoder-block MACs per token ({1 - sum(macs1.values()) / sum(macs0.values()):.1%} "
                 "with the LM head)")
    for n in notes:
        ctx.log(f"{WIDTH}: {n}")
    info.update(macs_per_token_after=macs1, block_macs_reduction=cut, notes=notes)
    data = {"intermediate_size": k, "kv_heads": cfg.kv_heads}
    return torch_artifact(model, art, ctx, structure_step={"hook": WIDTH, "data": data}, metadata={WIDTH: info})
