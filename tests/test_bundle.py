"""compress export: a bundle that runs where this package cannot be imported, and refuses what it should."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from compress.cli import main

pytest.importorskip("onnxruntime")

RECIPE = """name = "edge"
model = { source = "zoo:digits-cnn" }
measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }
[[passes]]
kind = "test.scale"
factor = 0.5
[[targets]]
kind = "onnxruntime"
"""
TVM_TARGET = '[[targets]]\nkind = "tvm"\ntuning_trials = 0\n'

# Runs a bundle's run.py with the standard library and site-packages only: no .pth file is processed (the
# editable install of this package is one) and neither the repository nor the current folder is on the path.
ISOLATED = """
import importlib.util, runpy, sys
site, script = sys.argv[1], sys.argv[2]
sys.path[:] = [p for p in sys.path if p and "site-packages" not in p] + [site]
if importlib.util.find_spec("compress") is not None:
    sys.exit("compress is importable: the bundle is not run in isolation")
print("isolated: compress not importable", file=sys.stderr)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def _has_tvm() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    recipe = root / "r.toml"
    recipe.write_text(RECIPE + (TVM_TARGET if _has_tvm() else ""))
    assert main(["run", str(recipe), "--out", str(root / "run"), "--cache", str(root / "cache"), "-q"]) == 0
    return root / "run"


