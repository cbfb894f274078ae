"""The distill pass: teacher -> student training on narrower, fake-quantized and label-free setups."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import compress.passes.distill as distill_mod
import numpy as np
import pytest
import torch
from compress.passes.distill import Distill, _projection
from pydantic import ValidationError
from torch import nn

from compress.core.artifact import Artifact
from compress.core.cache import Cache
from compress.core.config import format_step
from compress.core.manager import PassContext, PassManager
from compress.core.registry import passes
from compress.errors import InputError, PassError
from compress.inputs import zoo
from compress.inputs.data import DataBundle, Split, load_data
from compress.inputs.models import load_model
from compress.inputs.torch_io import load_torch, register_structure_hook, torch_artifact, torch_meta
from compress.inputs.training import fit
from compress.stages.recipe import DataSpec, ModelSpec, parse_pipeline

SHAPE = (1, 1, 8, 8)


# ---------------------------------------------------------------- test-only structure edits


@register_structure_hook("test.distill.width")
def _narrow(module: nn.Module, data: Any) -> nn.Module:
    """Stands in for channel pruning: the same architecture at another width."""
    return zoo.DigitsCNN(width=int(data["width"]))


class FakeQuantConv(nn.Module):
    """A conv whose weight is fake-quantized (STE), as a QAT pass inserts."""

    def __init__(self, conv: nn.Conv2d, bits: int) -> None:
        super().__init__()
        self.conv = conv
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        scale = w.detach().abs().max().clamp(min=1e-8) / self.qmax
        wq = torch.fake_quantize_per_tensor_affine(w, float(scale), 0, -self.qmax - 1, self.qmax)
        return nn.functional.conv2d(x, wq, None, self.conv.stride, self.conv.padding)


@register_structure_hook("test.distill.fakequant")
def _fakequant(module: nn.Module, data: Any) -> nn.Module:
    for name in data["layers"]:
        parent, _, child = name.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        setattr(holder, child, FakeQuantConv(getattr(holder, child), int(data["bits"])))
    return module


# ---------------------------------------------------------------- fixtures


def _subset(d: DataBundle, n_train: int, n_val: int, labelled: bool = True) -> DataBundle:
    def cut(s: Split, n: int) -> Split:
        return Split(s.x[:n], s.y[:n] if labelled and s.y is not None else None)

    return DataBundle(d.name, cut(d.train, n_train), cut(d.calib, 20), cut(d.val, n_val), labelled,
                      f"{d.digest}:{n_train}:{n_val}:{labelled}", d.sample_shape, d.input_shape)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # Tiny models: one intra-op thread is as fast, and far faster when other processes share the CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return _subset(load_data(DataSpec(source="builtin:digits"), SHAPE), 320, 120)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained_state(digits: DataBundle) -> dict[str, torch.Tensor]:
    """A briefly trained digits CNN (the teacher), shared by the tests of this module."""
    torch.manual_seed(0)
    m = zoo.build("digits-cnn", SHAPE)
    fit(m, digits, epochs=6, lr=1e-2, batch_size=32, seed=0)
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.fixture
def teacher(cache: Cache, trained_state: dict[str, torch.Tensor]) -> Artifact:
    root = load_model(ModelSpec(source="zoo:digits-cnn"), cache)
    m = zoo.build("digits-cnn", SHAPE)
    m.load_state_dict(trained_state)
    return torch_artifact(m, root, _ctx(cache, None, root))


def _ctx(cache: Cache, data: DataBundle | None, original: Artifact | None, seed: int = 0) -> PassContext:
    return PassContext(cache=cache, data=data, seed=seed, progress=False, original=original)


def _narrow_student(teacher: Artifact, cache: Cache, width: int = 8) -> Artifact:
    torch.manual_seed(1)
    return torch_artifact(zoo.DigitsCNN(width=width), teacher, _ctx(cache, None, teacher),
                          structure_step={"hook": "test.distill.width", "data": {"width": width}})


def _run(cfg: Distill | list[Any], art: Artifact, ctx: PassContext) -> Artifact:
    out, _ = PassManager(cfg if isinstance(cfg, list) else [cfg]).run(art, ctx)
    return out


def _reload(art: Artifact) -> nn.Module:
    """The artifact as rebuilt from disk alone (no live module)."""
    return load_torch(Artifact.load(art.path))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- behaviour


def test_narrow_student_learns_from_the_original(cache: Cache, teacher: Artifact, digits: DataBundle) -> None:
    student = _narrow_student(teacher, cache)
    out = _run(Distill(epochs=6, lr=1e-2, batch_size=32), student, _ctx(cache, digits, teacher))
    info = out.metadata["distill"]
    assert info["teacher"] == "original" and info["teacher_digest"] == teacher.digest
    assert info["labels_used"] and info["metric"] == "top1"
    assert set(info["loss_terms"]) == {"kd", "ce"}
    assert info["epochs_run"] == 6 and len(info["val_curve"]) == 6
    assert info["accuracy_after"] == max([info["accuracy_before"], *info["val_curve"]])
    assert info["accuracy_after"] > info["accuracy_before"] + 0.3  # random init -> taught
    assert info["teacher_top1"] > 0.5
    # The student keeps its width and structure steps; the output rebuilds from disk with the same weights.
    assert torch_meta(out)[1] == torch_meta(student)[1]
    rebuilt = _reload(out)
    assert rebuilt.features[0].out_channels == 8
    assert _same_weights(rebuilt, load_torch(out))
    assert not (cache.root / "resume").exists() or not any((cache.root / "resume").iterdir())


def test_label_free_mode_uses_the_teacher_only(cache: Cache, teacher: Artifact, digits: DataBundle) -> None:
    unlabelled = _subset(digits, 320, 120, labelled=False)
    student = _narrow_student(teacher, cache)
    out = _run(Distill(epochs=5, lr=1e-2, batch_size=32), student, _ctx(cache, unlabelled, teacher))
    info = out.metadata["distill"]
    assert not info["labels_used"] and info["metric"] == "teacher_agreement"
    assert set(info["loss_terms"]) == {"kd"} and "ce" not in info["train_loss_curve"]
    assert "top1_after" not in info  # no labels anywhere: no top-1 claimed
    assert info["teacher_agreement_after"] > info["teacher_agreement_before"] + 0.25
    assert any("label-free" in n for n in info["notes"])
    # labels = "ignore" on labelled data: same training, and top-1 is still reported
    info2 = _run(Distill(epochs=1, labels="ignore"), student, _ctx(cache, digits, teacher)).metadata["distill"]
    assert not info2["labels_used"] and "top1_after" in info2


def test_feature_matching_learns_projection_for_different_widths(cache: Cache, teacher: Artifact,
                                                                 digits: DataBundle) -> None:
    student = _narrow_student(teacher, cache)
    cfg = Distill(epochs=2, lr=1e-2, batch_size=32, features=["features.2", "features.10", "classifier"],
                  feature_weight=0.5)
    out = _run(cfg, student, _ctx(cache, digits, teacher))
    info = out.metadata["distill"]
    feat = info["loss_terms"]["feature"]
    # 32 vs 8 channels, 64 vs 16 channels: 1x1 convs; the 10 logits agree: identity
    assert feat["projections"] == ["Conv2d", "Conv2d", "Identity"]
    assert len(info["train_loss_curve"]["feature"]) == 2
    assert info["train_loss_curve"]["feature"][-1] < info["train_loss_curve"]["feature"][0]
    # The projections are not part of the student
    assert load_torch(out).state_dict().keys() == load_torch(student).state_dict().keys()
    assert not load_torch(out).features[2]._forward_hooks


def test_projection_shapes() -> None:
    assert isinstance(_projection("x", torch.zeros(2, 5, 7), torch.zeros(2, 5, 3)), nn.Linear)  # tokens, channels last
    assert isinstance(_projection("x", torch.zeros(2, 6, 4), torch.zeros(2, 3, 4)), nn.Conv1d)
    with pytest.raises(PassError, match="only the channel width may differ"):
        _projection("layer", torch.zeros(2, 8, 4, 4), torch.zeros(2, 4, 2, 2))


def test_fake_quantized_student_trains_and_keeps_its_structure(cache: Cache, teacher: Artifact,
                                                               digits: DataBundle) -> None:
    m = load_torch(teacher)
    import copy

    qat = _fakequant(copy.deepcopy(m), {"layers": ["features.0", "features.3"], "bits": 4})
    step = {"hook": "test.distill.fakequant", "data": {"layers": ["features.0", "features.3"], "bits": 4}}
    student = torch_artifact(qat, teacher, _ctx(cache, None, teacher), structure_step=step)
    out = _run(Distill(epochs=2, lr=1e-3, patience=0), student, _ctx(cache, digits, teacher))
    info = out.metadata["distill"]
    assert info["epochs_run"] == 2
    rebuilt = _reload(out)
    assert isinstance(rebuilt.features[0], FakeQuantConv) and isinstance(rebuilt.features[3], FakeQuantConv)
    assert _same_weights(rebuilt, load_torch(out))
    assert not _same_weights(rebuilt, load_torch(student)) or info["best_epoch"] == 0


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path: Path, teacher: Artifact, digits: DataBundle,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "c1")
    student = _narrow_student(teacher, cache)
    cfg = Distill(epochs=4, lr=3e-3, patience=0)
    seen: list[int] = []

    def kill_after_2(epoch: int, info: dict[str, Any]) -> None:
        seen.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "_epoch_end_hook", kill_after_2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, student, _ctx(cache, digits, teacher))
    ckpts = list((cache.root / "resume").glob("*/checkpoint.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=True)["epoch"] == 2

    monkeypatch.setattr(distill_mod, "_epoch_end_hook", lambda epoch, info: seen.append(epoch))
    resumed = _run(cfg, student, _ctx(cache, digits, teacher))
    assert seen == [1, 2, 3, 4]  # epochs 1-2 before the kill, then 3-4 only
    info = resumed.metadata["distill"]
    assert info["resumed_from_epoch"] == 2 and info["epochs_run"] == 4 and len(info["val_curve"]) == 4
    assert not ckpts[0].exists()  # finished: resume state removed

    cache2 = Cache(tmp_path / "c2")
    straight = _run(cfg, student, _ctx(cache2, digits, teacher))
    assert straight.metadata["distill"]["resumed_from_epoch"] is None
    assert straight.digest == resumed.digest
    assert _same_weights(load_torch(straight), load_torch(resumed))
    assert straight.metadata["distill"]["val_curve"] == info["val_curve"]


def test_steps_early_stopping_and_best_checkpoint(cache: Cache, teacher: Artifact, digits: DataBundle) -> None:
    student = _narrow_student(teacher, cache)
    info = _run(Distill(steps=7, batch_size=64), student, _ctx(cache, digits, teacher)).metadata["distill"]
    assert info["steps_run"] == 7 and info["epochs_run"] == math.ceil(7 / (320 // 64))
    # Self-distillation: the input already matches the teacher exactly, so no epoch can beat it.
    out = _run(Distill(epochs=6, patience=2, labels="ignore"), teacher, _ctx(cache, digits, teacher))
    info = out.metadata["distill"]
    assert info["stopped_early"] and info["epochs_run"] == 2 and info["best_epoch"] == 0
    assert any("self-distillation" in n for n in info["notes"])
    assert any("no epoch improved" in n for n in info["notes"])
    assert _same_weights(load_torch(out), load_torch(teacher))


def test_named_teacher_loads_weights_safely(tmp_path: Path, cache: Cache, teacher: Artifact,
                                            digits: DataBundle) -> None:
    student = _narrow_student(teacher, cache)
    w = tmp_path / "teacher.pt"
    torch.save(load_torch(teacher).state_dict(), w)
    cfg = Distill(epochs=1, teacher="digits-cnn", teacher_weights=str(w))
    info = _run(cfg, student, _ctx(cache, digits, None)).metadata["distill"]
    assert info["teacher"] == "zoo:digits-cnn"
    assert info["teacher_digest"] == teacher.digest  # same source, same weights, same digest
    pickled = tmp_path / "module.pt"
    torch.save(load_torch(teacher), pickled)  # a whole pickled module: refused
    with pytest.raises(InputError, match="refused to load"):
        _run(Distill(epochs=1, teacher="zoo:digits-cnn", teacher_weights=str(pickled)), student,
             _ctx(cache, digits, None))
    with pytest.raises(PassError, match="random weights"):
        _run(Distill(epochs=1, teacher="zoo:digits-cnn"), student, _ctx(cache, digits, None))
    with pytest.raises(PassError, match="no teacher"):
        _run(Distill(epochs=1), student, _ctx(cache, digits, None))


def test_config_and_text_form() -> None:
    cfg = parse_pipeline('distill{steps=50,features=["features.2"],optimizer="sgd"}')[0][0]
    assert isinstance(cfg, Distill) and cfg.steps == 50 and cfg.features == ["features.2"]
    assert parse_pipeline(format_step(cfg))[0][0] == cfg
    assert format_step(Distill()) == "distill"
    with pytest.raises(ValidationError, match="either epochs or steps"):
        Distill(epochs=3, steps=10)
    with pytest.raises(ValidationError, match="teacher_weights needs teacher"):
        Distill(teacher_weights="w.pt")
    with pytest.raises(ValidationError):
        Distill(schedule="linear")


# ---------------------------------------------------------------- bad input


def test_teacher_with_other_output_shape_is_refused(cache: Cache, teacher: Artifact, digits: DataBundle) -> None:
    five = torch_artifact(zoo.DigitsCNN(num_classes=5), teacher, _ctx(cache, None, teacher))
    with pytest.raises(PassError, match=r"outputs shape \[5\].*student outputs \[10\]"):
        _run(Distill(epochs=1), _narrow_student(teacher, cache), _ctx(cache, digits, five))


def test_too_small_validation_split_is_refused(cache: Cache, teacher: Artifact, digits: DataBundle) -> None:
    tiny = _subset(digits, 320, 5)
    with pytest.raises(PassError, match="validation split has 5 samples.*min_val_samples=20"):
        _run(Distill(epochs=1), _narrow_student(teacher, cache), _ctx(cache, tiny, teacher))


def test_no_data_is_refused(cache: Cache, teacher: Artifact) -> None:
    with pytest.raises(PassError, match="no data"):
        _run(Distill(epochs=1), _narrow_student(teacher, cache), _ctx(cache, None, teacher))


def test_nan_loss_stops_and_keeps_the_input_when_no_epoch_finished(cache: Cache, teacher: Artifact,
                                                                   digits: DataBundle) -> None:
    student = _narrow_student(teacher, cache)
    with pytest.raises(PassError, match=r"loss became nan at epoch 1.*input model.*kept at (\S+) .*lr=100000") as e:
        _run(Distill(epochs=2, lr=1e6, optimizer="sgd"), student, _ctx(cache, digits, teacher))
    kept = Path(str(e.value).split("kept at ")[1].split(" ")[0])
    assert _same_weights(_reload(Artifact("pytorch", kept, "", student.inputs)), load_torch(student))


def test_nan_loss_keeps_the_last_finished_epoch(cache: Cache, teacher: Artifact, digits: DataBundle,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    student = _narrow_student(teacher, cache)
    snap: dict[str, dict[str, torch.Tensor]] = {}

    def poison_after_1(epoch: int, info: dict[str, Any]) -> None:
        snap["epoch1"] = torch.load(info["checkpoint"], weights_only=True)["student"]
        with torch.no_grad():  # the weights diverge during epoch 2
            info["student"].classifier.weight.fill_(float("nan"))

    monkeypatch.setattr(distill_mod, "_epoch_end_hook", poison_after_1)
    with pytest.raises(PassError, match=r"loss became nan at epoch 2.*student after epoch 1.*kept at") as e:
        _run(Distill(epochs=3), student, _ctx(cache, digits, teacher))
    kept = Path(str(e.value).split("kept at ")[1].split(" ")[0])
    got = _reload(Artifact("pytorch", kept, "", student.inputs)).state_dict()
    assert all(torch.equal(got[k], snap["epoch1"][k]) for k in got)
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())


# ---------------------------------------------------------------- chains with the other passes


def test_prune_channels_then_distill_through_the_manager(cache: Cache, teacher: Artifact,
                                                         digits: DataBundle) -> None:
    if "prune.channels" not in passes():
        pytest.skip("prune.channels is not registered (passes/prune_channels.py missing or failed to import)")
    cfg_cls = passes()["prune.channels"].config_cls
    chain = [cfg_cls(ratio=0.5), Distill(epochs=2, lr=3e-3, features=["features.5"])]
    out = _run(chain, teacher, _ctx(cache, digits, teacher))
    info = out.metadata["distill"]
    assert info["teacher_digest"] == teacher.digest
    assert info["loss_terms"]["feature"]["projections"] == ["Conv2d"]
    assert out.metadata["history"][0].startswith("prune.channels")
    assert info["accuracy_after"] >= info["accuracy_before"]
    rebuilt = _reload(out)  # prune.channels' structure step replays; distill adds none
    assert rebuilt.features[0].out_channels < 32
    assert [s["hook"] for s in torch_meta(out)[1]] == ["prune.channels"]
    assert _same_weights(rebuilt, load_torch(out))


def test_prune_then_distill_through_the_python_api(tmp_path: Path, teacher: Artifact, digits: DataBundle) -> None:
    if "prune.channels" not in passes():
        pytest.skip("prune.channels is not registered (passes/prune_channels.py missing or failed to import)")
    import compress

    cfg_cls = passes()["prune.channels"].config_cls
    module = load_torch(teacher)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    small = compress.apply(module, [cfg_cls(ratio=0.5), Distill(epochs=2, lr=1e-2, batch_size=32)], SHAPE,
                           data=digits, cache_dir=tmp_path / "api")
    assert isinstance(small, nn.Module) and small.features[0].out_channels < 32
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # the input is untouched
    x = torch.from_numpy(np.ascontiguousarray(digits.val.x))
    with torch.no_grad():
        agree = float((small(x).argmax(1) == module(x).argmax(1)).float().mean())
    assert agree > 0.8


def test_recipe_with_distill_validates(tmp_path: Path) -> None:
    from compress.stages.recipe import load_recipe

    r = tmp_path / "r.toml"
    r.write_text('model = { source = "zoo:digits-cnn" }\ndata = { source = "builtin:digits" }\n\n'
                 '[[passes]]\nkind = "distill"\nepochs = 3\nlabels = "ignore"\nfeatures = ["features.2"]\n')
    rec = load_recipe(r)
    assert rec.passes == [Distill(epochs=3, labels="ignore", features=["features.2"])]
    r.write_text('model = { source = "zoo:digits-cnn" }\n\n[[passes]]\nkind = "distill"\ntemprature = 2\n')
    with pytest.raises(Exception, match="unknown key 'temprature'.*temperature"):
        load_recipe(r)


def test_qat_then_distill_through_the_manager(cache: Cache, teacher: Artifact, digits: DataBundle) -> None:
    if "quantize.qat" not in passes():
        pytest.skip("quantize.qat is not registered (passes/quantize_qat.py missing or failed to import)")
    cfg_cls = passes()["quantize.qat"].config_cls
    qcfg = cfg_cls(epochs=1, calib_samples=16)  # the test data's calibration split holds 20 samples
    chain = PassManager([qcfg, Distill(epochs=2, lr=1e-3, patience=0)])
    out, records = chain.run(teacher, _ctx(cache, digits, teacher))
    info = out.metadata["distill"]
    qat = records[0].artifact
    assert qat is not None
    assert info["teacher_digest"] == teacher.digest and info["epochs_run"] == 2
    assert [s["hook"] for s in torch_meta(out)[1]] == ["quantize.qat"]  # QAT's structure, nothing added
    rebuilt = _reload(out)
    wrapped = [type(m).__name__ for m in rebuilt.modules() if type(m).__module__ == "compress.passes.quantize_qat"]
    assert wrapped, "the fake-quant modules did not survive distillation"
    assert _same_weights(rebuilt, load_torch(out))
    assert info["best_epoch"] == 0 or not _same_weights(rebuilt, load_torch(qat))
    x = torch.from_numpy(np.ascontiguousarray(digits.val.x[:8]))
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), load_torch(out)(x), atol=1e-5)


def test_embedding_model_is_distilled_by_cosine_not_kd(cache: Cache, digits: DataBundle) -> None:
    """An embedding output is matched by cosine and judged by cosine; no argmax agreement is reported."""
    from compress.passes.prune_channels import ChannelPrune

    from compress.api import module_artifact
    from tests.user_models import embedder

    root = module_artifact(embedder(), (1, 1, 8, 8), cache)
    data = _subset(digits, 320, 120, labelled=True)
    ctx = _ctx(cache, data, root)
    _, recs = PassManager([ChannelPrune(ratio=0.5), Distill(output_loss="cosine", epochs=4, patience=0)]).run(
        root, ctx)
    info = recs[1].info
    assert info["output_loss"] == "cosine" and info["metric"] == "teacher_cosine" and not info["labels_used"]
    assert "teacher_agreement_after" not in info
    assert info["teacher_cosine_after"] > info["teacher_cosine_before"]
    assert any("matched by cosine" in n for n in info["notes"])
    assert not any("top-1 agreement" in n for n in info["notes"])
