"""Models that share one weight between nodes quantize statically: each reader gets its own copy before ONNX
Runtime's quantizer, which refuses a shared weight ("Quantization parameter shared mode is not supported for weight
yet"). The case found: PoolFormer, whose exported GroupNorm shares its constants between nodes."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from compress.passes.export_onnx import ExportOnnx
from compress.passes.quantize_int8 import QuantizeInt8

from compress.api import module_artifact
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager
from compress.inputs.data import load_data
from compress.stages.recipe import DataSpec


def test_poolformer_shared_constants_are_copied_per_node_and_quantized(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from compress.inputs.hf import from_config, input_specs

    shape = (1, 3, 32, 32)
    cfg = transformers.PoolFormerConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10)
    torch.manual_seed(0)
    cache = Cache(tmp_path / "c")
    art = module_artifact(from_config(cfg, "image-classification"), shape, cache,
                          inputs=input_specs(cfg, "image-classification", shape))
    data = load_data(DataSpec(source="builtin:digits"), shape)
    ctx = PassContext(cache=cache, data=data, seed=0, progress=False, original=art)
    onnx_art, _ = PassManager([ExportOnnx()]).run(art, ctx)
    # Random weights: argmax agreement says nothing; the fidelity guard's per-sample cosine still applies.
    out, _ = PassManager([QuantizeInt8(samples=32, min_agreement=0.0)]).run(onnx_art, ctx)
    info = out.metadata["quantize.int8"]
    assert info["quantized_nodes"] > 0 and info["fidelity_guard"]["cosine_mean"] > 0.9
    assert any("copied per node" in n for n in info["notes"])
    q = onnx.load(str(out.path / "model.onnx"))
    assert any("__copy1" in i.name for i in q.graph.initializer)
