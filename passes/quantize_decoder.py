"""Weight-only INT4/INT8 of a decoder language model's MatMuls (``quantize.weight_only`` on a model whose
facts name a decoder with its KV cache), with ONNX Runtime's MatMulNBits quantizer.

What differs from the plain pass, and why:
* the tied embedding's ``Gather`` is never touched: only MatMul weights are packed (NNCF's ONNX backend
  packed the embedding into a MatMulNBits fed by int64 ids, which ONNX Runtime refuses: issue 29);
* GPTQ (the project's own, ``decoder_gptq.py``; ONNX Runtime's compensates nothing) is calibrated on the run's
  own calibration windows (never the held-out ones), fed with an empty KV cache, so the activations it sees are
  the prefill's; ``int8_fraction`` keeps its most sensitive layers at INT8;
* settings are checked in the plan from the model's config (``check_settings``), before any export;
* the LM head may stay at 8 bits (``head_bits``): it is the largest and most output-sensitive MatMul;
* the result is saved with its weights in an external data file: a model over 2 GB cannot be one
  protobuf;
* parity is judged as a decoder is used: next-token agreement and KL against the input model on
  calibration windows, recorded in the artifact (the run's fidelity on held-out text is the verdict).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.core.artifact import Artifact, sha256_files
from compress.core.layers import onnx_layers
from compress.core.manager import PassContext
from compress.errors import PassError


def check_settings(cfg: Any, root: Any, text: Any) -> None:
    """The plan's check (before any export): decoder-only settings on a model that is not a causal LM, a format
    a decoder cannot use, a group wider than a layer of the model's config (one line, exit 2)."""
    from compress.errors import RecipeError
    from compress.inputs.causal_lm import CAUSAL_LM
    from compress.inputs.models import hf_dir

    if root.metadata.get("task") != CAUSAL_LM and root.known_facts().decoder is None:
        if cfg.algorithm != "rtn" or cfg.head_bits is not None or cfg.embedding_bits is not None:
            raise RecipeError(f"quantize.weight_only: algorithm={cfg.algorithm!r}, head_bits and embedding_bits "
                              "apply to decoder language models (model.task = \"causal-lm\"); use the defaults "
                              "for this model")
        return
    if cfg.format != "matmulnbits":
        raise RecipeError("quantize.weight_only on a decoder needs format = \"matmulnbits\" (ONNX Runtime's packed "
                          "kernel is what makes decoding faster)")
    if cfg.algorithm == "gptq" and text is None:
        raise RecipeError("quantize.weight_only{algorithm=\"gptq\"} calibrates on text: set data.source = "
                          "\"builtin:pydoc-topics\" or text:FILE")
    folder = hf_dir(root)
    if folder is None or not (folder / "config.json").is_file():
        return  # an ONNX decoder as the source: the pass checks its MatMuls when it runs
    import json

    c = json.loads((folder / "config.json").read_text())
    c = c.get("text_config", c)
    hidden, heads = c.get("hidden_size"), c.get("num_attention_heads")
    widths = {"hidden_size": hidden, "intermediate_size": c.get("intermediate_size"),
              "attention width (heads x head_dim)": (c.get("head_dim") or (hidden // heads)) * heads
              if isinstance(hidden, int) and isinstance(heads, int) else None}
    bad = {k: v for k, v in widths.items() if isinstance(v, int) and v < cfg.group_size}
    if bad:
        k, v = min(bad.items(), key=lambda kv: kv[1])
        raise RecipeError(f"quantize.weight_only: group_size = {cfg.group_size} is wider than the model's {k} "
                          f"({v}), the input width of its MatMul layers; choose group_size <= {v} (a power of two; "
                          "one that does not divide a width gets a padded last block)")


def _prefill_feeds(windows: np.ndarray, decoder: Any, model: Any) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration feeds: the run's calibration windows as prefills with an empty KV cache, in the dtype of
    the model's past inputs, with position ids where the graph takes them."""
    from onnx import TensorProto

    kinds = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    kv = np.float16 if kinds.get("past_key_values.0.key") == TensorProto.FLOAT16 else np.float32
    z = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), kv)
    feeds = []
    for w in windows:
        f: dict[str, np.ndarray] = {"input_ids": w[None].astype(np.int64),
                                    "attention_mask": np.ones((1, len(w)), np.int64)}
        if "position_ids" in kinds:
            f["position_ids"] = np.arange(len(w), dtype=np.int64)[None]
        for i in range(decoder.layers):
            f[f"past_key_values.{i}.key"] = z
            f[f"past_key_values.{i}.value"] = z
        feeds.append(f)
    return feeds


