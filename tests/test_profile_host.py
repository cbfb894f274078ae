"""A hardware profile changes what is built and for which device, never what is recorded about the machine
that built and measured it: the report, its fingerprint and a bundle's manifest name the real host, and the
profile apart."""

from __future__ import annotations

import json
import platform
import threading
from pathlib import Path

import pytest

from compress.cli import main
from compress.core.fingerprint import cpu_info, detected_cpu, forced_by_profile, machine_fingerprint
from compress.stages.profiles import get_profile


def test_fingerprint_names_the_host_and_the_profile_apart(monkeypatch) -> None:
    monkeypatch.delenv("COMPRESS_ISA", raising=False)
    monkeypatch.delenv("COMPRESS_ARCH", raising=False)
    prof = get_profile("rpi5")
    with forced_by_profile(prof.override()):
        assert cpu_info()["arch"] == "aarch64"  # what the passes act on: the device
        fp = machine_fingerprint()
    assert fp["cpu"]["arch"] == platform.machine() and fp["cpu"]["isa"] == detected_cpu()["isa"]
    assert not fp["cpu"]["isa_forced"] or fp["cpu"]["isa_forced_by"] != "profile rpi5"
    assert fp["profile"]["name"] == "rpi5" and fp["profile"]["arch"] == "aarch64"
    assert "asimddp" in fp["profile"]["isa"]


def test_a_profile_is_seen_only_by_the_run_that_set_it(monkeypatch) -> None:
    """Two runs in one process (a search's threads, a test runner): one's profile never leaks into the other's
    CPU, and a run that fails inside its profile leaves the caller's CPU as it was."""
    monkeypatch.delenv("COMPRESS_ISA", raising=False)
    monkeypatch.delenv("COMPRESS_ARCH", raising=False)
    inside, outside = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def other_run() -> None:
        inside.wait(10)
        seen["arch"] = cpu_info()["arch"]
        outside.set()

    t = threading.Thread(target=other_run)
    t.start()
    with pytest.raises(RuntimeError), forced_by_profile(get_profile("rpi5").override()):
        inside.set()
        outside.wait(10)
        assert cpu_info()["arch"] == "aarch64"
        raise RuntimeError("the run failed inside its profile")
    t.join(10)
    assert seen["arch"] == platform.machine()
    assert cpu_info()["arch"] == platform.machine() and "profile" not in machine_fingerprint()


def test_a_run_with_a_profile_reports_the_real_host(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("COMPRESS_ISA", raising=False)
    monkeypatch.delenv("COMPRESS_ARCH", raising=False)
    r = tmp_path / "r.toml"
    r.write_text('name = "edge"\nmodel = { source = "zoo:digits-cnn" }\n'
                 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                 '[[targets]]\nkind = "onnxruntime"\n')
    out = tmp_path / "o"
    assert main(["run", str(r), "--profile", "rpi5", "--out", str(out), "--cache", str(tmp_path / "c"), "-q"]) == 0
    capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    cpu = rep["machine"]["cpu"]
    assert cpu["arch"] == platform.machine() and cpu["isa"] == detected_cpu()["isa"] and not cpu["isa_forced"]
    assert rep["machine"]["profile"]["name"] == "rpi5" and rep["machine"]["profile"]["arch"] == "aarch64"
    md = (out / "report.md").read_text()
    assert "COMPRESS_ISA" not in md and "Built for hardware profile `rpi5`" in md
    if platform.machine() != "aarch64":
        assert "neon" not in md.split("Built for")[0]  # the host line carries the host's own flags
