"""The tvm target timed on a device through TVM RPC: a server on 127.0.0.1 stands in for the device."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

from compress.targets._tvm_rpc import RpcAddress, parse_rpc
from compress.targets.tvm_compiler import TvmConfig, TvmTarget
from pydantic import ValidationError

from compress.errors import TargetUnavailable
from compress.stages.pipeline import run
from compress.stages.recipe import recipe_from_dict

FAST = {"batch_sizes": [1], "warmup": 1, "min_runs": 3, "min_time_s": 0.0}
DEVICE_SERVER = Path(__file__).resolve().parent.parent / "compress" / "templates" / "tvm_rpc_server.py"


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """The device-side server this project ships (TVM's, plus its version report), run as a program on the
    loopback address, as on a device."""
    proc = subprocess.Popen([sys.executable, str(DEVICE_SERVER), "--host", "127.0.0.1", "--port", "9190",
                             "--port-end", "9390", "--silent"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server listens
        m = re.search(r"TVM RPC server on 127\.0\.0\.1:(\d+)$", line.strip())
        assert m is not None, f"the device server did not start: {line!r}"
        yield int(m[1])
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def stock_server() -> Iterator[int]:
    """A stock TVM RPC server (``tvm.rpc.Server``): it reports no TVM version."""
    from tvm import rpc

    srv = rpc.Server(host="127.0.0.1", port=9710, port_end=9790)
    try:
        yield int(srv.port)
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def tracker_key(server: int) -> Iterator[str]:
    """A tracker with a second server registered under a device key.

    No skip without tornado: the tvm extra installs it for the tracker, so its absence is a broken install."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9400, port_end=9500, silent=True)
    srv = rpc.Server(host="127.0.0.1", port=9510, port_end=9700, key="loopback-dev",  # a stock server
                     tracker_addr=("127.0.0.1", tracker.port))
    try:
        yield f"tracker:127.0.0.1:{tracker.port}/loopback-dev"
    finally:
        srv.terminate()
        tracker.terminate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recipe(rpc_addr: str, **tvm: object) -> object:
    return recipe_from_dict({"name": "dev", "model": {"source": "zoo:digits-cnn"}, "measure": FAST,
                             "targets": [{"kind": "onnxruntime"},
                                         {"kind": "tvm", "tuning_trials": 0, "rpc": rpc_addr, **tvm}]})


def test_rpc_address_forms() -> None:
    assert parse_rpc("127.0.0.1:9090") == RpcAddress("127.0.0.1", 9090)
    assert parse_rpc("tracker:10.0.0.5:9190/rpi5") == RpcAddress("10.0.0.5", 9190, "rpi5")
    for bad in ("127.0.0.1", "host:99999", "tracker:h:1", "http://h:1"):
        with pytest.raises(ValidationError, match="expected 'HOST:PORT'"):
            TvmConfig(rpc=bad)
    # Where the build is timed does not change the build: no recompilation for another device address.
    assert TvmConfig(rpc="a:1").canonical() == TvmConfig().canonical()


@pytest.mark.parametrize("via", ["server", "tracker"])
def test_latency_comes_from_the_device_and_the_report_names_it(via: str, server: int, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    addr = f"127.0.0.1:{server}" if via == "server" else request.getfixturevalue("tracker_key")
    rep = run(_recipe(addr), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False).to_json()
    cells = {(c["variant"], c["target"]): c for c in rep["results"]}
    tvm = cells[("baseline", "tvm")]
    assert tvm["status"] == "ok", tvm["reason"]
    device = tvm["latency"]["1"]["device"]
    assert device["measured_on"] == parse_rpc(addr).describe() and device["runs"] >= 3 and device["p50_ms"] > 0
    assert any("timed on the device through the TVM RPC" in n for n in tvm["notes"])
    assert tvm["device"] == parse_rpc(addr).describe() and cells[("baseline", "onnxruntime")]["device"] is None
    # The device's clock, one figure per timed round (what ratios and budgets pair).
    assert len(device["samples_ms"]) == tvm["latency"]["1"]["runs"]
    # Its runtime version: checked where the server reports it (the shipped server), said so where not (stock).
    versions = [n for n in tvm["notes"] if "TVM" in n and ("runs TVM" in n or "reports no TVM version" in n)]
    assert versions and ("runs TVM" in versions[0]) == (via == "server"), tvm["notes"]
    assert "device" not in cells[("baseline", "onnxruntime")]["latency"]["1"]  # timed here, not on the device
    # The outputs came back from the device: the same predictions as the reference.
    assert tvm["fidelity"]["agreement"] == 1.0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["results"] == json.loads(json.dumps(rep["results"], default=str))


def test_a_device_that_does_not_answer_fails_before_any_work(tmp_path: Path) -> None:
    port = _free_port()
    with pytest.raises(TargetUnavailable, match=f"TVM RPC server 127.0.0.1:{port} does not answer") as e:
        run(_recipe(f"127.0.0.1:{port}"), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "objects").exists() or not any((tmp_path / "cache" / "objects").iterdir())


def test_a_device_that_does_not_answer_is_one_line_from_the_cli(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from compress.cli import main

    port = _free_port()
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "dev"\nmodel = { source = "zoo:digits-cnn" }\n'
                      'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                      f'[[targets]]\nkind = "tvm"\ntuning_trials = 0\nrpc = "127.0.0.1:{port}"\n')
    code = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1 and f"127.0.0.1:{port} does not answer" in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_device_reports_its_runtime_version_and_another_version_is_refused_before_any_work(
        server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tvm
    import tvm_ffi
    from compress.targets import _tvm_rpc

    addr = parse_rpc(f"127.0.0.1:{server}")
    # The real query: the device's own answer, through RPC.
    assert _tvm_rpc.device_versions(_tvm_rpc.connect(addr)) == {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}
    # A build machine on another TVM than the device (simulated here by changing what this side reports):
    monkeypatch.setattr(_tvm_rpc, "build_versions", lambda: {"tvm": "0.26.0", "tvm_ffi": "0.1.9"})
    with pytest.raises(TargetUnavailable) as e:
        run(_recipe(f"127.0.0.1:{server}"), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"runs TVM {tvm.__version__}" in msg and "this build uses TVM 0.26.0" in msg
    assert "apache-tvm==0.26.0" in msg
    assert not (tmp_path / "cache" / "objects").exists() or not any((tmp_path / "cache" / "objects").iterdir())


def test_a_stock_server_reports_no_version_and_is_checked_by_the_probe_only(stock_server: int) -> None:
    from compress.targets import _tvm_rpc

    addr = parse_rpc(f"127.0.0.1:{stock_server}")
    assert _tvm_rpc.device_versions(_tvm_rpc.connect(addr)) is None
    assert "reports no TVM version" in _tvm_rpc.check_versions(addr, _tvm_rpc.connect(addr))
    TvmTarget(TvmConfig(tuning_trials=0, rpc=f"127.0.0.1:{stock_server}")).check_config()  # the probe passes


def test_the_device_server_and_the_build_side_agree_on_the_version_function() -> None:
    from compress.targets._tvm_rpc import VERSION_FUNCTION

    assert f'VERSION_FUNCTION = "{VERSION_FUNCTION}"' in DEVICE_SERVER.read_text()


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")
def test_a_device_whose_runtime_cannot_load_the_build_is_refused_before_any_work(server: int) -> None:
    # This x86 "device" cannot load an aarch64 library: the same refusal as a device with another TVM runtime.
    cfg = TvmConfig(tuning_trials=0, rpc=f"127.0.0.1:{server}",
                    target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    with pytest.raises(TargetUnavailable, match="cannot run a library built by TVM"):
        TvmTarget(cfg).check_config()


def _start_device_server(log: Path, port: int) -> tuple[subprocess.Popen[str], int]:
    """The shipped device server on the loopback address, logging what it serves (uploads, loads) to ``log``."""
    proc = subprocess.Popen([sys.executable, str(DEVICE_SERVER), "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 100)], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r":(\d+)$", line.strip())
    if m is None:
        proc.terminate()
        pytest.fail(f"the device server did not start: {line!r}")
    return proc, int(m[1])


@pytest.mark.slow
def test_tuning_through_rpc_times_every_candidate_on_the_device(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xgboost")
    from compress.targets._tvm_worker import HANG_ENV

    # The 3rd candidate freezes its worker (SIGSTOP) while the worker holds the device's session: it is killed at
    # the candidate timeout, and the next worker opens a session of its own.
    monkeypatch.setenv(HANG_ENV, "3")
    log = tmp_path / "device-server.log"
    proc, port = _start_device_server(log, 9800)
    try:
        rec = _recipe(f"127.0.0.1:{port}", tuning_trials=8, candidate_timeout_s=20)
        rep = run(rec, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False).to_json()
    finally:
        proc.terminate()
        proc.wait(30)
    cells = {(c["variant"], c["target"]): c for c in rep["results"]}
    tvm = cells[("baseline", "tvm")]
    assert tvm["status"] == "ok", tvm["reason"]
    from compress.core.artifact import Artifact

    meta = Artifact.load(Path(tvm["compiled_path"])).metadata["tvm"]["tuning"]
    assert meta["status"] == "tuned" and meta["candidates_timed_on"] == f"TVM RPC server 127.0.0.1:{port}"
    timed = meta["candidates_measured"] - meta["build_errors"] - meta["run_errors"] - meta["candidate_timeouts"] \
        - meta["worker_crashes"]
    assert meta["candidate_timeouts"] == 1 and meta["worker_kills"] == 1
    assert timed >= 2 and meta["candidates_timed_remotely"] == timed
    # The device's own log: one upload loaded per candidate timed there (and the measurement's model after).
    loads = re.findall(r"load_module \S*compress-candidate-\S+\.so", log.read_text())
    assert len(loads) == timed, log.read_text()[-2000:]
    assert tvm["latency"]["1"]["device"]["runs"] >= 3  # the measurement's session opened after the tuning's closed


def test_tuning_a_foreign_target_without_a_device_is_refused_in_one_line(tmp_path: Path) -> None:
    rec = recipe_from_dict({"name": "dev", "model": {"source": "zoo:digits-cnn"}, "measure": FAST,
                            "targets": [{"kind": "onnxruntime"}, {"kind": "tvm", "tuning_trials": 8, "target": {
                                "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}}]})
    rep = run(rec, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    cell = next(c for c in rep.results if c.target == "tvm")
    assert cell.status == "failed" and "set rpc to the device's TVM RPC server" in (cell.reason or "")
    assert "\n" not in (cell.reason or "")


@pytest.fixture(scope="module")
def device_report(server: int, tmp_path_factory: pytest.TempPathFactory) -> object:
    """Baseline and a pruned variant on ONNX Runtime (this machine) and on the RPC device."""
    rec = recipe_from_dict({"name": "dev", "model": {"source": "zoo:digits-cnn"},
                            "measure": {**FAST, "min_runs": 6},
                            "passes": [{"kind": "prune.magnitude", "sparsity": 0.5}],
                            "targets": [{"kind": "onnxruntime"},
                                        {"kind": "tvm", "tuning_trials": 0, "rpc": f"127.0.0.1:{server}"}]})
    tmp = tmp_path_factory.mktemp("device-report")
    return run(rec, out_dir=tmp / "out", cache_dir=tmp / "cache", progress=False)


def test_ratios_on_the_device_pair_the_devices_own_clock(device_report: object, server: int) -> None:
    from compress.measuring.stats import ratio_ci
    from compress.reporting.report_schema import Report

    assert isinstance(device_report, Report)
    cells = {(c.variant, c.target): c for c in device_report.results}
    base, pruned = cells[("baseline", "tvm")], cells[("dev", "tvm")]
    assert pruned.status == "ok" and pruned.device == base.device == f"TVM RPC server 127.0.0.1:{server}"
    r = pruned.ratio_to_baseline["1"]
    assert r.verdict != "not comparable" and r.text.endswith("(device clock)")
    # The ratio is the device's clock against the baseline's on the same device, not the host's wall times.
    dev, bdev = pruned.latency["1"].device, base.latency["1"].device
    assert dev is not None and bdev is not None and dev.samples_ms and bdev.samples_ms
    expect = ratio_ci(dev.samples_ms, bdev.samples_ms, "p50")
    assert r.ratio == pytest.approx(expect.ratio)  # type: ignore[union-attr]
    host = ratio_ci(pruned.latency["1"].samples_ms, base.latency["1"].samples_ms, "p50")
    assert host.ratio != pytest.approx(expect.ratio)
    assert any("never compared with figures from another device" in n for n in pruned.notes)
    # ONNX Runtime on this machine keeps its host ratios.
    assert cells[("dev", "onnxruntime")].device is None
    # The results table shows the device's own figures for a device cell, and says so.
    from compress.reporting.report_tables import table_rows

    _, rows = table_rows(device_report)
    row = next(r for r in rows if r[0] == "dev" and r[1].startswith("tvm"))
    assert row[1] == "tvm (device)" and row[4] == f"{dev.p50_ms:.3f}"
    ort_row = next(r for r in rows if r[0] == "dev" and r[1] == "onnxruntime")
    assert ort_row[4] == f"{cells[('dev', 'onnxruntime')].latency['1'].p50_ms:.3f}"


def test_budgets_never_divide_a_device_figure_by_a_host_figure(device_report: object) -> None:
    from compress.apps.budget import BudgetsFile, BudgetSpec, evaluate_budget
    from compress.reporting.report_schema import Report

    assert isinstance(device_report, Report)
    bf = BudgetsFile(models={"m": "r.toml"}, budget=[], confidence=0.95, resamples=500)

    def verdict(target: str, limit: str) -> object:
        return evaluate_budget(BudgetSpec(model="m", target=target, metric="p50", max=limit), device_report, bf,
                               None, "fp")

    for target, limit in (("tvm", "100x onnxruntime"), ("onnxruntime", "100x tvm")):
        v = verdict(target, limit)
        assert v.status == "fail" and "not a same-run comparison" in v.detail, v  # type: ignore[attr-defined]
        assert "\n" not in v.line()  # type: ignore[attr-defined]
    # Same device: decided, on the device's clock.
    same = verdict("tvm", "100x original")
    assert same.status == "pass" and "own clock" in same.detail  # type: ignore[attr-defined]
    absolute = verdict("tvm", "10000 ms")
    assert absolute.status == "pass" and "own clock" in absolute.detail  # type: ignore[attr-defined]
    dev = device_report.cell("dev", "tvm").latency["1"].device  # type: ignore[union-attr]
    assert dev is not None and dev.samples_ms
    assert absolute.value == pytest.approx(float(np.median(dev.samples_ms)), rel=1e-3)  # type: ignore[attr-defined]


def test_a_recorded_baseline_from_another_device_is_not_compared(device_report: object, server: int,
                                                                 tmp_path: Path) -> None:
    from compress.apps.budget import BaselineStore, BudgetsFile, BudgetSpec, evaluate_budget
    from compress.reporting.report_schema import Report

    assert isinstance(device_report, Report)
    bf = BudgetsFile(models={"m": "r.toml"}, budget=[], confidence=0.95, resamples=500)
    spec = BudgetSpec(model="m", target="tvm", metric="p50", max="2x recorded")
    dev = device_report.cell("dev", "tvm").latency["1"].device  # type: ignore[union-attr]
    assert dev is not None and dev.samples_ms
    store = BaselineStore(tmp_path / "b.json")
    key = BaselineStore.key("m", "dev", "tvm", "1", "fp")
    # Numbers recorded for this target on the host (no device): refused, one line.
    store.put(key, {"digest": "d", "samples_ms": list(dev.samples_ms)})
    v = evaluate_budget(spec, device_report, bf, store, "fp")
    assert v.status == "fail" and "two devices are not comparable" in v.detail and "\n" not in v.line()
    # Numbers recorded on this device: compared (on its clock).
    store.put(key, {"digest": "d", "samples_ms": list(dev.samples_ms), "device": f"TVM RPC server 127.0.0.1:{server}"})
    v = evaluate_budget(spec, device_report, bf, store, "fp")
    assert v.status == "pass" and v.value == pytest.approx(1.0, rel=0.01), v


def test_release_frees_the_device_for_another_process_and_runners_reconnect(server: int, tmp_path: Path) -> None:
    """A plain RPC server serves one session at a time: while variant 1's runner waits to be timed, the tuning
    worker of variant 2 (another process) must get the device, and the runner must work again after."""
    from compress.targets import _tvm_rpc

    from compress.core.artifact import Artifact

    addr = parse_rpc(f"127.0.0.1:{server}")
    rec = recipe_from_dict({"name": "dev", "model": {"source": "zoo:digits-cnn"}, "measure": FAST,
                            "targets": [{"kind": "tvm", "tuning_trials": 0}]})
    rep = run(rec, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    compiled = Artifact.load(Path(rep.results[0].compiled_path))  # type: ignore[arg-type]
    runner = TvmTarget(TvmConfig(tuning_trials=0, rpc=f"127.0.0.1:{server}")).runner(compiled)
    x = {"input": np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    before = runner.infer(x)[0]
    _tvm_rpc.release(addr)
    other = subprocess.run([sys.executable, "-c", "import sys; from tvm import rpc; "
                            "print(rpc.connect('127.0.0.1', int(sys.argv[1])).cpu(0).exist)", str(server)],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 0 and other.stdout.strip() == "True", other.stderr[-500:]
    np.testing.assert_array_equal(runner.infer(x)[0], before)  # reconnected by itself
    runner.close()
