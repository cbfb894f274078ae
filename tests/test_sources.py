"""Model and data sources: zoo, factory + weights, .pt2, .onnx; digits, npz, image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress.passes.export_onnx import ExportOnnx

from compress.core.manager import PassContext, PassManager
from compress.errors import InputError, RecipeError
from compress.inputs.data import load_data
from compress.inputs.models import load_model
from compress.inputs.torch_io import load_torch
from compress.inputs.zoo import ZOO
from compress.stages.recipe import DataSpec, ModelSpec


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_builds_and_runs(name: str, cache) -> None:
    shape = (1, 3, 32, 32) if ZOO[name].input_shape[1] == 3 else None
    art = load_model(ModelSpec(source=f"zoo:{name}", input_shape=list(shape) if shape else None), cache)
    x = torch.randn(2, *art.inputs[0].shape[1:])
    assert load_torch(art)(x).shape == (2, 10)


def test_factory_with_state_dict_and_safetensors(tmp_path: Path, cache) -> None:
    from safetensors.torch import save_file
    from user_models import make

    trained = make()
    with torch.no_grad():
        trained.head.bias.fill_(3.0)
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save(trained.state_dict(), pt)
    save_file(trained.state_dict(), str(st))
    for w in (pt, st):
        art = load_model(ModelSpec(source="user_models:make", input_shape=[1, 1, 8, 8], weights=str(w)), cache)
        assert torch.allclose(load_torch(art).head.bias, torch.full((10,), 3.0))


def test_factory_errors(cache) -> None:
    with pytest.raises(RecipeError, match="needs input_shape"):
        load_model(ModelSpec(source="user_models:make"), cache)
    with pytest.raises(InputError, match="cannot import 'no_such_pkg.mod'"):
        load_model(ModelSpec(source="no_such_pkg.mod:make", input_shape=[1, 1, 8, 8]), cache)
    with pytest.raises(InputError, match="has no callable 'nope'"):
        load_model(ModelSpec(source="user_models:nope", input_shape=[1, 1, 8, 8]), cache)


def test_weights_that_do_not_fit_are_explained(tmp_path: Path, cache) -> None:
    p = tmp_path / "w.pt"
    torch.save({"unrelated.weight": torch.zeros(3)}, p)
    with pytest.raises(InputError, match="weights do not fit the model"):
        load_model(ModelSpec(source="zoo:digits-cnn", weights=str(p)), cache)


def test_exported_program_source(tmp_path: Path, cache) -> None:
    from user_models import make

    m = make().eval()
    x = torch.randn(1, 1, 8, 8)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    with pytest.raises(InputError, match="allow_unsafe_pt2"):  # torch.export.load unpickles: opt-in only
        load_model(ModelSpec(source=str(path)), cache)
    art = load_model(ModelSpec(source=str(path), allow_unsafe_pt2=True), cache)
    assert art.inputs[0].shape == (1, 1, 8, 8)
    assert torch.allclose(load_torch(art)(x), m(x), atol=1e-6)


def _onnx_file(tmp_path: Path, cache) -> Path:
    art = load_model(ModelSpec(source="zoo:digits-cnn"), cache)
    out, _ = PassManager([ExportOnnx()]).run(art, PassContext(cache=cache, progress=False))
    return out.path / "model.onnx"


def test_onnx_source_refuses_torch_passes(tmp_path: Path, cache) -> None:
    from compress.core.registry import get_pass

    art = load_model(ModelSpec(source=str(_onnx_file(tmp_path, cache))), cache)
    assert art.kind == "onnx" and art.inputs[0].name == "input"
    scale = get_pass("test.scale").config_cls()
    with pytest.raises(RecipeError, match="runs on PyTorch models"):
        PassManager([scale]).validate(art.kind)


def test_onnx_external_data_outside_folder_is_refused(tmp_path: Path, cache) -> None:
    src = _onnx_file(tmp_path, cache)
    model = onnx.load(str(src))
    evil = tmp_path / "evil"
    evil.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1024)
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    onnx.save(model, str(evil / "model.onnx"))
    with pytest.raises(InputError, match="outside the model's folder; refused"):
        load_model(ModelSpec(source=str(evil / "model.onnx")), cache)


def test_missing_and_corrupt_onnx(tmp_path: Path, cache) -> None:
    with pytest.raises(InputError, match="ONNX file not found"):
        load_model(ModelSpec(source=str(tmp_path / "nope.onnx")), cache)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        load_model(ModelSpec(source=str(bad)), cache)


def test_digits_splits_are_disjoint_and_deterministic() -> None:
    a = load_data(DataSpec(source="builtin:digits"), (1, 1, 8, 8))
    b = load_data(DataSpec(source="builtin:digits"), (1, 1, 8, 8))
    assert a is not None and b is not None and a.labelled
    assert len(a.train) + len(a.calib) + len(a.val) == 1797
    rows = [{s.tobytes() for s in split.x} for split in (a.train, a.calib, a.val)]
    # the digits set holds a few duplicate images; splits are disjoint by index, so overlap stays tiny
    assert len(rows[0] & rows[2]) <= 5 and len(rows[1] & rows[2]) <= 5
    assert np.array_equal(a.val.x, b.val.x) and a.digest == b.digest


def test_digits_adapted_to_a_larger_rgb_input() -> None:
    d = load_data(DataSpec(source="builtin:digits"), (1, 3, 32, 32))
    assert d is not None and "adapted" in d.note
    x, y = next(d.batches(d.val, 4))
    assert tuple(x.shape) == (4, 3, 32, 32) and y is not None and len(y) == 4


def test_random_source_gives_no_data() -> None:
    assert load_data(DataSpec(source="random"), (1, 1, 8, 8)) is None


def test_npz_source_with_and_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 1, 8, 8)).astype(np.float32)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=np.arange(50) % 10)
    d = load_data(DataSpec(source=f"npz:{p}"), (1, 1, 8, 8))
    assert d is not None and d.labelled
    np.savez(p, x=x)
    d = load_data(DataSpec(source=str(p)), (1, 1, 8, 8))
    assert d is not None and not d.labelled
    np.savez(p, images=x)
    with pytest.raises(InputError, match="must hold an array 'x'"):
        load_data(DataSpec(source=str(p)), (1, 1, 8, 8))


def test_nan_in_data_is_refused_naming_the_sample(tmp_path: Path) -> None:
    x = np.zeros((20, 1, 8, 8), np.float32)
    x[7, 0, 3, 3] = np.nan
    p = tmp_path / "d.npz"
    np.savez(p, x=x)
    with pytest.raises(InputError, match="sample 7 contains NaN or Inf"):
        load_data(DataSpec(source=str(p)), (1, 1, 8, 8))


def test_image_folder_source(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataSpec(source=f"folder:{tmp_path}"), (1, 3, 16, 16))
    assert d is not None and d.labelled
    assert d.train.x.shape[1:] == (3, 16, 16) and set(np.concatenate([d.train.y, d.val.y, d.calib.y])) == {0, 1}
