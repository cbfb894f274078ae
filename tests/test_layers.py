"""The one layer selector (``skip``): every form on torch modules and ONNX nodes, the check against the model, the
Python predicate, and the old per-pass keys still accepted with a deprecation line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from compress.passes.prune_2to4 import TwoFourPrune
from compress.passes.prune_channels import ChannelPrune
from compress.passes.prune_magnitude import MagnitudePrune
from compress.passes.quantize_dynamic import QuantizeDynamic
from compress.passes.quantize_fp16 import QuantizeFp16
from compress.passes.quantize_int8 import QuantizeInt8
from compress.passes.quantize_nncf import QuantizeNncf
from compress.passes.quantize_nncf_weights import QuantizeNncfWeights
from compress.passes.quantize_qat import QuantizeQat
from compress.passes.quantize_weight_only import QuantizeWeightOnly
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import compress
from compress.core import notices
from compress.core.config import format_step
from compress.core.layers import LayerSelector, onnx_layers, torch_layers
from compress.errors import RecipeError
from compress.stages.recipe import parse_pipeline


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(self.conv1(x))).mean((2, 3)))


WEIGHTED = ["conv1", "block.0", "fc"]


def _sel(value: Any, model: Any = None, layers: Any = None) -> list[str]:
    layers = layers if layers is not None else torch_layers(model or _Net())
    return LayerSelector.parse(value).select(layers, "test.pass", eligible=WEIGHTED)


# --- every form, on torch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (["fc"], ["fc"]),                                   # a name
    ("fc", ["fc"]),                                     # one string is one entry
    (["block.*"], ["block.0", "block.1"]),              # a glob, whole name
    (["re:(conv1|fc)"], ["conv1", "fc"]),               # a regular expression, whole name
    (["type:Conv2d"], ["conv1", "block.0"]),            # a module class
    (["first"], ["conv1"]), (["last"], ["fc"]),         # the pass's first / last eligible layer
    (["fc", "first", "type:Linear"], ["conv1", "fc"]),  # several, in model order, each once
])
def test_each_selector_form_on_torch_modules(value: Any, expected: list[str]) -> None:
    assert _sel(value) == expected


def test_predicate_on_torch_modules_gets_the_module_and_its_name() -> None:
    seen: list[tuple[str, str]] = []

    def fn(m: nn.Module, name: str) -> bool:
        seen.append((type(m).__name__, name))
        return isinstance(m, nn.ReLU)

    assert _sel(fn) == ["block.1"]
    assert ("Linear", "fc") in seen and ("Sequential", "block") in seen
    assert _sel(["fc", fn]) == ["block.1", "fc"]  # entries and a predicate together


# --- every form, on ONNX ----------------------------------------------------------------------------------------

def _mlp_onnx(path: Path) -> Path:
    """input [1, 8] -> MatMul(mm_a) -> Relu -> MatMul(mm_b) -> output [1, 4], weights as initializers."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="mm_a"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["output"], name="mm_b")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("value, expected", [
    (["act"], ["act"]), (["mm_*"], ["mm_a", "mm_b"]), (["re:mm_[b-z]"], ["mm_b"]), (["type:Relu"], ["act"]),
    (["first"], ["mm_a"]), (["last"], ["mm_b"]),
])
def test_each_selector_form_on_onnx_nodes(tmp_path: Path, value: list[str], expected: list[str]) -> None:
    layers = onnx_layers(onnx.load(str(_mlp_onnx(tmp_path / "m.onnx"))))
    got = LayerSelector.parse(value).select(layers, "test.pass", eligible=["mm_a", "mm_b"])
    assert got == expected
    node_pred = LayerSelector.parse(lambda node, name: node.op_type == "MatMul" and name != "mm_a")
    assert node_pred.select(layers, "test.pass") == ["mm_b"]


def _float32_weights(art: Any) -> set[str]:
    m = onnx.load(str(art.path / "model.onnx"))
    return {t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT}


@pytest.mark.parametrize("skip", [["last"], ["mm_b"], ["re:mm_[b-z]", "type:Relu"],
                                  [lambda node, name: name == "mm_b"]])
def test_fp16_on_onnx_keeps_what_skip_selects_in_float32(tmp_path: Path, skip: list[Any]) -> None:
    src = _mlp_onnx(tmp_path / "m.onnx")
    out = compress.apply(src, QuantizeFp16(skip=skip), cache_dir=tmp_path / "cache")
    kept = out.metadata["quantize.fp16"]["kept_float"]
    assert "mm_b" in kept
    assert "w2" in _float32_weights(out)  # the skipped MatMul reads a float32 weight
    if "mm_a" not in kept:
        assert "w1" not in _float32_weights(out)


# --- the check against the model --------------------------------------------------------------------------------

