"""Hardware profiles: the built-in ones against TVM's tags, user profile files, bad input, and a run with one."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest

from compress.cli import main
from compress.core.fingerprint import cpu_info
from compress.errors import RecipeError
from compress.stages.profiles import (
    PATH_ENV,
    Profile,
    all_profiles,
    apply_profile,
    builtin_profiles,
    get_profile,
    host_profile,
    load_profile_file,
    profile_scope,
)
from compress.stages.recipe import load_recipe, recipe_from_dict

BUILTIN = ("x86-avx2", "x86-avx512-vnni", "rpi4", "rpi5", "jetson-orin-nano", "graviton3")

MYBOARD = """
name = "myboard"
version = 2
description = "a Cortex-A55 board"
arch = "aarch64"
isa = ["neon", "asimd", "asimddp"]
cores = 4
threads = 2
int8_scheme = "u8s8"
fast_precisions = ["fp32", "int8"]
backends = ["onnxruntime", "tvm"]
[tvm_target]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mcpu = "cortex-a55"
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def test_every_builtin_profile_is_there_and_its_int8_scheme_fits_its_isa() -> None:
    from compress.core.int8_scheme import scheme_for_isa

    profiles = builtin_profiles()
    assert set(BUILTIN) <= set(profiles)
    for p in profiles.values():
        assert p.version >= 1 and p.backends and p.fast_precisions
        # The scheme a profile prefers is the one the ISA rule would pick for its CPU: no profile contradicts it.
        assert p.int8_scheme == scheme_for_isa(p.isa, p.arch)[0], p.name
    assert profiles["x86-avx2"].int8_scheme == "u8s8_reduce_range"
    assert profiles["x86-avx512-vnni"].int8_scheme == "u8s8"


def test_profile_targets_are_tvm_tags_where_tvm_has_one_and_tvm_accepts_every_one() -> None:
    pytest.importorskip("tvm")
    import tvm
    from compress.targets.tvm_compiler import TvmProfileSettings, is_foreign, make_target

    tags = set(tvm.target.list_tags())
    for p in builtin_profiles().values():
        tvm_settings = TvmProfileSettings.of(p)
        for tag in filter(None, [tvm_settings.tag, tvm_settings.gpu_tag]):
            assert tag in tags, f"{p.name}: {tag} is not a TVM {tvm.__version__} target tag"
        spec = tvm_settings.target_json(p.cores)
        assert spec is not None
        target = make_target(spec)
        assert target.kind.name == "llvm"
        assert is_foreign(target) == (p.arch != platform.machine()), p.name
    # rpi4's target is TVM's own tag: its CPU attributes come from TVM, not from this file.
    rpi4 = builtin_profiles()["rpi4"]
    rpi4_json = json.loads(str(make_target(TvmProfileSettings.of(rpi4).target_json(rpi4.cores) or {})))
    assert rpi4_json["mcpu"] == "cortex-a72" and rpi4_json["mtriple"] == "aarch64-linux-gnu"
    assert rpi4_json["num-cores"] == 4 and rpi4.targets["tvm"]["tag"] == "raspberry-pi/4b-aarch64"


def test_host_profile_is_the_detected_cpu_and_forces_nothing() -> None:
    from compress.core.fingerprint import detected_cpu

    host = host_profile()
    assert host.name == "host" and host.source == "detected"
    assert host.isa == sorted(detected_cpu()["isa"])
    assert host.targets == {}  # the tvm target's own host detection (LLVM's CPU name)
    assert host.override() is None
    assert get_profile("host").isa == host.isa


@pytest.mark.parametrize("name, scheme, arch", [
    ("x86-avx2", "u8s8_reduce_range", "x86_64"),
    ("x86-avx512-vnni", "u8s8", "x86_64"),
    ("rpi5", "u8s8", "aarch64"),
])
def test_a_profile_forces_the_isa_and_int8_scheme_while_it_is_active(name: str, scheme: str, arch: str) -> None:
    from compress.core.int8_scheme import choose_scheme

    before = cpu_info()
    rec = recipe_from_dict({"model": {"source": "zoo:digits-cnn"}, "profile": name})
    with profile_scope(rec) as (_, prof):
        assert prof is not None and prof.name == name
        info = cpu_info()
        assert info["isa"] == builtin_profiles()[name].isa and info["arch"] == arch
        assert info["isa_forced"] and info["isa_forced_by"] == f"profile {name}"
        got, why = choose_scheme("auto")
        assert got == scheme and f"hardware profile {name}" in why
        assert choose_scheme("s8s8")[0] == "s8s8"  # an explicit scheme still wins
    assert cpu_info() == before  # nothing leaks out of the run