def _algo(cfg: Any, decoder: Any, bits: int) -> Any:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if cfg.algorithm == "hqq":
        return mq.HQQWeightOnlyQuantConfig(block_size=cfg.group_size, bits=cfg.bits, quant_format=QuantFormat.QOperator,
                                           op_types_to_quantize=("MatMul",))
    return mq.DefaultWeightOnlyQuantConfig(block_size=cfg.group_size, is_symmetric=cfg.symmetric, bits=bits,
                                           accuracy_level=cfg.accuracy_level, quant_format=QuantFormat.QOperator,
                                           op_types_to_quantize=("MatMul",))


def _gptq(model: Any, cfg: Any, ctx: PassContext, decoder: Any, skip: list[str]) -> list[str]:
    """GPTQ of every MatMul but ``skip``, calibrated on the run's first ``calib_windows`` calibration windows;
    returns the layers packed at INT8 (``int8_fraction``)."""
    from .decoder_gptq import gptq_model

    text = ctx.text
    if text is None:
        raise PassError("quantize.weight_only{algorithm=\"gptq\"} needs calibration text (data.source = "
                        "\"builtin:pydoc-topics\" or text:FILE)")
    feeds = _prefill_feeds(text.calib[:cfg.calib_windows], decoder, model)
    wide = gptq_model(model, feeds, cfg.bits, cfg.group_size, cfg.symmetric, cfg.accuracy_level, skip, log=ctx.log,
                      int8_fraction=cfg.int8_fraction)
    if wide:
        ctx.log(f"quantize.weight_only: {len(wide)} layer(s) at INT8 (largest INT4 output error on the calibration "
                f"text): {', '.join(wide[:8])}{' ...' if len(wide) > 8 else ''}")
    return wide


