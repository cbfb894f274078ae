"""The CLI end to end: reports written, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.cli import main

FAST = 'measure = { batch_sizes = [1, 4], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'


def recipe(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(body)
    return p


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_writes_reports_and_prints_table(tmp_path: Path, capsys) -> None:
    r = recipe(tmp_path, 'name = "t"\nmodel = { source = "zoo:digits-cnn", train_epochs = 2 }\n'
                         'data = { source = "builtin:digits" }\n' + FAST +
               '[[passes]]\nkind = "test.scale"\nfactor = 1.0\n')
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"))
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "compress.report/v1"
    assert (out / "report.md").read_text().startswith("# t")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    cells = {(c["variant"], c["target"]): c for c in rep["results"]}
    assert set(cells) == {("baseline", "torch"), ("baseline", "onnxruntime"), ("t", "torch"), ("t", "onnxruntime")}
    for c in cells.values():
        assert c["status"] == "ok"
        assert 0.5 < c["accuracy_top1"] <= 1.0  # two epochs on digits is far above chance (0.1)
        assert c["fidelity"]["agreement"] > 0.95  # factor=1.0 changes nothing
        for b in ("1", "4"):
            lat = c["latency"][b]
            assert lat["runs"] >= 3 and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert "top-1" in stdout and "onnxruntime" in stdout and "p50 ms (b1)" in stdout
    # second run: every pass and compile is a cache hit, and the step records say so
    code, _, err = run_cli(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"))
    rep2 = json.loads((out / "report.json").read_text())
    assert code == 0 and all(s["cache_hit"] for v in rep2["variants"].values() for s in v["steps"])
    assert "cache hit" in err
    assert rep2["variants"]["t"]["onnx_digest"] == rep["variants"]["t"]["onnx_digest"]


def test_no_data_means_accuracy_not_measured(tmp_path: Path, capsys) -> None:
    r = recipe(tmp_path, 'model = { source = "zoo:digits-cnn" }\n' + FAST)
    out = tmp_path / "o"
    code, stdout, err = run_cli(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert all(c["accuracy_top1"] is None for c in rep["results"])
    assert all(c["fidelity"]["agreement"] == 1.0 for c in rep["results"])  # on random inputs
    assert "not measured" in stdout
    assert any("accuracy not measured" in n for n in rep["notes"])


def test_pipeline_option_and_print_recipe(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "run", "--model", "zoo:digits-cnn", "--pipeline",
                             "test.scale{factor=0.5} -> onnxruntime{threads=1}", "--print-recipe")
    assert code == 0, err
    assert 'kind = "test.scale"' in out and "factor = 0.5" in out and "threads = 1" in out


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["run", "--model", "zoo:digits-cnn", "--pipeline", "nope.pass"], 2, "unknown pass 'nope.pass'"),
        (["run", "--model", "zoo:digits-cnn", "--pipeline", "export.onnx -> quantum"], 2, "unknown target 'quantum'"),
        (["run", "--model", "zoo:digits-cnn", "--pipeline", "export.onnx{opset=1}"], 2, "key 'opset'"),
        (["run", "missing.toml"], 2, "missing.toml: recipe file not found"),
        (["run", "--model", "zoo:nosuch"], 2, "unknown zoo model"),
        (["run", "--model", "zoo:digits-cnn", "--data", "folder:/no/such/dir"], 2, "image folder not found"),
        (["run", "--model", "zoo:digits-cnn", "--weights", "/no/such.pt"], 2, "weights file not found"),
        (["run", "--model", "zoo:digits-cnn", "--pipeline", "export.onnx,test.scale"], 2, "put it before export.onnx"),
        (["run"], 2, "give a recipe file or --model"),
        (["run", "--bogus-flag"], 2, ""),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, capsys, monkeypatch, args, code, needle) -> None:
    monkeypatch.chdir(tmp_path)
    got, _out, err = run_cli(capsys, *args)
    assert got == code
    assert needle in err
    assert "Traceback" not in err
    if needle:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_export_failure_exits_1(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", "--model", "user_models:not_exportable", "--input-shape", "1,1,8,8",
                           "--cache", str(tmp_path / "c"))
    assert code == 1
    assert "pass #1 'export.onnx' failed: NotExportable cannot be exported to ONNX" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("report.json"))


def test_debug_shows_traceback(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "--debug", "run", str(tmp_path / "missing.toml"))
    assert code == 2 and "Traceback" in err


def test_pickled_checkpoint_is_refused_with_how_to_proceed(tmp_path: Path, capsys) -> None:
    from compress.inputs.zoo import DigitsCNN

    bad = tmp_path / "whole_model.pt"
    torch.save(DigitsCNN(), bad)  # a pickled module, not a state dict
    code, _, err = run_cli(capsys, "run", "--model", "zoo:digits-cnn", "--weights", str(bad),
                           "--cache", str(tmp_path / "c"))
    assert code == 2
    assert "refused to load" in err and "state_dict" in err and ".safetensors" in err


def test_interrupt_exits_130_and_says_how_to_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    import compress.stages.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    code, _, err = run_cli(capsys, "run", "--model", "zoo:digits-cnn")
    assert code == 130 and "run the same command again to resume" in err


def test_targets_and_passes_listing(capsys) -> None:
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    assert "onnxruntime  installed" in out and "torch        installed" in out
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0 and "export.onnx  (pytorch -> onnx)" in out and "opset: int, default 20" in out


def test_targets_shows_the_isa_and_its_int8_scheme_per_isa(forced_isa: str, capsys,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    isa_line = next(line for line in out.splitlines() if line.startswith("ISA:"))
    assert ("avx512_vnni" in isa_line.split("(")[0]) == (forced_isa == "vnni")
    assert "forced by COMPRESS_ISA" in isa_line
    assert ("7-bit weights" in out) == (forced_isa == "novnni")
    monkeypatch.delenv("COMPRESS_ISA")
    monkeypatch.delenv("COMPRESS_ARCH")
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0 and "forced" not in out.split("onnxruntime")[0]
    monkeypatch.setenv("COMPRESS_ISA", "avx2,sse9")
    code, _, err = run_cli(capsys, "targets")
    assert code == 2 and "unknown ISA flag(s) sse9" in err and len(err.strip().splitlines()) == 1


def test_python_m_compress_works() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "compress", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "exit codes" in r.stdout


def test_compare_lists_available_and_unavailable_targets(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "compare", "digits-cnn", "--targets", "torch,onnxruntime,test.missing",
                             "--rounds", "3", "--min-time", "0",
                             "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q")
    assert code == 0, err
    assert "test.missing: unavailable: test.missing is not installed" in out
    assert "items/s (b1)" in out and "build s" in out
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {r["target"] for r in rep["results"] if r["status"] == "ok"} == {"torch", "onnxruntime"}
    assert (tmp_path / "o" / "pareto.png").exists()


def test_compare_from_an_onnx_file(tmp_path: Path, capsys) -> None:
    r = recipe(tmp_path, 'model = { source = "zoo:digits-cnn" }\n' + FAST)
    code, _, err = run_cli(capsys, "run", str(r), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o1"), "-q")
    assert code == 0, err
    onnx_path = json.loads((tmp_path / "o1" / "report.json").read_text())["variants"]["baseline"]["onnx_digest"]
    assert onnx_path
    from compress.core.artifact import Artifact

    # The exported model itself (the cache also holds the target's compiled, runtime-specific build).
    src = next(p for p in (tmp_path / "c" / "objects").rglob("model.onnx")
               if Artifact.load(p.parent).digest == onnx_path)
    code, out, err = run_cli(capsys, "compare", str(src), "--targets", "torch,onnxruntime", "--rounds", "3",
                             "--min-time", "0",
                             "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o2"), "-q")
    assert code == 0, err
    assert "torch: unavailable: no PyTorch model (the run started from an ONNX file)" in out


def test_only_unavailable_targets_are_refused_before_any_pass_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    from compress.core.manager import PassManager

    ran: list[object] = []
    real = PassManager.run
    monkeypatch.setattr(PassManager, "run", lambda self, *a, **k: (ran.append(self), real(self, *a, **k))[1])
    r = recipe(tmp_path, 'model = { source = "zoo:digits-cnn" }\n' + FAST)
    code, _, err = run_cli(capsys, "run", str(r), "--pipeline", "test.scale -> test.missing", "--cache",
                           str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q")
    assert code == 2, err
    assert ran == []  # the plan refused it: no chain ran, not even the baseline's
    said = [line for line in err.splitlines() if line.strip()]
    assert len(said) == 1 and "no target of the recipe can run on this machine" in said[0]
    assert "test.missing is not installed" in said[0]


def test_quantized_run_reports_parity_with_simulation_and_model_changes(tmp_path: Path, capsys) -> None:
    r = recipe(tmp_path, 'name = "q"\nmodel = { source = "zoo:digits-cnn", train_epochs = 2 }\n'
                         'data = { source = "builtin:digits" }\n' + FAST +
               '[[passes]]\nkind = "prune.channels"\nratio = 0.5\n'
               '[[passes]]\nkind = "export.onnx"\n[[passes]]\nkind = "quantize.int8"\n'
               '[[targets]]\nkind = "onnxruntime"\n[[targets]]\nkind = "torch"\n')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    cell = next(c for c in rep["results"] if c["variant"] == "q" and c["target"] == "onnxruntime")
    # torch measures the pruned model (before quantization), which differs from the baseline's
    assert next(c for c in rep["results"] if c["variant"] == "q" and c["target"] == "torch")["status"] == "ok"
    par = cell["quant_parity"]
    # Deployed INT8 on ONNX Runtime vs the same QDQ graph with reference kernels: they must agree.
    assert par["agreement"] >= 0.98 and par["cosine"] > 0.99 and par["flagged"] is False
    assert par["samples"] > 0 and "top1_deployed" in par
    base = next(c for c in rep["results"] if c["variant"] == "baseline")
    assert base["quant_parity"] is None  # the FP32 baseline has no simulation to compare with
    model = rep["variants"]["q"]["model"]
    assert model["macs"] < model["macs_before"] and model["params"] > 0
    md = (out / "report.md").read_text()
    assert "## Quantized: deployed vs simulated" not in md and "## Model changes vs latency" in md
    # One parity table: the INT8 cell's row carries its top-1 simulated -> deployed.
    assert md.count("## Parity (each target vs its input model)") == 1 and "% -> " in md


def test_device_timings_are_reported_beside_host_latency(tmp_path: Path, capsys) -> None:
    # A runner that times on the device (TensorRT: CUDA events) gets its own summary per batch.
    r = recipe(tmp_path, 'model = { source = "zoo:digits-cnn" }\n' + FAST + '[[targets]]\nkind = "test.devclock"\n')
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    cell = json.loads((out / "report.json").read_text())["results"][0]
    for b in ("1", "4"):
        dev = cell["latency"][b]["device"]
        assert dev["p50_ms"] == pytest.approx(0.25) and dev["runs"] >= cell["latency"][b]["runs"]


def test_torch_cell_of_an_onnx_only_variant_is_skipped_not_measured_twice(tmp_path: Path, capsys) -> None:
    r = recipe(tmp_path, 'name = "i8"\nmodel = { source = "zoo:digits-cnn" }\ndata = { source = "builtin:digits" }\n'
               + FAST + '[[passes]]\nkind = "quantize.int8"\n[[targets]]\nkind = "torch"\n'
               '[[targets]]\nkind = "onnxruntime"\n')
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q")
    assert code == 0, err
    cells = {(c["variant"], c["target"]): c for c in json.loads((out / "report.json").read_text())["results"]}
    same = cells[("i8", "torch")]
    # Its PyTorch model is the baseline's: a "speed-up" there could only be noise.
    assert same["status"] == "skipped" and "same PyTorch model" in same["reason"] and not same["latency"]
    assert cells[("i8", "onnxruntime")]["status"] == "ok" and cells[("baseline", "torch")]["status"] == "ok"


def test_output_piped_into_a_closed_reader_stops_quietly(capsys, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    class Closed:
        def write(self, _: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return (tmp_path / "sink").open("w").fileno()

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["passes"]) == 141  # like a Unix tool killed by SIGPIPE, with no "unexpected" error
    assert "error" not in capsys.readouterr().err
