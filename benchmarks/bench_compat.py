"""Compatibility matrix: architectures nobody here wrote, through prune -> export -> INT8 -> ONNX Runtime.

    python benchmarks/bench_compat.py                     # every model, writes benchmarks/results/compat.md
    python benchmarks/bench_compat.py --only bert,vit     # some of them (prints the table, writes nothing)

Each model is built from a ``transformers`` config (tiny sizes, random weights, no download) and
wrapped with its task head (compress.inputs.hf). Steps, each recorded as ``ok`` with its figure or as the
one-line reason it refused:

1. ``prune.channels{ratio=0.3}`` (defaults: whole heads for attention blocks with a stored head size)
2. ``export.onnx`` (of the pruned model, or of the original when pruning refused)
3. ``quantize.int8`` (static QDQ; images calibrated on digits resized to the model input, text on
   synthetic token ids), with its default fidelity guard
4. ``quantize.dynamic`` (defaults)
5. ONNX Runtime: each ONNX model run on 16 held-out inputs; per-sample cosine to the float ONNX model

Random weights say nothing about accuracy; the cosines show whether a step keeps the function.
Needs the ``hf`` extra (transformers).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compress.api import module_artifact  # noqa: E402
from compress.core.artifact import Artifact  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.manager import PassContext, PassManager  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.inputs.data import load_data  # noqa: E402
from compress.quality.fidelity import compare_outputs  # noqa: E402
from compress.stages.recipe import DataSpec  # noqa: E402

PRUNE_RATIO = 0.3


def _configs() -> dict[str, tuple[Callable[[], Any], str, tuple[int, ...]]]:
    """name -> (config factory, task, input shape)."""
    import transformers as T

    img = 64
    return {
        "BERT": (lambda: T.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128), "embedding", (1, 32)),
        "DistilBERT": (lambda: T.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                  max_position_embeddings=128), "embedding", (1, 32)),
        "ViT": (lambda: T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10),
                "image-classification", (1, 3, 32, 32)),
        "ResNet": (lambda: T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                          layer_type="basic", num_labels=10), "image-classification", (1, 3, img, img)),
        "MobileNetV2": (lambda: T.MobileNetV2Config(image_size=img, depth_multiplier=0.35, num_labels=10),
                        "image-classification", (1, 3, img, img)),
        # hidden_dim is the top BatchNorm's width: round_filters(1280) at this width_coefficient.
        "EfficientNet": (lambda: T.EfficientNetConfig(image_size=img, width_coefficient=0.25, depth_coefficient=0.25,
                                                      hidden_dim=320, num_labels=10), "image-classification",
                         (1, 3, img, img)),
        "ConvNeXt": (lambda: T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=img,
                                              num_labels=10), "image-classification", (1, 3, img, img)),
        "RegNet": (lambda: T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                          groups_width=8, num_labels=10), "image-classification", (1, 3, img, img)),
        "Swin": (lambda: T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                      window_size=4, num_labels=10), "image-classification", (1, 3, 32, 32)),
        "MobileViT": (lambda: T.MobileViTConfig(image_size=img, hidden_sizes=[32, 48, 64],
                                                neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10),
                      "image-classification", (1, 3, img, img)),
        # Second round (issue 31): the architectures a new user tried, then ten more.
        "DeiT": (lambda: T.DeiTConfig(image_size=img, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, num_labels=10),
                 "image-classification", (1, 3, img, img)),
        "DINOv2": (lambda: T.Dinov2Config(image_size=img, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128, num_labels=10),
                   "image-classification", (1, 3, img, img)),
        "LeViT": (lambda: T.LevitConfig(image_size=img, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
                                        depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10),
                  "image-classification", (1, 3, img, img)),
        # depth must exceed the stage index: transformers 5.25 indexes a stage's drop-path list by stage.
        "CvT": (lambda: T.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=10),
                "image-classification", (1, 3, img, img)),
        "PvTv2": (lambda: T.PvtV2Config(image_size=img, hidden_sizes=[16, 32, 48, 64],
                                        num_attention_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], num_labels=10),
                  "image-classification", (1, 3, img, img)),
        "ConvNeXtV2": (lambda: T.ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                  num_labels=10), "image-classification", (1, 3, img, img)),
        "FocalNet": (lambda: T.FocalNetConfig(image_size=img, embed_dim=16, depths=[1, 1, 1, 1], num_labels=10),
                     "image-classification", (1, 3, img, img)),
        "PoolFormer": (lambda: T.PoolFormerConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                  num_labels=10), "image-classification", (1, 3, img, img)),
        # num_groups=32 GroupNorm everywhere: bottleneck widths of 32 (hidden 128 / 4) are one channel per group.
        "BiT": (lambda: T.BitConfig(embedding_size=32, hidden_sizes=[128, 128, 128, 128], depths=[1, 1, 1, 1],
                                    num_labels=10), "image-classification", (1, 3, img, img)),
        "MobileNetV1": (lambda: T.MobileNetV1Config(image_size=img, depth_multiplier=0.25, num_labels=10),
                        "image-classification", (1, 3, img, img)),
        "RoBERTa": (lambda: T.RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=128), "embedding", (1, 32)),
        "ALBERT": (lambda: T.AlbertConfig(vocab_size=1000, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128,
                                          max_position_embeddings=128), "embedding", (1, 32)),
        "ELECTRA": (lambda: T.ElectraConfig(vocab_size=1000, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=128), "embedding", (1, 32)),
        "MPNet": (lambda: T.MPNetConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=128), "embedding", (1, 32)),
        "DeBERTaV2": (lambda: T.DebertaV2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=128), "embedding", (1, 32)),
        "BEiT": (lambda: T.BeitConfig(image_size=img, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, num_labels=10),
                 "image-classification", (1, 3, img, img)),
        "SegFormer": (lambda: T.SegformerConfig(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 2, 2],
                                                depths=[1, 1, 1, 1], decoder_hidden_size=64, num_labels=10),
                      "image-classification", (1, 3, img, img)),
        "MobileViTV2": (lambda: T.MobileViTV2Config(image_size=img, width_multiplier=0.5, num_labels=10),
                        "image-classification", (1, 3, img, img)),
        "Swinv2": (lambda: T.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                          window_size=4, num_labels=10), "image-classification", (1, 3, 32, 32)),
        "SwiftFormer": (lambda: T.SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48],
                                                    num_labels=10), "image-classification", (1, 3, img, img)),
    }


MODELS = ("BERT", "DistilBERT", "ViT", "ResNet", "MobileNetV2", "EfficientNet", "ConvNeXt", "RegNet", "Swin",
          "MobileViT")
# Issue 31: the ten a new user tried (README and this matrix named none of them), then ten more.
MODELS_2 = ("DeiT", "DINOv2", "LeViT", "CvT", "PvTv2", "ConvNeXtV2", "FocalNet", "PoolFormer", "BiT", "MobileNetV1",
            "RoBERTa", "ALBERT", "ELECTRA", "MPNet", "DeBERTaV2", "BEiT", "SegFormer", "MobileViTV2", "Swinv2",
            "SwiftFormer")
ALL_MODELS = MODELS + MODELS_2


_FALLBACKS: list[tuple[str, dict[str, Any]]] = [
    # The fixed batch exports but misses the fp32 parity bound by float rounding: the message says "raise atol".
    ("with a fixed batch: ONNX output differs from PyTorch", {"dynamic_batch": False, "atol": 1e-2}),
    ("export.onnx{dynamic_batch=false} exports it", {"dynamic_batch": False}),
    ("export.onnx{dynamo=false} (the legacy", {"dynamo": False}),
    ("export.onnx{dynamo=false, dynamic_batch=false} exports it", {"dynamo": False, "dynamic_batch": False}),
]


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    # Head and tail: what failed, and the advice at the end of the line.
    return (s if len(s) <= 700 else f"{s[:300]} ... {s[-400:]}") if s else type(e).__name__


def _step(art: Artifact, cfg: Any, ctx: PassContext) -> Artifact:
    out, _ = PassManager([cfg]).run(art, ctx)
    return out


def _feeds(art: Artifact, data: Any, n: int = 16) -> list[dict[str, np.ndarray]]:
    """Held-out inputs: the validation split (images) or synthetic token ids and masks (text)."""
    from compress.passes._quant_common import guard_feeds

    feeds, _ = guard_feeds(art, data, n=n, batch=1)
    return feeds


def _ort(path: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, float]:
    """First output over ``feeds`` and the median latency (ms) of one call, 1 thread."""
    from compress.passes._quant_common import ort_session

    sess = ort_session(path)
    outs, times = [], []
    for f in feeds:
        t0 = time.perf_counter()
        outs.append(np.asarray(sess.run(None, f)[0], dtype=np.float32))
        times.append(1000 * (time.perf_counter() - t0))
    return np.concatenate(outs), float(np.median(times[1:] or times))


def _tvm_untuned(onnx_art: Artifact, feeds: list[dict[str, np.ndarray]], ref: np.ndarray,
                 ctx: PassContext) -> dict[str, Any]:
    """The float ONNX model built by TVM untuned (where it builds): cosine to ONNX Runtime FP32, median ms."""
    from compress.targets.tvm_compiler import TvmConfig, TvmTarget

    t = TvmTarget(TvmConfig(tuning_trials=0, emulate="off"))
    why = t.unavailable_reason()
    if why is not None:
        return {"ok": False, "why": f"not run: {why}"}
    try:
        runner = t.runner(t.compile(onnx_art, ctx), threads=1)
        outs, times = [], []
        for f in feeds:
            t0 = time.perf_counter()
            outs.append(np.asarray(runner.infer(f)[0], dtype=np.float32))
            times.append(1000 * (time.perf_counter() - t0))
        c = compare_outputs(ref, np.concatenate(outs), "embedding")
        return {"ok": True, "cos_worst": c["cosine_worst"], "ms": float(np.median(times[1:] or times))}
    except Exception as e:  # a refusal or a failed build is the result for this column
        return {"ok": False, "why": _one_line(e)}


def run_model(name: str, cache_dir: Path, tvm: bool = True) -> dict[str, Any]:
    """Push one architecture through the steps; a dict of per-step results (ok figure or refusal)."""
    import torch
    from compress.passes.export_onnx import ExportOnnx
    from compress.passes.prune_channels import ChannelPrune
    from compress.passes.quantize_dynamic import QuantizeDynamic
    from compress.passes.quantize_int8 import QuantizeInt8

    from compress.inputs.hf import from_config, input_specs

    make_cfg, task, shape = _configs()[name]
    rec: dict[str, Any] = {"model": name, "task": task, "input": list(shape)}
    cache = Cache(cache_dir)
    torch.manual_seed(0)
    config = make_cfg()
    module = from_config(config, task)
    rec["params"] = int(sum(p.numel() for p in module.parameters()))
    specs = input_specs(config, task, shape)
    root = module_artifact(module, shape, cache, inputs=specs)
    data = None if task in ("embedding",) else load_data(DataSpec(source="builtin:digits"), shape)
    ctx = PassContext(cache=cache, data=data, seed=0, progress=False, original=root)

    src = root
    t0 = time.perf_counter()
    try:
        try:
            pruned = _step(root, ChannelPrune(ratio=PRUNE_RATIO), ctx)
        except CompressError as e:
            # The refusal names a skip list that avoids it: follow it so the rest of the model is still tested.
            m = re.search(r"skip = (\[[^\]]*\])\s*(\(|$)", " ".join(str(e).split()))  # whole: lists run long
            if m is None:
                raise
            rec["prune_default"] = _one_line(e)
            rec["prune_keep_checked"] = "(checked: pruning goes through with it)" in str(e)
            pruned = _step(root, ChannelPrune(ratio=PRUNE_RATIO, skip=ast.literal_eval(m.group(1))), ctx)
        meta = pruned.metadata["prune.channels"]
        heads = meta.get("heads_after")
        rec["prune"] = {"ok": True, "macs_ratio": meta["macs_ratio"], "params_ratio": meta["params_ratio"],
                        "heads": (f"{sum(meta['heads_before'].values())}->{sum(heads.values())}" if heads else None)}
        src = pruned
    except CompressError as e:
        rec["prune"] = {"ok": False, "why": _one_line(e)}
    rec["prune"]["s"] = round(time.perf_counter() - t0, 1)

    of = "pruned" if src is not root else "original"
    try:
        onnx_art = _step(src, ExportOnnx(), ctx)
        em = onnx_art.metadata["export.onnx"]
        rec["export"] = {"ok": True, "of": of, "cosine": em["cosine"]}
        if em.get("static_batch_fallback"):  # the pass fell back to a fixed batch by itself, and said why
            rec["export"]["auto_static"] = em["static_batch_fallback"]
    except CompressError as e:
        rec["export"] = {"ok": False, "why": _one_line(e)}
        # The message names a setting that exports; the matrix follows it so the later steps are tested too.
        fb = next((opts for text, opts in _FALLBACKS if text in rec["export"]["why"]), None)
        if fb is None:
            return rec
        try:
            onnx_art = _step(src, ExportOnnx(**fb), ctx)
        except CompressError as e2:
            rec["export"]["fallback_failed"] = _one_line(e2)
            return rec
        rec["export"].update(fallback=", ".join(f"{k}={str(v).lower()}" for k, v in fb.items()), of=of,
                             cosine=onnx_art.metadata["export.onnx"]["cosine"])

    feeds = _feeds(onnx_art, data)
    ref, ms = _ort(onnx_art.path / "model.onnx", feeds)
    rec["ort_fp32"] = {"ok": True, "ms": ms}
    rec["tvm"] = _tvm_untuned(onnx_art, feeds, ref, ctx) if tvm else {"ok": False, "why": "not run (--no-tvm)"}
    for key, kind, opts in (("int8", QuantizeInt8, {"samples": 32}), ("dynamic", QuantizeDynamic, {})):
        cfg = kind(**opts)
        try:
            q = _step(onnx_art, cfg, ctx)
        except CompressError as e:
            rec[key] = {"ok": False, "why": _one_line(e), "full": " ".join(str(e).split())}
            # A refused INT8 names a skip checked to pass: follow it so the matrix shows the advice works.
            m = re.search(r"skip = (\[[^\]]*\]) passes both checks", " ".join(str(e).split()))
            if m is None:
                continue
            rec[f"{key}_default"] = rec[key]["why"]
            try:
                q = _step(onnx_art, kind(**opts, skip=ast.literal_eval(m.group(1))), ctx)
            except CompressError as e2:
                rec[key] = {"ok": False, "why": f"advice followed, still refused: {_one_line(e2)}"}
                continue
        try:
            got, qms = _ort(q.path / "model.onnx", feeds)
            c = compare_outputs(ref, got, "embedding")
            rec[key] = {"ok": True, "cos_mean": c["cosine_mean"], "cos_worst": c["cosine_worst"], "ms": qms}
        except Exception as e:  # an ORT failure at run time is a result too
            rec[key] = {"ok": False, "why": f"onnxruntime: {_one_line(e)}"}
    return rec


def bert_latency(seq: int = 128, n_sent: int = 32, threads: int = 0, cache_dir: Path | None = None) -> list[str]:
    """A BERT-base-shaped encoder (random weights) at sequence ``seq``, batch 1: PyTorch FP32 vs the artifacts.

    Latency does not depend on the weights; the cosines do, so they are on random weights and synthetic
    token ids here (no pretrained encoder is available offline), which says the steps keep the function,
    not what a trained encoder would score.
    """
    import os

    import torch
    import transformers as T
    from compress.passes.export_onnx import ExportOnnx
    from compress.passes.prune_channels import ChannelPrune
    from compress.passes.quantize_dynamic import QuantizeDynamic

    from compress.inputs.hf import from_config, input_specs
    from compress.measuring.measure import measure_interleaved

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load0 = os.getloadavg()
    cfg = T.BertConfig()  # bert-base: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522
    module = from_config(cfg, "embedding")
    specs = input_specs(cfg, "embedding", (1, seq))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(cache_dir or Path(tmp) / "c")
        root = module_artifact(module, (1, seq), cache, inputs=specs)
        ctx = PassContext(cache=cache, seed=0, progress=False, original=root)
        arts: dict[str, Artifact] = {}
        arts["ORT FP32"] = _step(root, ExportOnnx(), ctx)
        arts["ORT dynamic INT8 (defaults: per-channel)"] = _step(arts["ORT FP32"], QuantizeDynamic(), ctx)
        arts["ORT dynamic INT8 per-tensor"] = _step(arts["ORT FP32"], QuantizeDynamic(per_channel=False), ctx)
        pruned = _step(root, ChannelPrune(ratio=0.5), ctx)
        arts["prune heads 0.5 + ORT dynamic INT8"] = _step(_step(pruned, ExportOnnx(), ctx), QuantizeDynamic(), ctx)
        from compress.passes._quant_common import ort_session

        g = np.random.default_rng(0)
        sents = []
        for _ in range(n_sent):
            n = int(g.integers(8, seq + 1))  # real-looking lengths: padded to seq
            ids = np.zeros((1, seq), np.int64)
            ids[0, :n] = g.integers(1000, cfg.vocab_size, n)
            mask = np.zeros((1, seq), np.int64)
            mask[0, :n] = 1
            sents.append({"input_ids": ids, "attention_mask": mask})
        with torch.inference_mode():
            ref = np.concatenate([module(*(torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask"))).numpy()
                                  for f in sents])
        sessions = {k: ort_session(a.path / "model.onnx", threads=threads) for k, a in arts.items()}
        rows = []
        f0 = sents[0]
        fns: dict[str, Callable[[], object]] = {"PyTorch FP32": lambda: module(
            torch.from_numpy(f0["input_ids"]), torch.from_numpy(f0["attention_mask"]))}
        for k, sess in sessions.items():
            fns[k] = (lambda s=sess: s.run(None, f0))
        with torch.inference_mode():
            samples = measure_interleaved(fns, warmup=3, min_runs=30, min_time_s=5.0, max_time_s=60.0)
        base = float(np.median(samples["PyTorch FP32"]))
        ratios = {k: float(np.median(samples[k])) / base for k in fns if k != "PyTorch FP32"}
        cosines: dict[str, dict[str, Any]] = {}
        for k in fns:
            med = float(np.median(samples[k]))
            if k == "PyTorch FP32":
                cos = "1 (reference)"
            else:
                got = np.concatenate([sessions[k].run(None, f)[0] for f in sents])
                c = compare_outputs(ref, got, "embedding")
                cosines[k] = c
                cos = f"{c['cosine_mean']:.4f} / {c['cosine_worst']:.4f}"
            rows.append(f"| {k} | {med:.2f} | {med / base:.2f} | {cos} |")
    # The best artifact is the fastest that keeps the function (on these weights): cosine >= 0.99 / 0.97.
    faithful = [k for k in ratios if cosines[k]["cosine_mean"] >= 0.99 and cosines[k]["cosine_worst"] >= 0.97]
    best = min(faithful or ratios, key=lambda k: ratios[k])
    goal = (f"Goal (best artifact <= 0.5x PyTorch FP32 latency, BERT at seq {seq}, batch 1): "
            f"{'met' if ratios[best] <= 0.5 else 'not met'} for latency by {best} at {ratios[best]:.2f}x "
            "(the fastest artifact with cosine >= 0.99 mean and >= 0.97 worst to PyTorch FP32 on these weights; "
            "pruning heads without distillation does not keep the function). "
            "The fidelity half (pooled-embedding cosine >= 0.99 mean, >= 0.97 worst on real sentences) is not "
            "measured: it needs a pretrained sentence encoder and real sentences, and none is available offline "
            "here; the cosines below are on random weights.")
    load1 = os.getloadavg()
    return [f"## BERT-base-shaped encoder, seq {seq}, batch 1, {threads} thread(s)", "", goal, "",
            f"Load average (1 min) {load0[0]:.1f} at the start and {load1[0]:.1f} at the end, on "
            f"{os.cpu_count()} cores: the machine was shared, and PyTorch's thread pool suffers more from that than "
            "ONNX Runtime with spinning off, so the ratios are not what a quiet machine gives.", "",
            "Random weights (no pretrained encoder is available offline), mean-pooled embedding; latency is the "
            "median of interleaved calls; cosine is per sample against PyTorch FP32 on "
            f"{n_sent} synthetic padded sequences (token ids within the vocabulary), mean / worst.", "",
            "| artifact | median ms | x PyTorch FP32 | cosine mean / worst |", "|---|---|---|---|", *rows, ""]


def _cell(r: dict[str, Any] | None, fmt: Callable[[dict[str, Any]], str]) -> str:
    if r is None:
        return "not reached"
    if not r.get("ok"):
        return f"**refused**: {r['why']}".replace("|", "/")
    return fmt(r)


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | task | params | prune.channels (ratio 0.3) | export.onnx | quantize.int8 (cos mean / worst) | "
           "quantize.dynamic (cos mean / worst) | ORT ms fp32 / int8 / dynamic | TVM untuned fp32 (cos worst, ms) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "crash" in r:
            out.append(f"| {r['model']} | {r.get('task', '-')} | - | **crashed**: {r['crash']} | | | | | |")
            continue
        prune = _cell(r.get("prune"), lambda p: f"ok: MACs x{p['macs_ratio']:.2f}"
                      + (f", heads {p['heads']}" if p.get("heads") else ""))
        if r.get("prune_default") and r.get("prune", {}).get("ok"):
            prune = f"**default refused**: {r['prune_default']} -> followed: {prune}".replace("|", "/")
        ex = r.get("export")
        if ex is not None and not ex["ok"] and ex.get("fallback"):
            export = (f"**default refused**: {ex['why']} -> followed: ok with {ex['fallback']} ({ex['of']}), "
                      f"cos {ex['cosine']:.5f}").replace("|", "/")
        else:
            export = _cell(ex, lambda p: f"ok ({p['of']}), cos {p['cosine']:.5f}"
                           + (f"; fixed batch by itself: {p['auto_static'][:160]}" if p.get("auto_static") else ""))
            export = export.replace("|", "/")
        q8 = _cell(r.get("int8"), lambda p: f"ok: {p['cos_mean']:.4f} / {p['cos_worst']:.4f}")
        if r.get("int8_default") and r.get("int8", {}).get("ok"):
            q8 = f"**default refused**: {r['int8_default']} -> followed: {q8}".replace("|", "/")
        qd = _cell(r.get("dynamic"), lambda p: f"ok: {p['cos_mean']:.4f} / {p['cos_worst']:.4f}")
        ms = [r.get(k, {}).get("ms") for k in ("ort_fp32", "int8", "dynamic")]
        lat = " / ".join("-" if m is None else f"{m:.2f}" for m in ms)
        tvm = _cell(r.get("tvm"), lambda p: f"ok: {p['cos_worst']:.5f}, {p['ms']:.2f} ms")
        out.append(f"| {r['model']} | {r['task']} | {r['params']:,} | {prune} | {export} | {q8} | {qd} | {lat} "
                   f"| {tvm} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(ALL_MODELS))
    ap.add_argument("--round", choices=("1", "2"), default="1",
                    help="1: the first ten (writes results/compat.md); 2: issue 31's twenty (results/compat-2.md)")
    ap.add_argument("--no-tvm", action="store_true", help="skip the untuned TVM column (slow to build)")
    ap.add_argument("--bert-latency", action="store_true",
                    help="only the BERT-base latency/cosine comparison; writes benchmarks/results/compat-bert-tN.md")
    ap.add_argument("--threads", type=int, default=0, help="threads for --bert-latency (0: all cores)")
    ap.add_argument("--cache", type=Path, help="cache folder for --bert-latency (reruns reuse its artifacts)")
    a = ap.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_compat needs transformers: pip install 'compress-pipeline[hf]'", file=sys.stderr)
        return 2
    if a.bert_latency:
        t0 = time.perf_counter()
        lines = bert_latency(threads=a.threads, cache_dir=a.cache)
        print("\n".join(lines))
        from compress.core.fingerprint import machine_fingerprint

        m = machine_fingerprint()
        import os

        nt = a.threads or os.cpu_count() or 1
        doc = [f"# BERT-base latency and fidelity, {nt} thread(s)", "",
               "- Command: `python benchmarks/bench_compat.py --bert-latency"
               f"{f' --threads {a.threads}' if a.threads else ''}`",
               f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; total wall time "
               f"{time.perf_counter() - t0:.0f} s",
               f"- Machine: {m['cpu']['model']}, {m['cpu']['cores']} cores, ISA {', '.join(m['cpu']['isa'])} "
               "(shared with other jobs while it ran)", "", *lines]
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"compat-bert-t{nt}.md").write_text("\n".join(doc))
        return 0
    chosen = MODELS if a.round == "1" else MODELS_2
    names = [n.strip() for n in a.only.split(",")] if a.only else list(chosen)
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}; choose from {', '.join(ALL_MODELS)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            t0 = time.perf_counter()
            try:
                rows.append(run_model(n, Path(tmp) / "cache", tvm=not a.no_tvm))
            except Exception as e:  # a crash is a result of the matrix too: recorded, never hidden
                traceback.print_exc()
                rows.append({"model": n, "crash": f"{type(e).__name__}: {_one_line(e)}"})
            print(f"{n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    lines = table(rows)
    print("\n".join(lines))
    if a.only:
        return 0
    from compress.core.fingerprint import machine_fingerprint

    m = machine_fingerprint()
    through = [r["model"] for r in rows if all(r.get(k, {}).get("ok") for k in ("prune", "int8"))
               and (r.get("export", {}).get("ok") or r.get("export", {}).get("fallback"))]
    refused = [r["model"] for r in rows if r["model"] not in through]
    doc = [
        "# Compatibility matrix: models nobody here wrote",
        "",
        f"- Command: `python benchmarks/bench_compat.py{' --round 2' if a.round == '2' else ''}"
        f"{' --no-tvm' if a.no_tvm else ''}`",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; total wall time {time.perf_counter() - t_start:.0f} s",
        f"- Machine: {m['cpu']['model']}, {m['cpu']['cores']} cores, ISA {', '.join(m['cpu']['isa'])}; "
        + ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items()),
        "- Models: built from `transformers` configs, tiny sizes, **random weights** (no download); text models take "
        "token ids + attention mask (seq 32) and output a mean-pooled embedding, vision models 10-class logits. "
        "Cosines are per sample, quantized ONNX vs float ONNX, on 16 held-out inputs (validation digits resized "
        "for images, synthetic token ids for text); latency is a 1-thread median of 15 calls, indicative only "
        "(shared machine).",
        "",
        f"Headline: {len(through)} of {len(rows)} architectures go through prune -> export (default, or the fallback "
        f"its error names) -> INT8 -> ONNX Runtime "
        f"({', '.join(through) or 'none'}); "
        + (f"the matrix says which step refuses the others and why ({', '.join(refused)})." if refused else
           "none refuses.")
        + (f" Dynamic INT8 goes through on {sum(bool(r.get('dynamic', {}).get('ok')) for r in rows)} of {len(rows)}; "
           f"prune.channels is refused with no skip that helps on "
           f"{', '.join(r['model'] for r in rows if not r.get('prune', {}).get('ok')) or 'none'} (the rest run "
           "unpruned).")
        + (" TVM not run (--no-tvm)." if a.no_tvm else
           f" TVM (untuned, float model, cosine to ONNX Runtime FP32) builds "
           f"{sum(bool(r.get('tvm', {}).get('ok')) for r in rows)} of {len(rows)}."),
        "",
        *lines,
        "",
    ]
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / ("compat.md" if a.round == "1" else "compat-2.md")
    out.write_text("\n".join(doc))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
