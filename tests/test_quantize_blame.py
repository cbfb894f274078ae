"""A refused INT8 model (static or dynamic) names the node (and module) its error comes from and a skip that, taken,
passes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress.passes._quant_common import weighted_nodes
from compress.passes.export_onnx import ExportOnnx
from compress.passes.quantize_dynamic import QuantizeDynamic
from compress.passes.quantize_int8 import QuantizeInt8
from torch import nn

from compress.api import module_artifact
from compress.core.artifact import Artifact
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager
from compress.errors import AccuracyError, CompressError
from compress.inputs.data import DataBundle, Split

D = 16


class Spiky(nn.Module):
    """Three Linear layers; every output row of ``mid`` holds one huge weight on an input that is always zero
    (a dead ReLU), so per-channel INT8 rounds its real weights to zero: that layer alone wrecks the model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 8)
        with torch.no_grad():
            self.inp.bias[0] = -100.0  # channel 0 is dead after the ReLU
            self.mid.weight[:, 0] = 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


def _data() -> DataBundle:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, D)).astype(np.float32)
    return DataBundle("synthetic", Split(x[:64], None), Split(x[:64], None), Split(x[64:], None), False, "spiky",
                      (D,), (D,))


def _onnx(tmp_path: Path) -> tuple[Artifact, PassContext]:
    cache = Cache(tmp_path / "cache")
    data = _data()
    root = module_artifact(Spiky().eval(), (1, D), cache)
    ctx = PassContext(cache=cache, data=data, seed=0, progress=False, original=root)
    art, _ = PassManager([ExportOnnx()]).run(root, ctx)
    return art, ctx


def test_refusal_names_the_layer_and_a_skip_that_then_passes(tmp_path: Path) -> None:
    art, ctx = _onnx(tmp_path)
    with pytest.raises(AccuracyError) as e:
        PassManager([QuantizeInt8(samples=32)]).run(art, ctx)
    msg = str(e.value)
    assert "\n" not in msg
    assert "(module mid)" in msg, msg  # the layer responsible, by its module name
    m = re.search(r"skip = (\[[^\]]*\]) passes both checks", msg)
    assert m is not None, msg
    skip = eval(m.group(1))
    out, _ = PassManager([QuantizeInt8(samples=32, skip=skip)]).run(art, ctx)  # the advice, taken
    info = out.metadata["quantize.int8"]
    assert info["fidelity_guard"]["cosine_mean"] >= 0.95 and sorted(info["kept_float"]) == sorted(skip)


def test_advice_adds_to_the_users_skip_and_never_repeats_it(tmp_path: Path) -> None:
    art, ctx = _onnx(tmp_path)
    with pytest.raises(AccuracyError) as e:
        PassManager([QuantizeInt8(samples=32, skip=["first"])]).run(art, ctx)
    msg = str(e.value)
    m = re.search(r"add (\[[^\]]*\]) to skip passes both checks", msg)
    assert m is not None, msg
    added = eval(m.group(1))
    first = weighted_nodes(onnx.load(str(art.path / "model.onnx")))[0]
    assert first not in added and "skip = [" not in msg  # what the run already keeps in float is not advised
    out, _ = PassManager([QuantizeInt8(samples=32, skip=["first", *added])]).run(art, ctx)
    assert out.metadata["quantize.int8"]["fidelity_guard"]["cosine_mean"] >= 0.95


def test_dynamic_refusal_names_the_layer_and_a_skip_that_then_passes(tmp_path: Path) -> None:
    """quantize.dynamic's refusal blames layers through the same search as quantize.int8's; the skip it prints
    (a Gemm, which ORT rewrites into NAME_MatMul before quantizing) is kept in float when taken."""
    art, ctx = _onnx(tmp_path)
    with pytest.raises(CompressError) as e:
        PassManager([QuantizeDynamic()]).run(art, ctx)
    msg = str(e.value)
    assert "\n" not in msg and "quantize.dynamic" in msg
    assert "(module mid)" in msg, msg
    m = re.search(r"skip = (\[[^\]]*\]) passes both checks", msg)
    assert m is not None, msg
    skip = eval(m.group(1))
    out, _ = PassManager([QuantizeDynamic(skip=skip)]).run(art, ctx)  # the advice, taken
    info = out.metadata["quantize.dynamic"]
    assert info["fidelity_guard"]["cosine_mean"] >= 0.95 and info["float_nodes"]["skip"] == skip
    assert not set(skip) & set(info["quantized"])
    q = onnx.load(str(out.path / "model.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in q.graph.node) == 3 - len(skip)  # Spiky has 3 Linear layers
