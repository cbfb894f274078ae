"""Transformer-shaped models without `transformers`: token ids + mask inputs, head pruning, float-kept
attention arithmetic under quantization, and the label-free fidelity guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress.passes._quant_common import ort_session, transformer_float_nodes
from compress.passes.export_onnx import ExportOnnx
from compress.passes.prune_channels import ChannelPrune
from compress.passes.quantize_dynamic import QuantizeDynamic
from compress.passes.quantize_int8 import QuantizeInt8

from compress.api import module_artifact
from compress.core.artifact import Artifact, InputSpec
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager
from compress.inputs.torch_io import sample_inputs
from compress.quality.fidelity import compare_outputs
from tests.user_models import masked_encoder

SPECS = (InputSpec("input_ids", (1, 12), "int64", high=100, dynamic_axes=((1, "seq"),)),
         InputSpec("attention_mask", (1, 12), "int64", high=2, dynamic_axes=((1, "seq"),)))


def _run(art: Artifact, steps: list, cache: Cache) -> tuple[Artifact, list]:  # type: ignore[type-arg]
    return PassManager(steps).run(art, PassContext(cache=cache, progress=False, original=art))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, Artifact, Cache]:
    """One export for the module's tests (the tests only read it)."""
    cache = Cache(tmp_path_factory.mktemp("tcache"))
    root = module_artifact(masked_encoder().eval(), (1, 12), cache, inputs=SPECS)
    return root, _run(root, [ExportOnnx()], cache)[0], cache


@pytest.fixture
def root(shared: tuple[Artifact, Artifact, Cache]) -> Artifact:
    return shared[0]


@pytest.fixture
def onnx_art(shared: tuple[Artifact, Artifact, Cache]) -> Artifact:
    return shared[1]


def _feeds(batch: int, seq: int, pad: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seq)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad:
        mask[:, -pad:] = 0
    return {"input_ids": g.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}


def test_synthetic_inputs_are_valid_ids_and_masks() -> None:
    ids, mask = sample_inputs(SPECS, batch=4, seed=3)
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 100
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {1}
    assert InputSpec.from_json(SPECS[0].to_json()) == SPECS[0]


