"""Advice that is true: a refusal never tells a user to set what the run already has."""

from __future__ import annotations

import pytest
from compress.passes.export_onnx import ExportOnnx
from compress.passes.quantize_dynamic import QuantizeDynamic
from compress.passes.quantize_int8 import QuantizeInt8

from compress.core.cache import Cache
from compress.core.config import true_advice
from compress.core.manager import PassContext, PassManager
from compress.errors import AccuracyError
from compress.inputs.data import load_data
from compress.inputs.models import load_model
from compress.stages.recipe import DataSpec, ModelSpec


def test_true_advice_drops_what_is_already_set() -> None:
    opts = [("per_channel", True, "per_channel = true"), ("calibration", "percentile", "calibration = percentile")]
    assert true_advice({"per_channel": True, "calibration": "minmax"}, opts) == ["calibration = percentile"]
    assert true_advice({"per_channel": False, "calibration": "percentile"}, opts) == ["per_channel = true"]


@pytest.fixture(scope="module")
def onnx_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple:  # type: ignore[type-arg]
    import torch

    torch.manual_seed(0)
    cache = Cache(tmp_path_factory.mktemp("c"))
    root = load_model(ModelSpec(source="zoo:digits-cnn", input_shape=[1, 1, 8, 8]), cache)
    data = load_data(DataSpec(source="builtin:digits"), (1, 1, 8, 8))
    ctx = PassContext(cache=cache, data=data, seed=0, progress=False, original=root)
    return PassManager([ExportOnnx()]).run(root, ctx)[0], ctx


@pytest.mark.parametrize(("cfg", "advised", "not_advised"), [
    # per_channel is the default: never advised; percentile calibration is not in use: advised.
    (QuantizeInt8(samples=32, min_sample_cosine=0.999999), ['calibration = "percentile"'], ["per_channel = true"]),
    (QuantizeInt8(samples=32, min_sample_cosine=0.999999, per_channel=False, calibration="percentile"),
     ["per_channel = true"], ['calibration = "percentile"']),
    (QuantizeDynamic(min_sample_cosine=0.999999, per_channel=True), [], ["per_channel = true"]),
])
def test_guard_refusal_advises_only_settings_not_in_use(onnx_cnn: tuple, cfg, advised: list[str],  # type: ignore[no-untyped-def, type-arg]
                                                        not_advised: list[str]) -> None:
    art, ctx = onnx_cnn
    with pytest.raises(AccuracyError) as e:
        PassManager([cfg]).run(art, ctx)
    msg = str(e.value)
    assert "keep more nodes in float (skip)" in msg
    for a in advised:
        assert a in msg
    for a in not_advised:
        assert a not in msg
