"""Install like a library: the core (torch, ONNX, ONNX Runtime and what the pipeline needs) works alone, each
heavy backend is an extra, and an absent one says how to get it. The wheel carries the plugins, the
profiles and the templates, and works outside the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The extras' import names: with only the core installed none of them can be imported.
EXTRAS = ("torch_pruning", "nncf", "optuna", "ray", "tvm", "tvm_ffi", "openvino", "transformers", "tensorrt", "cuda")

# A fresh interpreter in which the extras' modules do not exist (as after `pip install .` without extras).
BLOCK = f"""
import sys
for name in {EXTRAS!r}:  # as if never installed: imports fail, importlib.util.find_spec answers None
    sys.modules[name] = None
from compress.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _core_only(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_CACHE": str(cwd / "c")}
    return subprocess.run([sys.executable, "-c", BLOCK, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_core_dependencies_are_light_and_backends_are_extras() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(meta["dependencies"]).lower()
    for heavy in ("apache-tvm", "openvino", "nncf", "ray", "transformers", "tensorrt", "optuna", "torch-pruning"):
        assert heavy not in core, f"{heavy} is a core dependency; make it an extra"
    extras = meta["optional-dependencies"]
    assert {"tvm", "openvino", "quant", "prune", "search", "ray", "hf", "tensorrt"} <= set(extras)


def test_every_command_works_with_only_the_core(tmp_path: Path) -> None:
    r = _core_only(["passes"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = _core_only(["targets", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["targets"]
    assert got["onnxruntime"]["available"] and got["torch"]["available"]
    assert not got["tvm"]["available"] and "pip install 'compress-pipeline[tvm]'" in got["tvm"]["reason"]
    assert not got["openvino"]["available"] and "[openvino]" in got["openvino"]["reason"]
    (tmp_path / "r.toml").write_text('name = "core"\nmodel = { source = "zoo:digits-cnn" }\n'
                                     'data = { source = "builtin:digits" }\n'
                                     'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                                     '[[passes]]\nkind = "quantize.int8"\n[[targets]]\nkind = "onnxruntime"\n')
    r = _core_only(["run", "r.toml", "--out", "o", "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    # A pass whose library is an extra says which extra, in one line.
    (tmp_path / "p.toml").write_text('model = { source = "zoo:digits-cnn" }\n[[passes]]\nkind = "prune.channels"\n'
                                     'ratio = 0.5\n[[targets]]\nkind = "onnxruntime"\n')
    r = _core_only(["run", "p.toml", "--out", "o2", "-q"], tmp_path)
    assert r.returncode != 0 and "torch" in r.stderr.lower() and "pip install" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    """The built wheel in a fresh venv (its dependencies from this environment, so nothing is downloaded):
    the plugins, profiles and templates are in it, and a run works from a folder with no source tree."""
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next(dist.glob("compress_pipeline-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import zipfile

    with zipfile.ZipFile(wheel) as z:  # install = unpack into site-packages (pip is not in an empty venv)
        names = z.namelist()
        z.extractall(site)
    assert "compress/stages/profiles.toml" in names and any(n.startswith("compress/passes/") for n in names)
    assert any(n.startswith("compress/targets/") for n in names) and "compress/templates/bundle_run.py" in names
    work = tmp_path / "work"
    work.mkdir()
    deps = sysconfig.get_paths()["purelib"]  # torch, onnx, onnxruntime ... from this environment
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": deps, "COMPRESS_CACHE": str(work / "c")})
    where = subprocess.run([str(py), "-c", "import compress; print(compress.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and where.stdout.startswith(site), where.stdout + where.stderr
    (work / "r.toml").write_text('name = "w"\nmodel = { source = "zoo:digits-cnn" }\n'
                                 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                                 '[[passes]]\nkind = "quantize.fp16"\n[[targets]]\nkind = "onnxruntime"\n')
    for args in (["--version"], ["passes"], ["targets"], ["run", "r.toml", "--out", "o", "-q"]):
        r = subprocess.run([str(py), "-m", "compress", *args], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"compress {' '.join(args)}: {r.stderr[-2000:]}"
