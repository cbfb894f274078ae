"""The tvm target timed on a device through TVM RPC: a server on 127.0.0.1 stands in for the device."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

from compress.targets._tvm_rpc import RpcAddress, parse_rpc
from compress.targets.tvm_compiler import TvmConfig, TvmTarget
from pydantic import ValidationError

from compress.errors import TargetUnavailable
from compress.pipeline import run
from compress.recipe import recipe_from_dict

FAST = {"batch_sizes": [1], "warmup": 1, "min_runs": 3, "min_time_s": 0.0}


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """A TVM RPC server in its own process on the loopback address (what runs on the device)."""
    from tvm import rpc

    srv = rpc.Server(host="127.0.0.1", port=9190, port_end=9390)
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
    srv = rpc.Server(host="127.0.0.1", port=9510, port_end=9700, key="loopback-dev",
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
    assert "device" not in cells[("baseline", "onnxruntime")]["latency"]["1"]  # timed here, not on the device
    # The outputs came back from the device: the same predictions as the reference.
    assert tvm["fidelity"]["agreement"] == 1.0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["results"] == json.loads(json.dumps(rep["results"], default=str))


def test_a_device_that_does_not_answer_fails_before_any_work(tmp_path: Path) -> None:
    port = _free_port()
    with pytest.raises(TargetUnavailable, match=f"TVM RPC server 127.0.0.1:{port} does not answer"):
        run(_recipe(f"127.0.0.1:{port}"), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "objects").exists() or not any((tmp_path / "cache" / "objects").iterdir())


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")
def test_a_device_whose_runtime_cannot_load_the_build_is_refused_before_any_work(server: int) -> None:
    # This x86 "device" cannot load an aarch64 library: the same refusal as a device with another TVM runtime.
    cfg = TvmConfig(tuning_trials=0, rpc=f"127.0.0.1:{server}",
                    target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    with pytest.raises(TargetUnavailable, match="cannot run a library built by TVM"):
        TvmTarget(cfg).check_config()


def test_tuning_a_foreign_target_through_rpc_is_refused_in_one_line(server: int) -> None:
    from compress.errors import RecipeError

    cfg = TvmConfig(tuning_trials=8, rpc=f"127.0.0.1:{server}",
                    target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    with pytest.raises(RecipeError, match="tuning through rpc is not supported yet"):
        TvmTarget(cfg).check_config()
