"""Recipes: validation errors that name file, key and allowed values; the text form round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.stages.recipe import format_pipeline, load_recipe, parse_pipeline, recipe_to_toml

GOOD = """
name = "r"
model = { source = "zoo:digits-cnn" }
data = { source = "builtin:digits" }

[[passes]]
kind = "test.scale"
factor = 0.5

[[passes]]
kind = "export.onnx"
dynamic_batch = false

[[targets]]
kind = "onnxruntime"
threads = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    return p


def test_good_recipe_loads_into_typed_configs(tmp_path: Path) -> None:
    rec = load_recipe(write(tmp_path, GOOD))
    assert [p.kind for p in rec.passes] == ["test.scale", "export.onnx"]
    assert rec.passes[0].factor == 0.5  # type: ignore[attr-defined]
    assert rec.targets[0].threads == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ('[[passes]]\nkind = "no.such.pass"\n', "unknown pass 'no.such.pass'; known passes:"),
        ('[[targets]]\nkind = "nosuch"\n', "unknown target 'nosuch'; known targets:"),
        ('[[passes]]\nkind = "export.onnx"\nopset = 3\n', "passes[1] (export.onnx): key 'opset'"),
        ('[[passes]]\nkind = "export.onnx"\nopsett = 20\n', "unknown key 'opsett'; allowed keys: opset"),
        ('[[passes]]\nkind = "export.onnx"\ndynamic_batch = "yes please"\n', "key 'dynamic_batch'"),
        ('[[passes]]\nfactor = 1\n', "passes[1]: missing 'kind'"),
        ("measure = { batch_sizes = [1], warmups = 3 }\n", "measure: unknown key 'warmups'; allowed keys: batch_sizes"),
        ("colour = 3\n", "unknown key 'colour'; allowed top-level keys"),
    ],
)
def test_recipe_errors_name_file_key_and_allowed_values(tmp_path: Path, snippet: str, expected: str) -> None:
    p = write(tmp_path, 'model = { source = "zoo:digits-cnn" }\n' + snippet)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value)
    assert expected in str(e.value)


def test_missing_recipe_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "model = {"))


def test_missing_model_is_explained(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="missing required key 'model'"):
        load_recipe(write(tmp_path, 'name = "x"\n'))


def test_text_form_round_trips() -> None:
    text = 'test.scale{factor=0.25},export.onnx{opset=18,dynamic_batch=false} -> torch,onnxruntime{threads=1}'
    passes, targets = parse_pipeline(text)
    assert format_pipeline(passes, targets) == text
    again = parse_pipeline(format_pipeline(passes, targets))
    assert again == (passes, targets)


def test_text_form_and_toml_describe_the_same_pipeline(tmp_path: Path) -> None:
    rec = load_recipe(write(tmp_path, GOOD))
    passes, targets = parse_pipeline(rec.pipeline_text())
    assert passes == rec.passes and targets == rec.targets
    # and the TOML the tool writes reads back to the same recipe
    rec2 = load_recipe(write(tmp_path, recipe_to_toml(rec)))
    assert rec2.passes == rec.passes and rec2.targets == rec.targets and rec2.model == rec.model


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("export.onnx{opset=20", "unbalanced"),
        ("export.onnx{opset}", "is not key=value"),
        ("export.onnx{opset=twenty}", "not a TOML literal"),
        ("a -> b -> c", "more than one '->'"),
        ("export.onnx{opset=99}", "key 'opset'"),
    ],
)
def test_text_form_errors(text: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        parse_pipeline(text)