def test_export_keeps_int_inputs_and_a_dynamic_sequence(root: Artifact, onnx_art: Artifact) -> None:
    m = onnx.load(str(onnx_art.path / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in m.graph.input)
    sess = ort_session(onnx_art.path / "model.onnx")
    module = masked_encoder().eval()
    for batch, seq, pad in ((1, 5, 0), (3, 20, 4)):  # other batch and sequence lengths than exported with
        f = _feeds(batch, seq, pad)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask"))).numpy()
        np.testing.assert_allclose(sess.run(None, f)[0], ref, atol=1e-4, rtol=1e-4)


def test_attention_nodes_recognised_in_the_graph(onnx_art: Artifact) -> None:
    groups = transformer_float_nodes(onnx.load(str(onnx_art.path / "model.onnx")))
    assert groups is not None
    assert len(groups["softmax"]) == 2 and len(groups["layernorm"]) == 4
    assert len(groups["attention_matmul"]) == 4  # q @ k^T and att @ v per layer
    assert groups["mask"], "the Add of the mask bias to the attention scores must be found"


def test_dynamic_is_per_channel_lists_float_nodes_and_guards(onnx_art: Artifact, cache: Cache) -> None:
    out, _ = _run(onnx_art, [QuantizeDynamic()], cache)
    info = out.metadata["quantize.dynamic"]
    assert info["per_channel"] is True and info["per_channel_reason"] == "auto: transformer graph"
    note = next(n for n in info["notes"] if n.startswith("kept in float"))
    m = onnx.load(str(onnx_art.path / "model.onnx"))
    names = {n.name for n in m.graph.node}
    assert all(s in note for s in info["float_nodes"]["softmax"]) and set(info["float_nodes"]["mask"]) <= names
    assert info["fidelity_guard"]["cosine_mean"] >= 0.95 and "synthetic" in info["fidelity_guard"]["on"]
    # a name from the list goes straight back into skip
    wmm = info["quantized"][0]
    out2, _ = _run(onnx_art, [QuantizeDynamic(skip=(wmm,))], cache)
    assert wmm in out2.metadata["quantize.dynamic"]["float_nodes"]["skip"]
    assert len(out2.metadata["quantize.dynamic"]["quantized"]) == len(info["quantized"]) - 1


def test_int8_keeps_mask_softmax_layernorm_float_and_calibrates_on_synthetic_ids(onnx_art: Artifact,
                                                                                 cache: Cache) -> None:
    out, _ = _run(onnx_art, [QuantizeInt8(samples=16)], cache)
    info = out.metadata["quantize.int8"]
    assert info["transformer_preset"]["softmax"] == 2
    q = onnx.load(str(out.path / "model.onnx"))
    producer = {o: n for n in q.graph.node for o in n.output}
    float_ops = [n for n in q.graph.node if n.op_type in ("Softmax", "LayerNormalization")
                 or n.name in info["float_nodes"]["mask"]]
    assert float_ops
    for n in float_ops:  # no input of a kept node comes through a DequantizeLinear
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), n.name
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert any("calibrated on" in n and "synthetic" in n for n in info["notes"])
    # fidelity to the float model on padded batches, per sample
    f = _feeds(8, 12, pad=3)
    ref = ort_session(onnx_art.path / "model.onnx").run(None, f)[0]
    got = ort_session(out.path / "model.onnx").run(None, f)[0]
    assert compare_outputs(ref, got, "embedding")["cosine_worst"] > 0.98


def test_default_prune_removes_whole_heads_on_a_two_input_model(root: Artifact, cache: Cache) -> None:
    out, recs = _run(root, [ChannelPrune(ratio=0.5), ExportOnnx()], cache)
    meta = recs[0].artifact.metadata["prune.channels"]
    assert set(meta["heads_after"].values()) == {2}
    sess = ort_session(out.path / "model.onnx")
    assert sess.run(None, _feeds(2, 7))[0].shape == (2, 32)  # embedding width kept


def test_npz_with_named_arrays_calibrates_and_guards_on_them(onnx_art: Artifact, cache: Cache,
                                                             tmp_path: Path) -> None:
    from compress.errors import InputError
    from compress.inputs.data import load_data
    from compress.stages.recipe import DataSpec

    g = np.random.default_rng(0)
    n, seq = 120, 12
    ids = g.integers(0, 100, (n, seq))
    mask = np.ones((n, seq), dtype=np.int64)
    mask[::3, 8:] = 0  # a third of the sentences padded
    p = tmp_path / "tok.npz"
    np.savez(p, input_ids=ids, attention_mask=mask)
    data = load_data(DataSpec(source=f"npz:{p}"), (1, seq), SPECS)
    assert data is not None and data.input_names == ("input_ids", "attention_mask")
    f = data.feeds(data.val, 0, 4)
    assert f["input_ids"].dtype == np.int64 and f["attention_mask"].shape == (4, seq)
    out, _ = PassManager([QuantizeInt8(samples=16)]).run(
        onnx_art, PassContext(cache=cache, data=data, progress=False, original=onnx_art))
    info = out.metadata["quantize.int8"]
    assert any("calibrated on 12 samples of npz:" in x for x in info["notes"]), info["notes"]
    assert "validation samples" in info["fidelity_guard"]["on"] and info["fidelity_guard"]["cosine_mean"] >= 0.95
    np.savez(tmp_path / "bad.npz", input_ids=ids)
    with pytest.raises(InputError, match="lacks attention_mask"):
        load_data(DataSpec(source=f"npz:{tmp_path / 'bad.npz'}"), (1, seq), SPECS)
