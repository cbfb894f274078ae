"""Commands that need no heavy library answer without importing one.

Wall-clock is not asserted (machines differ); which modules got imported is. torch alone costs
1.5-2 s to import, so "torch not in sys.modules" is what keeps `compress passes`, `--help` and a
recipe error well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnxruntime", "tvm", "sklearn", "matplotlib")


def _python(code: str, cwd: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter on this checkout; it prints a JSON object last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


PROBE = """
import contextlib, io, json, sys
from compress.cli import main
codes = {{}}
for name, args in {cases!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes[name] = main(args)
print(json.dumps({{"codes": codes, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def test_help_and_recipe_errors_import_no_heavy_library(tmp_path: Path) -> None:
    (tmp_path / "syntax.toml").write_text("model = { source = \n")
    (tmp_path / "topkey.toml").write_text('modle = { source = "zoo:digits-cnn" }\n')
    (tmp_path / "model.toml").write_text('model = { source = "zoo:digits-cnn", train_epochs = 5000 }\n')
    (tmp_path / "measure.toml").write_text('model = { source = "zoo:digits-cnn" }\nmeasure = { batch_sizes = [0] }\n')
    cases = [
        ("help", ["--help"]),
        ("run-help", ["run", "--help"]),
        ("syntax", ["run", "syntax.toml"]),
        ("topkey", ["run", "topkey.toml"]),
        ("model", ["run", "model.toml"]),
        ("measure", ["run", "measure.toml"]),
        ("missing", ["run", "nope.toml"]),
        ("override", ["run", "--model", "zoo:digits-cnn", "--train-epochs", "5000"]),
        ("bad-flag", ["run", "--train-epochs", "x"]),
    ]
    got = _python(PROBE.format(cases=cases, heavy=HEAVY), tmp_path)
    assert got["codes"] == {"help": 0, "run-help": 0, **{n: 2 for n, _ in cases[2:]}}
    assert got["heavy"] == []


def test_passes_listing_from_the_manifest_imports_no_torch(tmp_path: Path) -> None:
    # The first call may build the manifest (importing every plugin); the second must not import torch.
    probe = ("import contextlib, io, json, sys\nfrom compress.cli import main\nbuf = io.StringIO()\n"
             "with contextlib.redirect_stdout(buf):\n    code = main(['passes'])\n"
             f"print(json.dumps({{'code': code, 'out': buf.getvalue(), "
             f"'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    first = _python(probe, tmp_path)
    second = _python(probe, tmp_path)
    assert first["code"] == second["code"] == 0
    assert second["out"] == first["out"] and "export.onnx  (pytorch -> onnx)" in str(second["out"])
    if second["heavy"]:
        pytest.fail(f"`compress passes` imported {second['heavy']} although its manifest was written "
                    "(is compress/__pycache__ writable?)")


def test_manifest_matches_the_live_registry() -> None:
    from compress.core import registry

    registry.manifest()  # writes it when missing
    cached = registry.cached_manifest()
    if cached is None:
        pytest.skip("compress/__pycache__ is not writable here: the listing is built live each time")
    live = registry._describe({k: i for k, i in registry.passes().items() if registry._is_plugin(i.fn.__module__)},
                              {k: t for k, t in registry.targets().items() if registry._is_plugin(t[1].__module__)},
                              {k: c for k, c in registry.commands().items() if registry._is_plugin(c.fn.__module__)})
    assert cached == json.loads(json.dumps(live))
    # In-process registrations (conftest's test.scale) are listed too, but never written to disk.
    assert "test.scale" in registry.manifest()["passes"] and "test.scale" not in cached["passes"]


def test_unknown_pass_is_named_without_loading_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.core import registry
    from compress.errors import RecipeError

    registry.manifest()
    if registry.cached_manifest() is None:
        pytest.skip("compress/__pycache__ is not writable here")
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_load_plugins", lambda: pytest.fail("plugins loaded for an unknown name"))
    with pytest.raises(RecipeError, match="unknown pass 'prune.everything'; known passes: distill"):
        registry.get_pass("prune.everything")
    with pytest.raises(RecipeError, match="unknown target 'npu'"):
        registry.get_target_config("npu")


def test_settings_errors_targets_and_version_answer_without_a_heavy_import(tmp_path: Path) -> None:
    """A typo in a pass's or target's settings (in a recipe or a budgets file), `compress targets` and
    `--version` are answered from the plugin manifest: no torch, no runtime imported."""
    subprocess.run([sys.executable, "-m", "compress", "passes"], cwd=tmp_path, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # builds the manifest once if it is stale
    (tmp_path / "bound.toml").write_text('model = { source = "zoo:digits-cnn" }\n[[passes]]\nkind = "prune.channels"\n'
                                         'ratio = 5\n')
    (tmp_path / "choice.toml").write_text('model = { source = "zoo:digits-cnn" }\n[[passes]]\nkind = "quantize.int8"\n'
                                          'calibration = "foo"\n')
    (tmp_path / "tkey.toml").write_text('model = { source = "zoo:digits-cnn" }\n[[targets]]\nkind = "onnxruntime"\n'
                                        'treads = 2\n')
    (tmp_path / "b.toml").write_text('models = { m = "bound.toml" }\n[[budget]]\nmodel = "m"\nmetric = "p50"\n'
                                     'max = "1 ms"\n')
    (tmp_path / "unit.toml").write_text('models = { m = "choice.toml" }\n[[budget]]\nmodel = "m"\nmetric = "p50"\n'
                                        'max = "1"\n')
    cases = [
        ("bound", ["run", "bound.toml"]),
        ("choice", ["run", "choice.toml"]),
        ("tkey", ["run", "tkey.toml"]),
        ("budget-recipe", ["check", "b.toml"]),
        ("budget-unit", ["check", "unit.toml", "--debug"]),  # a global flag after the subcommand
        ("targets", ["targets"]),
        ("targets-json", ["targets", "--json"]),
        ("passes-json", ["passes", "--json", "-q"]),
        ("version", ["--version"]),
    ]
    got = _python(PROBE.format(cases=cases, heavy=HEAVY), tmp_path)
    assert got["codes"] == {"bound": 2, "choice": 2, "tkey": 2, "budget-recipe": 2, "budget-unit": 2,
                            "targets": 0, "targets-json": 0, "passes-json": 0, "version": 0}
    assert got["heavy"] == []


def test_settings_errors_read_the_same_from_the_manifest_and_from_the_plugins(tmp_path: Path) -> None:
    """The fast answer (from the manifest's JSON Schema) is the message the full validation gives."""
    from compress.core import registry
    from compress.errors import RecipeError
    from compress.stages.recipe import load_recipe

    registry.manifest()
    if registry.cached_manifest() is None:
        pytest.skip("compress/__pycache__ is not writable here")
    p = tmp_path / "r.toml"
    p.write_text('model = { source = "zoo:digits-cnn" }\n[[passes]]\nkind = "quantize.int8"\ncalibration = "foo"\n'
                 'ratoi = 3\n[[passes]]\nkind = "prune.channels"\nratio = 5\n')
    with pytest.raises(RecipeError) as slow:
        load_recipe(p)  # plugins are loaded in this process: the full validation
    saved = registry._loaded
    try:
        registry._loaded = False
        with pytest.raises(RecipeError) as fast:
            load_recipe(p)
    finally:
        registry._loaded = saved
    assert str(fast.value) == str(slow.value)
    assert "Input should be 'minmax', 'percentile' or 'entropy'" in str(fast.value) and "unknown key 'ratoi'" in str(
        fast.value)


def test_version_and_global_flags_after_the_subcommand(capsys) -> None:
    from compress import __version__
    from compress.cli import main

    with pytest.raises(SystemExit) as e:
        from compress.commands.parser import build_parser as _parser

        _parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"compress {__version__}"
    a = _parser().parse_args(["check", "b.toml", "--debug", "-q"])
    assert a.debug and a.quiet
    a = _parser().parse_args(["--debug", "-q", "run", "r.toml"])
    assert a.debug and a.quiet  # before the subcommand still works
    assert main(["passes", "--json"]) == 0
    assert "export.onnx" in json.loads(capsys.readouterr().out)["passes"]


def test_out_means_the_same_for_every_command(tmp_path: Path, capsys) -> None:
    """run/compare --out: a new or empty folder, or the command's own earlier output, is written; a folder
    holding other files needs --force, as export's does."""
    from compress.cli import main
    from compress.commands.run_cmd import own_out as _own_out
    from compress.errors import InputError

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    (tmp_path / "r.toml").write_text('model = { source = "zoo:digits-cnn" }\n')
    assert main(["run", str(tmp_path / "r.toml"), "--out", str(mine)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["compare", "digits-cnn", "--out", str(mine)]) == 2
    assert (mine / "thesis.tex").read_text() == "precious"
    _own_out(mine, force=True)
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "report.json").write_text("{}")
    _own_out(earlier, force=False)  # a previous run's folder is updated in place
    _own_out(tmp_path / "new", force=False)
    with pytest.raises(InputError, match="not a compress run's"):
        _own_out(mine, force=False)