def test_profile_fills_open_settings_and_keeps_explicit_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tvm")
    rec = recipe_from_dict({"model": {"source": "zoo:digits-cnn"}, "profile": "rpi5",
                            "targets": [{"kind": "onnxruntime"}, {"kind": "tvm", "tuning_trials": 0}]})
    out = apply_profile(rec, get_profile("rpi5"))
    tvm = next(t for t in out.targets if t.kind == "tvm")
    assert tvm.target["mcpu"] == "cortex-a76" and tvm.target["num-cores"] == 4  # type: ignore[attr-defined]
    assert out.measure.threads == 0  # an aarch64 profile does not set the threads of timing on this x86 machine
    mine = {"kind": "llvm", "mcpu": "znver3"}
    rec2 = recipe_from_dict({"model": {"source": "zoo:digits-cnn"}, "measure": {"threads": 1},
                             "targets": [{"kind": "tvm", "target": mine}]})
    out2 = apply_profile(rec2, get_profile("rpi4"))
    assert out2.targets[0].target == mine and out2.measure.threads == 1  # type: ignore[attr-defined]
    # A profile for this machine's kind of CPU sets the measurement threads (at most the usable cores).
    host = get_profile("host")
    out3 = apply_profile(recipe_from_dict({"model": {"source": "zoo:digits-cnn"}}), host)
    assert 1 <= out3.measure.threads <= (host.threads or 1)


def test_a_target_the_device_lacks_is_refused() -> None:
    rec = recipe_from_dict({"model": {"source": "zoo:digits-cnn"}, "targets": [{"kind": "openvino"}]})
    with pytest.raises(RecipeError, match="target 'openvino' does not run on profile 'rpi5'"):
        apply_profile(rec, get_profile("rpi5"))