def test_an_entry_that_selects_nothing_is_one_usage_line_naming_the_closest_names(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        compress.apply(_Net(), MagnitudePrune(skip=["conv1", "blok.0"]), input_shape=(1, 3, 8, 8),
                       cache_dir=tmp_path)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert "prune.magnitude: skip entry 'blok.0' selects no layer of the model; closest names: 'block.0'" in msg
    for bad, says in [(["type:Conv3d"], "the model has no Conv3d; closest: type:Conv2d"),
                      (["re:head.*"], "skip entry 're:head.*' selects no layer"),
                      (["re:(("], "is not a regular expression")]:
        with pytest.raises(RecipeError, match=says.replace("(", r"\(").replace(".", r"\.").replace("*", r"\*")):
            _sel(bad)
    with pytest.raises(RecipeError, match="the skip predicate .* selects no layer"):
        _sel(lambda m, n: False)


def test_a_bad_skip_on_onnx_is_refused_before_the_pass_works(tmp_path: Path) -> None:
    src = _mlp_onnx(tmp_path / "m.onnx")
    with pytest.raises(RecipeError, match="quantize.fp16: skip entry 'mm_c' selects no node of the model; "
                                          "closest names: 'mm_b', 'mm_a' \\(the ONNX graph's node names"):
        compress.apply(src, QuantizeFp16(skip=["mm_c"]), cache_dir=tmp_path / "cache")


def test_skip_takes_only_strings_and_one_predicate() -> None:
    with pytest.raises(ValueError, match="skip takes"):
        MagnitudePrune(skip=[3])
    with pytest.raises(ValueError, match="at most one"):
        MagnitudePrune(skip=[lambda m, n: True, lambda m, n: False])


# --- the predicate from the Python API --------------------------------------------------------------------------

def test_predicate_from_the_api_leaves_the_selected_layers_unpruned(tmp_path: Path) -> None:
    net = _Net()
    out = compress.apply(net, MagnitudePrune(sparsity=0.5, skip=lambda m, name: isinstance(m, nn.Linear)),
                         input_shape=(1, 3, 8, 8), cache_dir=tmp_path)
    assert bool((out.fc.weight != 0).all())  # skipped: dense
    assert float((out.conv1.weight == 0).float().mean()) > 0.3  # pruned


def test_predicate_identity_is_in_the_cache_key_and_report() -> None:
    def under(limit: int) -> Any:
        return lambda m, name: name.count(".") > limit

    a, b, a2 = MagnitudePrune(skip=under(0)), MagnitudePrune(skip=under(1)), MagnitudePrune(skip=under(0))
    assert a.canonical() == a2.canonical() and a.canonical() != b.canonical()  # a closure value changes the key
    assert a.options()["skip"][0].startswith("predicate:") and "@sha256:" in a.options()["skip"][0]


def test_text_form_round_trips() -> None:
    cfg = ChannelPrune(ratio=0.5, skip=["first", "blocks.*", "type:LayerNorm", "re:a|b"])
    passes, _ = parse_pipeline(format_step(cfg))
    assert passes[0] == cfg


# --- the old keys, one release with a deprecation line ----------------------------------------------------------

OLD = [
    (ChannelPrune, {"ratio": 0.5}, "keep", ["fc"], ("fc",)),
    (MagnitudePrune, {}, "keep", ["fc"], ("fc",)),
    (TwoFourPrune, {}, "keep", ["fc"], ("fc",)),
    (QuantizeInt8, {}, "keep_float", ["first", "last"], ("first", "last")),
    (QuantizeQat, {}, "keep_float", ["first"], ("first",)),
    (QuantizeNncf, {}, "keep_float", ["conv1"], ("conv1",)),
    (QuantizeNncf, {}, "keep_float_patterns", ["blocks\\..*"], ("re:blocks\\..*",)),
    (QuantizeNncf, {}, "keep_float_types", ["Softmax"], ("type:Softmax",)),
    (QuantizeDynamic, {}, "keep_float", ["mm_b"], ("mm_b",)),
    (QuantizeWeightOnly, {}, "keep_float", ["lm_head"], ("lm_head",)),
    (QuantizeNncfWeights, {}, "keep_float", ["mm_b"], ("mm_b",)),
    (QuantizeFp16, {}, "keep_ops", ["LayerNormalization"], ("type:LayerNormalization",)),
]


@pytest.mark.parametrize("cls, base, key, value, entries", OLD, ids=[f"{c.__name__}-{k}" for c, _, k, _, _ in OLD])
def test_old_key_still_works_with_one_deprecation_line(cls: Any, base: dict[str, Any], key: str, value: list[str],
                                                      entries: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "_WARNED", set())
    cfg = cls(**base, **{key: value})
    assert cfg.skip.entries == entries and cfg == cls(**base, skip=list(entries))
    err = capsys.readouterr().err.strip().splitlines()
    kind = cls.model_fields["kind"].default
    spelled = "[" + ", ".join(f'"{e}"' for e in entries) + "]"
    assert err == [f"warning: {kind}: '{key}' is deprecated and goes in the next release; write skip = {spelled} "
                   "(docs/passes.md, Choosing layers)"]


def test_old_key_in_a_recipe_runs_as_the_new_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "_WARNED", set())
    (old,), _ = parse_pipeline('prune.magnitude{sparsity=0.5,keep=["fc"]}')
    assert "'keep' is deprecated" in capsys.readouterr().err
    net = _Net()
    a = compress.apply(net, old, input_shape=(1, 3, 8, 8), cache_dir=tmp_path / "a")
    b = compress.apply(net, MagnitudePrune(sparsity=0.5, skip=["fc"]), input_shape=(1, 3, 8, 8),
                       cache_dir=tmp_path / "b")
    assert bool((a.fc.weight != 0).all())
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_old_keys_in_a_toml_recipe_pass_the_fast_schema_check(tmp_path: Path) -> None:
    """A fresh process answers recipe typos from the plugin manifest's JSON Schema before importing any pass: the
    old keys must get through it to the pass's own validation (and its warning), and a typo still must not."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    rec = tmp_path / "r.toml"
    rec.write_text('name = "old"\nmodel = { source = "zoo:digits-cnn" }\n\n[[passes]]\nkind = "prune.channels"\n'
                   'ratio = 0.5\nkeep = ["fc"]\n\n[[passes]]\nkind = "quantize.nncf"\nkeep_float_types = ["Gemm"]\n')
    code = ("import sys; from compress.stages.recipe import load_recipe; r = load_recipe(sys.argv[1]); "
            "print([p.skip.entries for p in r.passes])")
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", code, str(rec)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[('fc',), ('type:Gemm',)]"
    assert "prune.channels: 'keep' is deprecated" in r.stderr and "'keep_float_types' is deprecated" in r.stderr
    rec.write_text(rec.read_text().replace("keep = ", "kep = "))
    r = subprocess.run([sys.executable, "-c", code, str(rec)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "unknown key 'kep'" in r.stderr


def test_the_report_names_the_skipped_layers_as_skip_takes_them(tmp_path: Path) -> None:
    from compress.passes.export_onnx import ExportOnnx

    out = compress.apply(_Net(), [MagnitudePrune(sparsity=0.5, skip=["type:Linear", "block.*"]), ExportOnnx()],
                         input_shape=(1, 3, 8, 8), cache_dir=tmp_path)
    kept = out.metadata["prune.magnitude"]["kept"]
    assert kept == ["block.0", "block.1", "fc"]
    again = MagnitudePrune(sparsity=0.5, skip=kept)  # pasted back, it selects the same layers
    assert again.skip.select(torch_layers(_Net()), "prune.magnitude") == kept


def test_predicate_identity_is_the_same_in_another_process() -> None:
    """The key must not hold addresses (a nested function's code object prints one), or every run would miss."""
    import subprocess
    import sys

    code = ("from compress.passes.prune_magnitude import MagnitudePrune\n"
            "def pred(m, name, depth=1):\n"
            "    inner = lambda n: n.count('.') >= depth\n"
            "    return inner(name)\n"
            "print(MagnitudePrune(skip=pred).canonical()['skip'][0])\n")
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and "@sha256:" in runs[0].stdout


def test_outermost_and_expand_follow_dotted_names() -> None:
    from compress.core.layers import expand, outermost

    assert outermost(["a", "a.b", "a.b.c", "ab", "ab.c", "x.y", "x.y.z"]) == ["a", "ab", "x.y"]
    assert expand(["a.b", "x"], ["a", "a.b", "a.b.c", "a.bc", "x", "x.1", "xy"]) == ["a.b", "a.b.c", "x", "x.1"]


def test_a_torch_pass_skip_typo_is_refused_in_the_plan_before_any_pass_runs(tmp_path: Path) -> None:
    from compress.stages.pipeline import run
    from compress.stages.recipe import recipe_from_dict

    rec = recipe_from_dict({
        "name": "typo", "model": {"source": "zoo:digits-cnn"}, "data": {"source": "builtin:digits"},
        "passes": [{"kind": "distill", "epochs": 1}, {"kind": "prune.magnitude", "skip": ["clasifier"]}],
        "targets": [{"kind": "onnxruntime"}]})
    ran: list[str] = []
    with pytest.raises(RecipeError) as e:
        run(rec, out_dir=tmp_path / "out", cache_dir=tmp_path / "c", progress=False, log=ran.append)
    assert str(e.value).startswith("prune.magnitude: skip entry 'clasifier' selects no layer of the model; "
                                   "closest names: 'classifier'")
    assert not any("distill" in line for line in ran), ran  # refused before the distillation ran
