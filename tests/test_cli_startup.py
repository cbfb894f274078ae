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
    from compress import registry

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
    from compress import registry
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