def test_user_profile_from_the_path_and_from_a_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "profiles"
    f = _write(folder, "myboard.toml", MYBOARD)
    monkeypatch.setenv(PATH_ENV, str(folder))
    prof = get_profile("myboard")
    assert prof.version == 2 and prof.source == str(f) and prof.isa == ["asimd", "asimddp", "neon"]
    # MYBOARD is written the old way (a top-level [tvm_target] table): it loads, as the tvm target's setting.
    assert prof.targets == {"tvm": {"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}}}
    rec = apply_profile(recipe_from_dict({"model": {"source": "zoo:digits-cnn"}, "targets": [{"kind": "tvm"}]}), prof)
    assert rec.targets[0].target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu",  # type: ignore[attr-defined]
                                     "mcpu": "cortex-a55", "num-cores": 4}
    found, errors = all_profiles()
    assert "myboard" in found and errors == []
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "myboard  v2" in out and "cortex-a55" in out and "rpi5  v1" in out
    # A recipe names a profile file relative to its own folder.
    monkeypatch.delenv(PATH_ENV)
    _write(tmp_path / "r", "board.toml", MYBOARD)
    _write(tmp_path / "r", "recipe.toml", 'model = { source = "zoo:digits-cnn" }\nprofile = "board.toml"\n')
    rec = load_recipe(tmp_path / "r" / "recipe.toml")
    assert rec.profile == str(tmp_path / "r" / "board.toml")
    with profile_scope(rec) as (_, p):
        assert p is not None and p.name == "myboard" and cpu_info()["arch"] == "aarch64"


@pytest.mark.parametrize("text, match", [
    (MYBOARD.replace('version = 2', 'version = 2\ncolour = "red"'), "unknown key 'colour'"),
    (MYBOARD.replace('"asimddp"]', '"dotprod"]'), "unknown ISA flag"),
    (MYBOARD.replace('mtriple = "aarch64-linux-gnu"', 'mtriple = "x86_64-linux-gnu"'), "not an aarch64 triple"),
    (MYBOARD.replace('arch = "aarch64"', 'arch = "mips"'), "key 'arch'"),
    (MYBOARD.replace('threads = 2', 'threads = 8'), "exceeds cores"),
    (MYBOARD.replace('int8_scheme = "u8s8"\n', ''), "missing required key 'int8_scheme'"),
    (MYBOARD.replace('name = "myboard"', 'name = "rpi5"'), "built-in profile"),
    (MYBOARD.replace('name = "myboard"', 'name = "My Board"'), "key 'name'"),
    (MYBOARD.replace('kind = "llvm"\n', ''), "needs a 'kind'"),
    ('name = "x"\narch = "x86_64"\nisa = ["avx2"]\nint8_scheme = "u8s8"\nbackends = ["onnxruntime"]\n',
     "saturates"),
    ("name = [", "not valid TOML"),
])
def test_bad_profile_files_are_one_clear_line(tmp_path: Path, text: str, match: str) -> None:
    f = _write(tmp_path, "bad.toml", text)
    with pytest.raises(RecipeError, match=match) as e:
        load_profile_file(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_unknown_profile_and_bad_profile_value_are_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", "zoo:digits-cnn", "--profile", "rpi9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown profile 'rpi9'" in err and "rpi5" in err
    with pytest.raises(RecipeError, match="'profile' must be"):
        recipe_from_dict({"model": {"source": "zoo:digits-cnn"}, "profile": 5})
    # An invalid file on the profile path: `compress profiles` lists the rest and exits 2 naming the file.
    folder = tmp_path / "p"
    _write(folder, "broken.toml", "name = [")
    monkeypatch.setenv(PATH_ENV, str(folder))
    assert main(["profiles"]) == 2
    cap = capsys.readouterr()
    assert "rpi4" in cap.out and "broken.toml" in cap.err and "not valid TOML" in cap.err


def test_profile_model_rejects_a_tag_inside_the_target_json() -> None:
    with pytest.raises(ValueError, match=r"targets\.tvm: target: give the tag as tag \(tvm_tag\)"):
        Profile(name="x", arch="aarch64", int8_scheme="u8s8", backends=["tvm"],
                targets={"tvm": {"target": {"tag": "raspberry-pi/4b-aarch64"}}})


def test_target_settings_belong_to_the_target_and_old_profile_keys_still_load(tmp_path: Path) -> None:
    """The core's profile knows no TVM field: the tvm target's settings sit under targets.tvm, judged by the
    tvm target; a file in the old form (top-level tvm_tag / tvm_target / tvm_gpu_tag) loads into the same place."""
    assert not [f for f in Profile.model_fields if f.startswith("tvm")]
    new = MYBOARD.replace("[tvm_target]", "[targets.tvm.target]").replace('name = "myboard"', 'name = "newboard"')

    def before_table(line: str) -> str:  # a top-level key goes above MYBOARD's [tvm_target] table
        return MYBOARD.replace("[tvm_target]", line + "\n[tvm_target]")

    a = load_profile_file(_write(tmp_path, "new.toml", new))
    b = load_profile_file(_write(tmp_path, "old.toml", before_table('tvm_gpu_tag = "nvidia/jetson-orin-nano"')))
    assert a.targets["tvm"]["target"] == b.targets["tvm"]["target"]
    assert b.targets["tvm"]["gpu_tag"] == "nvidia/jetson-orin-nano"
    # A setting a target does not take is refused by that target, in one line naming it.
    with pytest.raises(RecipeError, match=r"targets\.tvm: .*colour"):
        load_profile_file(_write(tmp_path, "bad.toml", before_table('tvm_colour = "red"')))
    with pytest.raises(RecipeError, match=r"targets\.onnxruntime: takes no settings from a profile"):
        load_profile_file(_write(tmp_path, "bad2.toml", before_table("[targets.onnxruntime]\nx = 1")))


def test_profiles_check_lets_tvm_judge_the_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    _write(tmp_path, "bad-cpu.toml", MYBOARD.replace("cortex-a55", "cortex-a999").replace("myboard", "badcpu"))
    monkeypatch.setenv(PATH_ENV, str(tmp_path))
    assert main(["profiles", "--check"]) == 1
    out = capsys.readouterr().out
    assert "LLVM does not know mcpu = 'cortex-a999'" in out
    assert out.count("tvm: ok") == len(builtin_profiles())  # every built-in one (the host gives TVM nothing to check)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")
def test_run_with_a_profile_cross_compiles_for_the_device_and_says_so(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    r = _write(tmp_path, "r.toml", 'name = "edge"\nmodel = { source = "zoo:digits-cnn" }\nprofile = "rpi4"\n'
               'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
               '[[targets]]\nkind = "onnxruntime"\n[[targets]]\nkind = "tvm"\ntuning_trials = 0\nemulate = "off"\n')
    out = tmp_path / "out"
    code = main(["run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    prof = rep["machine"]["profile"]
    assert prof["name"] == "rpi4" and prof["version"] == 1 and "not from the profile's device" in prof["note"]
    # The machine that built is recorded as itself; the device the model was built for is the profile's record.
    assert rep["machine"]["cpu"]["arch"] == platform.machine() and prof["arch"] == "aarch64"
    assert rep["machine"]["cpu"].get("isa_forced_by") != "profile rpi4"
    assert 'profile = "rpi4"' in rep["recipe"]["toml"] and "raspberry-pi/4b-aarch64" in rep["recipe"]["toml"]
    cells = {c["target"]: c for c in rep["results"] if c["variant"] == "baseline"}
    assert cells["onnxruntime"]["status"] == "ok"
    # Built for the Pi's Cortex-A72; it cannot run here, and the cell says why instead of timing it.
    assert cells["tvm"]["status"] == "unavailable" and "cannot run on this" in cells["tvm"]["reason"]
    # The bundle for the Pi: an aarch64 library, the profile named in its manifest; its run.py refuses this machine.
    bundle = tmp_path / "bundle"
    assert main(["export", str(out), "--target", "tvm", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and manifest["profile"]["name"] == "rpi4"
    assert manifest["tvm"]["cross_compiled"] is True and manifest["tvm"]["target"]["mcpu"] == "cortex-a72"
    assert (bundle / "model.so").read_bytes()[18:20] == (0xB7).to_bytes(2, "little")  # ELF machine: AArch64
    if platform.machine() != "aarch64":
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, str(bundle / "run.py")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "built for aarch64" in proc.stderr
    # With --profile the same run needs no profile in the recipe; an unknown one fails before any work.
    r.write_text(r.read_text().replace('profile = "rpi4"\n', ''))
    assert main(["run", str(r), "--profile", "nope", "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