def run_isolated(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = cwd / "isolated.py"
    script.write_text(ISOLATED)
    return subprocess.run([sys.executable, "-I", "-S", str(script), sysconfig.get_paths()["purelib"],
                           str(bundle / "run.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("target", ["onnxruntime", "tvm"])
def test_bundle_runs_without_the_package_and_matches_the_run(target: str, run_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    if target == "tvm" and not _has_tvm():
        pytest.skip("apache-tvm is not installed")
    out = tmp_path / f"b-{target}"
    assert main(["export", str(run_dir), "--target", target, "--out", str(out)]) == 0
    assert f"wrote {out}: edge on {target}" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    model = {"onnxruntime": "model.onnx", "tvm": "model.so"}[target]
    assert manifest["variant"] == "edge" and manifest["model"] == model and manifest["precision"] == "fp32"
    assert set(manifest["files"]) == {model, "run.py", "report.json", "report.md"}
    assert manifest["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert manifest["runtime"]["package"] == {"onnxruntime": "onnxruntime", "tvm": "apache-tvm"}[target]
    assert manifest["built_with"]["numpy"] and manifest["profile"] is None
    x = np.random.default_rng(7).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    proc = run_isolated(out, "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"),
                        "--repeat", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "isolated: compress not importable" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["outputs"] == [[1, 10]] and summary["latency_ms"]["runs"] == 3
    with np.load(tmp_path / "out.npz") as z:
        got = z["output_0"]
    # The same input through the run's own ONNX model of that variant, in this process.
    import onnxruntime as ort

    rep = json.loads((run_dir / "report.json").read_text())
    ort_cell = next(c for c in rep["results"] if c["variant"] == "edge" and c["target"] == "onnxruntime")
    ref = ort.InferenceSession(str(Path(ort_cell["compiled_path"]) / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_export_refuses_a_non_empty_folder_and_replaces_it_with_force(run_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--target", "onnxruntime", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty; refusing to overwrite" in err and err.count("\n") == 0
    assert (out / "mine.txt").read_text() == "keep me"
    assert main(["export", str(run_dir), "--target", "onnxruntime", "--out", str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it


def test_a_failure_while_writing_leaves_no_half_written_bundle(run_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.apps.bundle as bundle

    def boom(*_a: object, **_k: object) -> dict:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(bundle, "build_manifest", boom)
    out = tmp_path / "b"
    with pytest.raises(OSError, match="disk full"):
        bundle.export_bundle(run_dir, "onnxruntime", out)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_bad_export_requests_are_one_line_usage_errors(run_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["export", str(tmp_path / "nope"), "--target", "onnxruntime", "--out", str(tmp_path / "o")],
         "run folder not found"),
        (["export", str(run_dir), "--target", "openvino", "--out", str(tmp_path / "o")], "export supports"),
        (["export", str(run_dir), "--target", "onnxruntime", "--variant", "zzz", "--out", str(tmp_path / "o")],
         "--variant zzz: not in the run"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_the_bundle_refuses_a_changed_model_and_another_runtime_version(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert main(["export", str(run_dir), "--target", "onnxruntime", "--out", str(out)]) == 0
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["runtime"]["version"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    proc = run_isolated(out, cwd=tmp_path)
    assert proc.returncode == 2 and "built with onnxruntime 0.0.1" in proc.stderr
    assert run_isolated(out, "--allow-version-mismatch", cwd=tmp_path).returncode == 0
    with (out / "model.onnx").open("ab") as f:
        f.write(b"\0")
    proc = run_isolated(out, "--allow-version-mismatch", cwd=tmp_path)
    assert proc.returncode == 2 and "differs from the SHA-256 in manifest.json" in proc.stderr


def _aarch64_emulation_missing() -> str | None:
    """Why an aarch64 bundle cannot be run under qemu here (the precise missing piece), or None."""
    import os
    import shutil

    if not _has_tvm():
        return "apache-tvm is not installed"
    if shutil.which("aarch64-linux-gnu-g++") is None:
        return "needs Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu) to cross-compile"
    if shutil.which("qemu-aarch64") is None:
        return "needs qemu-user (apt-get install qemu-user) to run aarch64 code"
    from compress.targets._tvm_emulate import check_runtime

    rt = os.environ.get("COMPRESS_TVM_CROSS_RUNTIME")
    if not rt:
        return ("no aarch64 TVM runtime: set COMPRESS_TVM_CROSS_RUNTIME to a folder fetched with "
                "`compress tvm-runtime aarch64` (make test does this)")
    return check_runtime(Path(rt), "aarch64")


def test_an_aarch64_bundle_runs_under_qemu_and_matches_the_run(tmp_path: Path) -> None:
    """The deployable folder for an aarch64 device: its library, as exported, run by the aarch64 TVM runtime under
    qemu (the emulated build check's driver) on a seeded input, against the run's own ONNX model here."""
    import os

    why = _aarch64_emulation_missing()
    if why is not None:
        pytest.skip(why)
    from compress.targets._tvm_emulate import emulated_check

    from compress.core.artifact import InputSpec, sha256_file

    recipe = tmp_path / "r.toml"
    # emulate = off: the build's own qemu check is skipped, so only this test runs the library under qemu.
    recipe.write_text(RECIPE + '[[targets]]\nkind = "tvm"\ntuning_trials = 0\nemulate = "off"\n'
                      'target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mattr = ["+neon"] }\n')
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "-q"]) == 0
    out = tmp_path / "bundle"
    assert main(["export", str(tmp_path / "run"), "--target", "tvm", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and manifest["tvm"]["cross_compiled"] is True
    assert sha256_file(out / "model.so") == manifest["files"]["model.so"]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    ort_cell = next(c for c in rep["results"] if c["variant"] == manifest["variant"] and c["target"] == "onnxruntime")
    res = emulated_check(out / "model.so", Path(ort_cell["compiled_path"]) / "model.onnx",
                         [InputSpec.from_json(s) for s in manifest["inputs"]], "aarch64-linux-gnu",
                         "aarch64-linux-gnu-g++", Path(os.environ["COMPRESS_TVM_CROSS_RUNTIME"]), seed=7)
    assert res["status"] == "ok", res
    assert res["emulator"] == "qemu-aarch64" and res["cosine"] >= 0.9999
    # The same comparison against the other variant's model (the baseline, not scaled) does fail: it can.
    base = next(c for c in rep["results"] if c["variant"] == "baseline" and c["target"] == "onnxruntime")
    other = emulated_check(out / "model.so", Path(base["compiled_path"]) / "model.onnx",
                           [InputSpec.from_json(s) for s in manifest["inputs"]], "aarch64-linux-gnu",
                           "aarch64-linux-gnu-g++", Path(os.environ["COMPRESS_TVM_CROSS_RUNTIME"]), seed=7)
    assert other["status"] == "mismatch", other