def _untie_embedding(model: Any) -> str | None:
    """A Gather that reads the transposed LM-head weight (a tied embedding, as the genai builder writes it) gets its
    own table: ``Transpose(W) -> Gather`` becomes ``Gather(W.T)``. Returns the Gather's name (None: no such Gather).
    Once the LM head is packed, nothing else reads the float ``W``, so it leaves the file."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for t in [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]:
        users = [n for n in model.graph.node if t.output[0] in n.input]
        if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != t.output[0]:
            continue
        table = numpy_helper.to_array(inits[t.input[0]]).T.copy()
        name = t.input[0] + ".embedding"
        model.graph.initializer.append(numpy_helper.from_array(table, name))
        users[0].input[0] = name
        model.graph.node.remove(t)
        return str(users[0].name)
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2]
    return str(gathers[0].name) if gathers else None


def _pack(model: Any, cfg: Any, ctx: PassContext, decoder: Any, skip: list[str], head: str | None,
          embed: str | None) -> tuple[Any, list[str]]:
    """The MatMuls but ``skip`` at cfg.bits by cfg.algorithm; then the LM head (``head``) at head_bits by RTN in a
    pass of its own; then the embedding Gather (``embed``) at 4 bits when embedding_bits is set. Returns the model
    and the layers GPTQ's mixed precision (``int8_fraction``) packed at INT8."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from ._quant_common import quiet

    wide: list[str] = []
    try:
        if cfg.algorithm == "gptq":  # our own (ONNX Runtime's compensates nothing: see decoder_gptq.py); its
            wide = _gptq(model, cfg, ctx, decoder, skip)  # progress lines are the run's, so not under quiet
        with quiet():
            if cfg.algorithm != "gptq":
                q = MatMulNBitsQuantizer(model, bits=cfg.bits, block_size=cfg.group_size, is_symmetric=cfg.symmetric,
                                         accuracy_level=cfg.accuracy_level, nodes_to_exclude=skip,
                                         algo_config=_algo(cfg, decoder, cfg.bits))
                q.process()
                model = q.model.model
            if head:
                hq = cfg.model_copy(update={"algorithm": "rtn"})
                q = MatMulNBitsQuantizer(model, bits=cfg.head_bits, block_size=cfg.group_size,
                                         is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level,
                                         nodes_to_include=[head], algo_config=_algo(hq, decoder, cfg.head_bits))
                q.process()
                model = q.model.model
            if embed and cfg.embedding_bits:
                eq = DefaultWeightOnlyQuantConfig(block_size=cfg.group_size, is_symmetric=cfg.symmetric, bits=4,
                                                  quant_format=QuantFormat.QOperator, op_types_to_quantize=("Gather",),
                                                  quant_axes=(("Gather", 1),))
                q = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.group_size, is_symmetric=cfg.symmetric,
                                         nodes_to_include=[embed], algo_config=eq)
                q.process()
                model = q.model.model
    except PassError:
        raise
    except Exception as e:  # ORT raises ValueError/NotImplementedError/AssertionError here
        raise PassError(f"quantize.weight_only: onnxruntime's MatMulNBits quantizer failed ({cfg.algorithm}): "
                        f"{str(e).splitlines()[0][:300]}") from e
    return model, wide


def _checked_layers(model: Any, mats: list[Any], cfg: Any) -> tuple[dict[str, int], list[str]]:
    """The MatMuls' input widths, checked against the group size, and the nodes ``skip`` selects."""
    inits = {i.name: i for i in model.graph.initializer}
    widths = {n.name: int(inits[n.input[1]].dims[0]) for n in mats if n.input[1] in inits}
    # MatMulNBits pads a layer's last block, so a group size need not divide the width (SmolLM2's 576 at 128
    # does not); a group wider than the layer is one block of padding, which no one means.
    bad = sorted({w for w in widths.values() if w < cfg.group_size})
    if bad:
        raise PassError(f"quantize.weight_only: group_size={cfg.group_size} is wider than the MatMul input "
                        f"width(s) {bad}; choose a group size of at most {min(widths.values())}")
    skipped = cfg.skip.select(onnx_layers(model), "quantize.weight_only", eligible=[n.name for n in mats],
                              what="node")
    return widths, skipped


def _summary(cfg: Any, ctx: PassContext, packed: int, n_mats: int, embed_packed: bool, wide: list[str]) -> str:
    """The note that says what was packed, how, and on what."""
    return (f"weight-only INT{cfg.bits} ({cfg.algorithm}, group {cfg.group_size}"
            + (", symmetric" if cfg.symmetric and cfg.algorithm == "rtn" else "")
            + (f", LM head INT{cfg.head_bits}" if cfg.head_bits else "")
            + (f", accuracy_level {cfg.accuracy_level}" if cfg.accuracy_level else "")
            + (f", calibrated on {min(cfg.calib_windows, len(ctx.text.calib))} window(s) of {ctx.text.window} "
               "tokens" if cfg.algorithm == "gptq" and ctx.text is not None else "")
            + f") on {packed} of {n_mats} MatMul layer(s); "
            + (f"{len(wide)} of them at INT8 (the largest INT4 output error on the calibration text); " if wide
               else "")
            + ("the token embedding packed to INT4 (GatherBlockQuantized)" if embed_packed
               else "the embedding Gather stays float"))


