"""An existing ONNX model goes through every ONNX pass and target: from the command line, a recipe,
``compress compare`` and the Python API. The lowering pass is inserted only where a PyTorch model meets
an ONNX consumer; a PyTorch pass on an ONNX source is refused with the reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch
from compress.passes.export_onnx import ExportOnnx

from compress.cli import main
from compress.core.manager import PassContext, PassManager
from compress.core.registry import get_pass
from compress.inputs.models import load_model
from compress.stages.plan import with_lowering
from compress.stages.recipe import ModelSpec

FAST = 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0, max_time_s = 5.0 }\n'


@pytest.fixture
def onnx_file(tmp_path: Path, cache) -> Path:
    """A trained-free digits CNN exported to a standalone fp32.onnx (what a user brings)."""
    art = load_model(ModelSpec(source="zoo:digits-cnn"), cache)
    out, _ = PassManager([ExportOnnx()]).run(art, PassContext(cache=cache, progress=False))
    dst = tmp_path / "fp32.onnx"
    onnx.save(onnx.load(str(out.path / "model.onnx")), str(dst))
    return dst


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def test_lowering_is_inserted_only_where_pytorch_meets_onnx() -> None:
    int8 = get_pass("quantize.int8").config_cls()
    scale = get_pass("test.scale").config_cls()
    kinds = lambda chain: [c.kind for c in chain]  # noqa: E731
    # An ONNX source: nothing inserted, whatever the targets need.
    assert with_lowering([int8], True, "onnx") == ([int8], False)
    assert with_lowering([], True, "onnx") == ([], False)
    # A PyTorch source: before the first ONNX pass, or at the end when a target needs ONNX.
    chain, auto = with_lowering([scale, int8], True, "pytorch")
    assert auto and kinds(chain) == ["test.scale", "export.onnx", "quantize.int8"]
    chain, auto = with_lowering([scale], True, "pytorch")
    assert auto and kinds(chain) == ["test.scale", "export.onnx"]
    assert with_lowering([scale], False, "pytorch") == ([scale], False)


def test_recipe_and_command_line_quantize_an_onnx_model(tmp_path: Path, capsys, onnx_file: Path) -> None:
    r = tmp_path / "r.toml"
    r.write_text(f'name = "q"\nmodel = {{ source = "{onnx_file.name}" }}\ndata = {{ source = "builtin:digits" }}\n'
                 + FAST + '[[passes]]\nkind = "quantize.int8"\n[[targets]]\nkind = "onnxruntime"\n')
    out = tmp_path / "o"
    code, _, err = _run(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    steps = [s["pass"] for s in rep["variants"]["q"]["steps"]]
    assert steps == ["quantize.int8"]  # no export.onnx the user never named
    assert {c["status"] for c in rep["results"]} == {"ok"}
    assert rep["variants"]["q"]["facts"]["precision"] == "int8"
    # The produced model files are reachable from the run folder, and report.json names where.
    for c in rep["results"]:
        assert c["artifact_dir"] == f"artifacts/{c['variant']}/{c['target']}"
        assert (out / c["artifact_dir"] / "model.onnx").is_file()
    built = onnx.load(str(out / "artifacts" / "q" / "onnxruntime" / "model.onnx"))
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv", "DynamicQuantizeLinear", "ConvInteger")
               for n in built.graph.node)
    # The portable ONNX of each variant is there too, and is a source the ONNX passes take as it is; a runtime's
    # saved build with layout-specific operators (ONNX Runtime's NCHWc on x86) is refused with where to look.
    assert (out / "artifacts" / "q" / "onnx" / "model.onnx").is_file()
    built_fp32 = out / "artifacts" / "baseline" / "onnxruntime" / "model.onnx"
    layout = any(n.domain.endswith(".nchwc") for n in onnx.load(str(built_fp32)).graph.node)
    for src, want in ((out / "artifacts" / "baseline" / "onnx" / "model.onnx", 0), (built_fp32, 2 if layout else 0)):
        code, _, err = _run(capsys, "run", str(r), "--model", str(src), "--out", str(tmp_path / "o3"),
                            "--cache", str(tmp_path / "c"), "-q")
        assert code == want, err
        if want == 2:
            assert "artifacts/VARIANT/onnx/model.onnx" in err
    # Written with the user's umask (mkstemp alone would make them 0600).
    assert (out / "report.json").stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
    # The same model and pass from the command line, with FP16 through --pipeline over the recipe.
    code, _stdout, err = _run(capsys, "run", str(r), "--model", str(onnx_file), "--pipeline",
                             "quantize.fp16 -> onnxruntime", "--out", str(tmp_path / "o2"),
                             "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    rep = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert [s["pass"] for s in rep["variants"]["q"]["steps"]] == ["quantize.fp16"]
    assert rep["variants"]["q"]["facts"]["precision"] == "fp16"


def test_torch_pass_on_an_onnx_source_is_refused_with_why(tmp_path: Path, capsys, onnx_file: Path) -> None:
    code, _, err = _run(capsys, "run", "--model", str(onnx_file), "--pipeline",
                        "prune.channels{ratio=0.5} -> onnxruntime", "--out", str(tmp_path / "o"),
                        "--cache", str(tmp_path / "c"))
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "cannot be turned back into PyTorch" in line and "quantize.int8" in line
    assert "put it before export.onnx" not in line  # the old, circular advice


def test_compare_precisions_of_an_onnx_file(tmp_path: Path, capsys, onnx_file: Path) -> None:
    out = tmp_path / "cmp"
    code, _stdout, err = _run(capsys, "compare", str(onnx_file), "--precision", "fp32,int8", "--targets",
                             "onnxruntime", "--data", "builtin:digits", "--rounds", "3", "--min-time", "0",
                             "--out", str(out), "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert {(c["variant"], c["status"]) for c in rep["results"]} == {("baseline", "ok"), ("int8", "ok")}
    assert [s["pass"] for s in rep["variants"]["int8"]["steps"]] == ["quantize.int8"]


def test_python_api_applies_onnx_passes_to_a_file_and_to_a_module(tmp_path: Path, onnx_file: Path, tiny) -> None:
    import compress

    int8 = get_pass("quantize.int8").config_cls()
    art = compress.apply(onnx_file, int8, data="builtin:digits", cache_dir=tmp_path / "c")
    assert art.kind == "onnx" and art.known_facts().precision == "int8"
    assert art.metadata["history"] == ["quantize.int8"]
    # A module meeting an ONNX pass: the lowering goes in between by itself.
    art = compress.apply(tiny, int8, input_shape=(1, 1, 8, 8), data="builtin:digits", cache_dir=tmp_path / "c")
    assert art.kind == "onnx" and art.metadata["history"][0].startswith("export.onnx")
    assert isinstance(compress.apply(tiny, get_pass("test.scale").config_cls(), input_shape=(1, 1, 8, 8),
                                     cache_dir=tmp_path / "c"), torch.nn.Module)