def quantize_decoder_weights(art: Artifact, cfg: Any, ctx: PassContext) -> Artifact:
    import shutil

    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    decoder = art.known_facts().decoder
    assert decoder is not None
    if cfg.format != "matmulnbits":
        raise PassError("quantize.weight_only on a decoder needs format='matmulnbits' (ONNX Runtime's packed kernel "
                        "is what makes decoding faster)")
    model = onnx.load(str(art.path / "model.onnx"))
    embed = _untie_embedding(model) if cfg.embedding_bits else None
    mats = [n for n in model.graph.node if n.op_type == "MatMul"]
    widths, skipped = _checked_layers(model, mats, cfg)
    head = next((n.name for n in reversed(mats) if "lm_head" in n.name), mats[-1].name if mats else None)
    ctx.log(f"quantize.weight_only: INT{cfg.bits} {cfg.algorithm.upper()} weights, group {cfg.group_size}, "
            f"{len(widths)} MatMul layer(s)" + (f", {head} at INT{cfg.head_bits}" if cfg.head_bits else ""))
    skip = [*skipped, *([head] if cfg.head_bits and head else [])]
    model, wide = _pack(model, cfg, ctx, decoder, skip, head if cfg.head_bits else None, embed)
    out_dir = ctx.new_dir("onnx")
    ONNXModel(model).save_model_to_file(str(out_dir / "model.onnx"), use_external_data_format=True)
    for f in art.path.iterdir():  # the decoder's I/O contract and tokenizer travel with it
        if f.is_file() and f.suffix not in (".onnx", ".data") and f.name != "artifact.json":
            shutil.copy2(f, out_dir / f.name)
    ops = [n.op_type for n in onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph.node]
    packed = ops.count("MatMulNBits")
    embed_packed = ops.count("GatherBlockQuantized") > 0
    if cfg.embedding_bits and not embed_packed:
        raise PassError("quantize.weight_only: embedding_bits = 4 found no token embedding table (a Gather of a "
                        "constant 2-D weight) to pack; leave embedding_bits unset for this model")
    if packed == 0:
        raise PassError("quantize.weight_only: no MatMul of the decoder was compressed")
    parity = _agreement(art, out_dir, ctx)
    precision = "int4" if cfg.bits == 4 else "int8"
    notes = [_summary(cfg, ctx, packed, len(mats), embed_packed, wide)]
    info = {"bits": cfg.bits, "group_size": cfg.group_size, "algorithm": cfg.algorithm, "symmetric": cfg.symmetric,
            "head_bits": cfg.head_bits, "embedding_bits": cfg.embedding_bits if embed_packed else None,
            "accuracy_level": cfg.accuracy_level, "compressed_layers": packed, "int8_layers": wide,
            "matmul_layers": len(mats), "parity": parity, "notes": notes}
    extra_ops = {"com.microsoft:MatMulNBits", *(["com.microsoft:GatherBlockQuantized"] if embed_packed else [])}
    facts = art.known_facts().lower_precision(precision).evolve(
        quantization="weight_only", required_ops=tuple(sorted({*art.known_facts().required_ops, *extra_ops})))
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata={"quantize.weight_only": info},
                    facts=facts)


def _agreement(art: Artifact, out_dir: Any, ctx: PassContext) -> dict[str, Any]:
    """Next-token agreement and KL of the compressed decoder against its input on calibration windows."""
    from compress.inputs.causal_lm import WindowScores
    from compress.measuring.generation import OrtLMRunner

    text = ctx.text
    if text is None:
        return {"checked": False, "reason": "no text data to check on"}
    ref, got = OrtLMRunner(art.path, 1), OrtLMRunner(out_dir, 1)
    sc = WindowScores()
    for w in text.calib[:2]:
        sc.add(got.logits(w), w, ref.logits(w))
    f = sc.figures()
    return {"checked": True, "inputs": f"{min(2, len(text.calib))} calibration window(s) of {text.window} tokens",
            "top1_agreement": f["top1_agreement"], "kl": f["kl"]}
