"""The budget gate: limits, noise-aware verdicts, baselines, JUnit, and the CLI's exit codes.

Timings are controlled (synthetic samples or a patched measurement), never the wall clock.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from compress.apps.budget import (
    EXIT_FAIL,
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_SKIPPED,
    BaselineStore,
    BudgetsFile,
    BudgetSpec,
    evaluate_budget,
    junit_xml,
    load_budgets,
    overall_exit,
    parse_limit,
)
from compress.cli import main
from compress.core.capabilities import TargetCaps
from compress.core.config import TargetConfig
from compress.core.registry import register_target
from compress.errors import InputError, RecipeError
from compress.reporting.report_schema import Report
from tests.reports import cell as rcell
from tests.reports import latency, make_report


def samples(center: float, spread: float, n: int = 60, seed: int = 0) -> list[float]:
    return list(np.random.default_rng(seed).normal(center, spread, n).clip(min=1e-3))


def report(cells: dict[tuple[str, str], dict]) -> Report:
    return make_report([
        rcell(variant, target, status=c.get("status", "ok"), reason=c.get("reason"), digest=c.get("digest"),
              size=c.get("size", 1000), acc=c.get("acc"), lat={"1": latency(c["s"])} if "s" in c else None,
              quant_parity=c.get("parity"))
        for (variant, target), c in cells.items()])


BF = BudgetsFile(models={"m": "r.toml"}, budget=[], confidence=0.95, resamples=500)


def budget(**kw) -> BudgetSpec:
    return BudgetSpec(model="m", **{"target": "onnxruntime", "metric": "p50", **kw})


def test_limits_parse_units_and_ratios() -> None:
    assert parse_limit("2 ms", "p50", "b").value == 2.0
    assert parse_limit("500us", "p99", "b").value == pytest.approx(0.5)
    assert parse_limit("1.5 MB", "size", "b").value == 1.5e6
    assert parse_limit("1 point", "accuracy_drop", "b").value == 1.0
    lim = parse_limit("0.5x torch", "p50", "b")
    assert (lim.value, lim.ratio_to) == (0.5, "torch")


@pytest.mark.parametrize(("text", "metric", "msg"), [
    ("2", "p50", "has no unit"),
    ("2 parsecs", "p50", "does not fit p50"),
    ("fast", "p50", "not a number with a unit"),
    ("0.5x torch", "size", "ratio limits"),
])
def test_bad_limits(text: str, metric: str, msg: str) -> None:
    with pytest.raises(RecipeError, match=msg):
        parse_limit(text, metric, "budget[1]")


def test_pass_fail_and_inconclusive_absolute() -> None:
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.02)}})
    assert evaluate_budget(budget(max="1.2 ms"), rep, BF, None, "fp").status == "pass"
    assert evaluate_budget(budget(max="0.8 ms"), rep, BF, None, "fp").status == "fail"
    noisy = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.8, n=8)}})
    v = evaluate_budget(budget(max="1.0 ms"), noisy, BF, None, "fp")
    assert v.status == "inconclusive" and v.low < 1.0 < v.high and "too noisy" in v.detail


def test_ratio_to_another_target_uses_paired_rounds() -> None:
    # A shared slowdown hits both candidates in the same rounds; the paired ratio stays tight.
    drift = np.linspace(1, 3, 40)
    rep = report({("baseline", "onnxruntime"): {"s": list(0.4 * drift)}, ("baseline", "torch"): {"s": list(drift)}})
    v = evaluate_budget(budget(max="0.5x torch"), rep, BF, None, "fp")
    assert v.status == "pass" and v.value == pytest.approx(0.4) and v.high < 0.45
    assert evaluate_budget(budget(max="0.3x torch"), rep, BF, None, "fp").status == "fail"


def test_accuracy_drop_and_size() -> None:
    rep = report({("baseline", "onnxruntime"): {"acc": 0.99, "size": 4000},
                  ("small", "onnxruntime"): {"acc": 0.975, "size": 1000}})
    v = evaluate_budget(budget(metric="accuracy_drop", max="1 point"), rep, BF, None, "fp")
    assert v.variant == "small" and v.status == "fail" and v.value == pytest.approx(1.5)
    assert evaluate_budget(budget(metric="accuracy_drop", max="2 points"), rep, BF, None, "fp").status == "pass"
    assert evaluate_budget(budget(metric="size", max="1 KB"), rep, BF, None, "fp").status == "pass"
    assert evaluate_budget(budget(metric="size", max="0.5 KB"), rep, BF, None, "fp").status == "fail"


def test_unavailable_target_fails_closed_unless_skipping_is_allowed() -> None:
    rep = report({("baseline", "tensorrt"): {"status": "unavailable", "reason": "no CUDA device"}})
    v = evaluate_budget(budget(target="tensorrt", max="1 ms"), rep, BF, None, "fp")
    assert v.status == "skipped" and "no CUDA device" in v.detail
    assert overall_exit([v]) == EXIT_SKIPPED  # a gate that cannot judge does not go green
    assert overall_exit([v], allow_skip=True) == EXIT_PASS
    v.allow_skip = True  # allow_skip = true on this budget
    assert overall_exit([v]) == EXIT_PASS


def test_exit_code_precedence() -> None:
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.02)}})
    ok = evaluate_budget(budget(max="2 ms"), rep, BF, None, "fp")
    bad = evaluate_budget(budget(max="0.5 ms"), rep, BF, None, "fp")
    assert overall_exit([ok], False) == EXIT_PASS
    assert overall_exit([ok, bad], False) == EXIT_FAIL
    ok.status = "inconclusive"
    assert overall_exit([ok], False) == EXIT_INCONCLUSIVE


def test_recorded_baseline_match_and_mismatch(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path / "b.json")
    store.put(BaselineStore.key("m", "baseline", "onnxruntime", 1, "fpA"), {"digest": "d",
                                                                            "samples_ms": samples(1.0, 0.02)})
    store.save()
    store = BaselineStore(tmp_path / "b.json")
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.5, 0.02, seed=1)}})
    v = evaluate_budget(budget(max="1.1x recorded"), rep, BF, store, "fpA")
    assert v.status == "fail" and v.value == pytest.approx(1.5, rel=0.05)
    v = evaluate_budget(budget(max="1.1x recorded"), rep, BF, store, "fpB")
    assert v.status == "skipped" and "no recorded baseline for this machine fingerprint" in v.detail


def test_corrupt_baseline_is_refused_and_left_alone(tmp_path: Path) -> None:
    p = tmp_path / "b.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="corrupt"):
        BaselineStore(p)
    assert p.read_text() == "{not json"


def test_junit_has_one_case_per_budget_with_failures(tmp_path: Path) -> None:
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.02)},
                  ("baseline", "tensorrt"): {"status": "unavailable", "reason": "no GPU"}})
    vs = [evaluate_budget(budget(max="2 ms"), rep, BF, None, "fp"),
          evaluate_budget(budget(max="0.5 ms"), rep, BF, None, "fp"),
          evaluate_budget(budget(target="tensorrt", max="1 ms"), rep, BF, None, "fp")]
    root = ET.fromstring(junit_xml(vs, 1.0))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.find("failure") is not None for c in cases] == [False, True, False]
    assert cases[2].find("skipped") is not None
    fail = cases[1].find("failure")
    assert fail is not None and "limit 0.5 ms" in (fail.get("message") or "")
    # Two budgets on the same figure: CI views key on the name, so each case has its own, and its own time.
    names = [c.get("name") for c in cases]
    assert len(set(names)) == 3 and "[max 2 ms]" in str(names[0]) and "[max 0.5 ms]" in str(names[1])
    assert all(c.get("time") is not None for c in cases)
    vs[0].seconds = 1.25
    assert ET.fromstring(junit_xml(vs, 1.0)).find("testsuite/testcase").get("time") == "1.250"  # type: ignore[union-attr]


def write_budgets(tmp_path: Path, body: str) -> Path:
    (tmp_path / "r.toml").write_text('name = "m"\nmodel = { source = "zoo:digits-cnn" }\n'
                                     'measure = { warmup = 0, min_runs = 10, min_time_s = 0.0 }\n')
    p = tmp_path / "budgets.toml"
    p.write_text('models = { m = "r.toml" }\nresamples = 300\n' + body)
    return p


@pytest.mark.parametrize(("body", "msg"), [
    ('[[budget]]\nmodel = "x"\nmetric = "p50"\nmax = "1 ms"\n', "unknown model 'x'"),
    ('[[budget]]\nmodel = "m"\ntarget = "warp"\nmetric = "p50"\nmax = "1 ms"\n', "unknown target 'warp'"),
    ('[[budget]]\nmodel = "m"\nmetric = "speed"\nmax = "1 ms"\n', "unknown metric 'speed'"),
    ('[[budget]]\nmodel = "m"\nmetric = "p50"\nmax = "1"\n', "has no unit"),
    ('[[budget]]\nmodel = "m"\nmetric = "p50"\nmax = "1 ms"\ncolor = 1\n', "unknown key"),
])
def test_bad_budget_files(tmp_path: Path, body: str, msg: str) -> None:
    with pytest.raises(RecipeError, match=msg):
        load_budgets(write_budgets(tmp_path, body))


def _fake_measure(centers: dict[str, float]):
    from compress.measuring.measure import Timing

    def fake(fns, warmup=0, min_runs=10, *a, **k):
        out = {}
        for i, name in enumerate(fns):
            fns[name]()  # the runner really runs; only the clock is replaced
            c = centers.get(name, centers.get(name.split("/")[1]))  # "variant/target" wins over "target"
            assert c is not None
            out[name] = samples(c, 0.01 * c, n=min_runs, seed=i)
        # The order record a real measurement keeps (report.json's schema requires it).
        return Timing(out, {"method": "fake", "seed": 0, "candidates": list(fns),
                            "rounds": [list(range(len(fns)))] * min_runs}, dict.fromkeys(fns, 0))
    return fake


@pytest.mark.parametrize(("limit", "code"), [("0.5x torch", EXIT_PASS), ("0.1x torch", EXIT_FAIL)])
def test_check_cli_end_to_end_with_controlled_timings(tmp_path: Path, monkeypatch, capsys, limit, code) -> None:
    import compress.measuring.measure_timing as pipeline  # the timing stage times the candidates

    monkeypatch.setattr(pipeline, "measure_interleaved", _fake_measure({"torch": 1.0, "onnxruntime": 0.25}))
    b = write_budgets(tmp_path, f'[[budget]]\nmodel = "m"\nmetric = "p50"\nmax = "{limit}"\n'
                                '[[budget]]\nmodel = "m"\ntarget = "test.missing"\nmetric = "p50"\nmax = "1 ms"\n')
    junit = tmp_path / "j.xml"
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--junit", str(junit),
                "--allow-skip"])
    out = capsys.readouterr().out
    assert got == code
    assert "SKIPPED" in out and "test.missing is not installed" in out
    assert "noise onnxruntime b1: A/A (baseline, second session)" in out  # the noise the check saw
    assert ET.parse(junit).getroot().find("testsuite").get("tests") == "2"  # type: ignore[union-attr]
    verdicts = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"]
    assert verdicts[0]["status"] == ("pass" if code == EXIT_PASS else "fail")
    capsys.readouterr()
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--allow-skip",
                "--json", "-q"])
    printed = json.loads(capsys.readouterr().out)  # --json: the verdicts on stdout, nothing else
    assert printed["exit_code"] == got == code and len(printed["verdicts"]) == 2
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert got == (EXIT_SKIPPED if code == EXIT_PASS else EXIT_FAIL)  # fails closed by default
    if code == EXIT_PASS:
        assert "FAILED CLOSED" in capsys.readouterr().out


def test_update_baseline_then_check_against_it(tmp_path: Path, monkeypatch, capsys) -> None:
    import compress.measuring.measure_timing as pipeline  # the timing stage times the candidates

    monkeypatch.setattr(pipeline, "measure_interleaved", _fake_measure({"torch": 1.0, "onnxruntime": 0.25}))
    b = write_budgets(tmp_path, '[[budget]]\nmodel = "m"\nmetric = "p50"\nmax = "1.1x recorded"\n')
    args = ["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert main(args) == EXIT_SKIPPED  # no baseline yet: the gate cannot judge, so it fails closed
    assert "no recorded baseline" in capsys.readouterr().out
    assert main([*args, "--allow-skip"]) == EXIT_PASS
    capsys.readouterr()
    assert main([*args, "--update-baseline"]) == EXIT_PASS
    said = capsys.readouterr().out
    # What was recorded, for which machine, and where.
    line = next(ln for ln in said.splitlines() if ln.startswith("RECORDED baseline of m"))
    assert "onnxruntime@b1" in line and "machine fingerprint" in line and "budgets.baseline.json" in line
    assert "RECORDED" in said and "run compress check --update-baseline" not in said
    assert (tmp_path / "budgets.baseline.json").exists()
    kept = list((tmp_path / "budgets.baseline.artifacts").iterdir())
    assert kept, "the baseline's compiled artifact is kept beside the baseline file"
    capsys.readouterr()
    assert main(args) == EXIT_PASS  # the unchanged model is the same build: identical, not raced
    assert "identical build to the recorded baseline" in capsys.readouterr().out
    # A changed model (another build): the stored artifact is re-timed in this run, and the
    # candidate, twice as slow, is compared with it round by round.
    (tmp_path / "r.toml").write_text((tmp_path / "r.toml").read_text().replace(
        'source = "zoo:digits-cnn"', 'source = "zoo:digits-cnn", num_classes = 9'))
    monkeypatch.setattr(pipeline, "measure_interleaved",
                        _fake_measure({"torch": 1.0, "onnxruntime": 0.5, "recorded/onnxruntime": 0.25}))
    assert main(args) == EXIT_FAIL
    v = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"][0]
    assert "re-timed in this run, paired" in v["detail"] and v["value"] == pytest.approx(2.0, rel=0.05)
    # Same candidate and a re-timed baseline as fast as it: passes, still paired.
    monkeypatch.setattr(pipeline, "measure_interleaved",
                        _fake_measure({"torch": 1.0, "onnxruntime": 0.5, "recorded/onnxruntime": 0.5}))
    assert main(args) == EXIT_PASS
    # A stored artifact whose bytes changed is not used: the weaker recorded-numbers comparison
    # takes over and says so.
    victim = next(p for p in kept[0].rglob("*.onnx"))
    victim.write_bytes(victim.read_bytes()[:-8] + b"\x00" * 8)
    assert main(args) == EXIT_FAIL  # 0.5 ms now against the recorded 0.25 ms numbers
    v = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"][0]
    assert "WEAKER" in v["detail"] and "changed on disk" in v["detail"] and v["unit"] == "x recorded (numbers only)"
    shutil.rmtree(tmp_path / "budgets.baseline.artifacts")
    assert main(args) == EXIT_FAIL
    v = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"][0]
    assert "WEAKER" in v["detail"] and "is gone" in v["detail"]
    (tmp_path / "budgets.baseline.json").write_text("[]")
    assert main(args) == 2
    assert "corrupt" in capsys.readouterr().err


def test_pytest_friendly_api(tmp_path: Path, monkeypatch) -> None:
    import compress.measuring.measure_timing as pipeline  # the timing stage times the candidates
    from compress import assert_budgets  # the public spelling docs/budgets.md shows
    from compress.errors import BudgetExceeded

    monkeypatch.setattr(pipeline, "measure_interleaved", _fake_measure({"torch": 1.0, "onnxruntime": 0.25}))
    b = write_budgets(tmp_path, '[[budget]]\nmodel = "m"\nmetric = "p50"\nmax = "0.1x torch"\n')
    with pytest.raises(BudgetExceeded, match="limit 0.1x torch"):
        assert_budgets(b, cache_dir=tmp_path / "c", out_dir=tmp_path / "o")


def test_peak_memory_is_measured_in_a_fresh_process(tmp_path: Path, monkeypatch, capsys) -> None:
    import compress.measuring.measure_timing as pipeline  # the timing stage times the candidates

    monkeypatch.setattr(pipeline, "measure_interleaved", _fake_measure({"torch": 1.0, "onnxruntime": 0.25}))
    b = write_budgets(tmp_path, '[[budget]]\nmodel = "m"\nmetric = "peak_memory"\nmax = "2 GB"\n'
                                '[[budget]]\nmodel = "m"\nmetric = "peak_memory"\nmax = "1 B"\n')
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    verdicts = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"]
    assert got == EXIT_FAIL
    assert [v["status"] for v in verdicts] == ["pass", "fail"]
    assert 0 < verdicts[0]["value"] < 2e9  # a real resident-set figure, in bytes


# ------------------------------------------------------------ the gate's verdicts are honest


@pytest.mark.parametrize(("cell", "status", "needle"), [
    ({"status": "failed", "reason": "build failed: tvm crashed"}, "fail", "build failed"),
    ({"status": "failed", "reason": "inference on the validation data failed: bad shape"}, "fail", "inference"),
    ({"status": "ok", "s": samples(1.0, 0.01),
      "parity": {"ok": False, "flagged": True, "precision": "int8", "reference": "the simulated model",
                 "inputs": "validation split", "reason": "top-1 agreement 0.7 < 0.98", "cosine": 0.99,
                 "agreement": 0.7, "tolerance": {"atol": None, "rtol": 0.0, "min_cosine": 0.995,
                                                 "min_agreement": 0.98}}},
     "fail", "disagrees with its simulation"),
    ({"status": "unavailable", "reason": "no CUDA device"}, "skipped", "unavailable here"),
])
def test_broken_model_under_budget_fails_only_unavailable_skips(cell: dict, status: str, needle: str) -> None:
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.01)}, ("v", "onnxruntime"): cell})
    v = evaluate_budget(budget(max="2 ms"), rep, BF, None, "fp")
    assert v.variant == "v" and v.status == status and needle in v.detail
    assert overall_exit([v]) == (EXIT_FAIL if status == "fail" else EXIT_SKIPPED)


def test_unmeasured_batch_or_variant_and_a_failed_reference_fail() -> None:
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.01)},
                  ("baseline", "torch"): {"status": "failed", "reason": "inference failed at batch 1: boom"}})
    assert evaluate_budget(budget(max="2 ms", batch=8), rep, BF, None, "fp").status == "fail"
    assert evaluate_budget(budget(max="2 ms", variant="nope"), rep, BF, None, "fp").status == "fail"
    v = evaluate_budget(budget(max="0.5x torch"), rep, BF, None, "fp")
    assert v.status == "fail" and "boom" in v.detail


class BrokenBuild(TargetConfig):
    """Test-only target whose compiler fails."""

    kind: Literal["test.broken"] = "test.broken"
    mode: Literal["build", "infer"] = "build"


@register_target(BrokenBuild)
class BrokenTarget:
    name = "test.broken"
    caps = TargetCaps(consumes="onnx")

    def __init__(self, config: BrokenBuild) -> None:
        from compress.targets.onnx_runtime import OnnxRuntimeConfig, OnnxRuntimeTarget

        self.config = config
        self._ort = OnnxRuntimeTarget(OnnxRuntimeConfig())

    def unavailable_reason(self) -> str | None:
        return None

    def fingerprint(self) -> dict:
        return {}

    def compile(self, art, ctx):  # type: ignore[no-untyped-def]
        from compress.errors import BuildError

        if self.config.mode == "build":
            raise BuildError("the compiler crashed on purpose")
        return self._ort.compile(art, ctx)

    def runner(self, compiled, threads: int = 0):  # type: ignore[no-untyped-def]
        inner = self._ort.runner(compiled, threads)

        class Failing:
            input_names = inner.input_names

            def infer(self, feeds):  # type: ignore[no-untyped-def]
                raise RuntimeError("kernel not implemented on purpose")

            def close(self) -> None:
                inner.close()

        return Failing()


@pytest.mark.parametrize(("mode", "needle"), [("build", "compiler crashed"), ("infer", "inference failed")])
def test_check_fails_when_the_model_under_budget_does_not_build_or_run(tmp_path: Path, capsys, mode: str,
                                                                         needle: str) -> None:
    (tmp_path / "r.toml").write_text(
        'name = "m"\nmodel = { source = "zoo:digits-cnn" }\n'
        'measure = { warmup = 0, min_runs = 5, min_time_s = 0.0 }\n'
        f'[[targets]]\nkind = "onnxruntime"\n[[targets]]\nkind = "test.broken"\nmode = "{mode}"\n')
    b = tmp_path / "budgets.toml"
    b.write_text('models = { m = "r.toml" }\nresamples = 300\n'
                 '[[budget]]\nmodel = "m"\ntarget = "test.broken"\nmetric = "p50"\nmax = "100 ms"\n'
                 '[[budget]]\nmodel = "m"\ntarget = "onnxruntime"\nmetric = "p50"\nmax = "100 ms"\n')
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert got == EXIT_FAIL, out
    verdicts = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"]
    assert verdicts[0]["status"] == "fail" and needle in verdicts[0]["detail"]
    assert verdicts[1]["status"] == "pass"  # the other target was still measured


def test_recorded_artifact_is_used_only_for_the_budget_it_belongs_to(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path / "b.json")
    key = BaselineStore.key("m", "baseline", "onnxruntime", 1, "fp")
    store.put(key, {"digest": "old", "samples_ms": samples(1.0, 0.01), "artifact": {"dir": "other-build"}})
    rep = report({("baseline", "onnxruntime"): {"s": samples(1.0, 0.01, seed=1)},
                  ("recorded", "onnxruntime"): {"s": samples(1.0, 0.01, seed=2), "digest": "mine"}})
    v = evaluate_budget(budget(max="1.1x recorded"), rep, BF, store, "fp")
    assert v.unit == "x recorded (numbers only)" and "another variant's budget" in v.detail
    store.put(key, {"digest": "old", "samples_ms": samples(1.0, 0.01), "artifact": {"dir": "mine"}})
    v = evaluate_budget(budget(max="1.1x recorded"), rep, BF, store, "fp")
    assert v.unit == "x recorded" and "re-timed in this run, paired" in v.detail and v.status == "pass"


# ------------------------------------------------------------------------------ fidelity budgets


def test_fidelity_bounds_parse() -> None:
    from compress.apps.budget import parse_fidelity

    b = parse_fidelity("cosine >= 0.99", "b")  # "cosine" is the per-sample mean the report shows
    assert (b.figure, b.op, b.value, b.kind) == ("cosine_mean", ">=", 0.99, "embedding")
    assert parse_fidelity("agreement >= 98.5%", "b").value == pytest.approx(0.985)
    assert parse_fidelity("snr_db >= 30 dB", "b").value == 30.0
    assert parse_fidelity("rel_error <= 0.05", "b").holds(0.04)
    m = parse_fidelity("metric.recall_at_5>=0.8", "b")
    assert (m.figure, m.kind) == ("metric.recall_at_5", None) and not m.holds(0.79)


@pytest.mark.parametrize(("text", "msg"), [
    ("cosine 0.99", "is not 'FIGURE >= VALUE'"),
    ("accuracy >= 0.9", "figure 'accuracy' not understood"),
    ("cosine_worst <= 0.9", "better higher; bound it with >="),
    ("rel_error >= 0.1", "better lower"),
    ("agreement >= 99", "write 0.99 or 99%"),
    ("cosine_mean >= 99%", "'%' applies to agreement"),
    ("agreement >= 0.9 dB", "'dB' applies to snr_db"),
])
def test_bad_fidelity_bounds(text: str, msg: str) -> None:
    from compress.apps.budget import parse_fidelity

    with pytest.raises(RecipeError, match=msg):
        parse_fidelity(text, "budget[1]")


def _fid(kind: str, **figs: object) -> dict:
    base = {"kind": kind, "headline": {"logits": "agreement", "embedding": "cosine_mean",
                                       "regression": "snr_db"}[kind],
            "cosine": 0.99, "max_abs_diff": 0.1, "mean_abs_diff": 0.01}
    return {**base, **figs}


def _fid_report(fid: dict | None, status: str = "ok", reason: str | None = None) -> Report:
    return make_report([rcell("baseline", "onnxruntime", fidelity=_fid("embedding", cosine_mean=1.0,
                                                                       cosine_worst=1.0)),
                        rcell("small", "onnxruntime", status=status, reason=reason, fidelity=fid)])


def test_fidelity_budget_verdicts_are_decided_on_the_value_and_say_what_they_measured() -> None:
    rep = _fid_report(_fid("embedding", cosine_mean=0.995, cosine_worst=0.96, metric={"recall_at_5": 0.9}))
    v = evaluate_budget(budget(fidelity="cosine >= 0.99", metric=None), rep, BF, None, "fp")
    assert (v.status, v.value, v.variant, v.metric) == ("pass", 0.995, "small", "cosine_mean")
    assert v.low is None and "no interval" in v.detail and "64 synthetic inputs" in v.detail
    v = evaluate_budget(budget(fidelity="cosine_worst >= 0.97", metric=None), rep, BF, None, "fp")
    assert v.status == "fail" and v.value == pytest.approx(0.96) and "limit cosine_worst >= 0.97" in v.line()
    assert evaluate_budget(budget(fidelity="metric.recall_at_5 >= 0.85", metric=None), rep, BF, None,
                           "fp").status == "pass"
    assert evaluate_budget(budget(fidelity="metric >= 0.95", metric=None), rep, BF, None, "fp").status == "fail"
    v = evaluate_budget(budget(fidelity="metric.f1 >= 0.5", metric=None), rep, BF, None, "fp")
    assert v.status == "fail" and "returned recall_at_5, not 'f1'" in v.detail
    # A figure the cell's output kind lacks (reached only with a report made elsewhere) fails, naming what it has.
    v = evaluate_budget(budget(fidelity="agreement >= 0.9", metric=None), rep, BF, None, "fp")
    assert v.status == "fail" and "has no agreement (it has cosine_mean, cosine_worst)" in v.detail


@pytest.mark.parametrize(("fid", "status", "reason", "verdict", "needle"), [
    (_fid("embedding", cosine_mean=1.0, cosine_worst=1.0, degenerate="the original model's output is all zero"),
     "ok", None, "fail", "cannot be judged: the original model's output is all zero"),
    (None, "ok", None, "fail", "fidelity was not measured"),
    (None, "failed", "build failed: boom", "fail", "build failed"),
    (None, "unavailable", "no CUDA device", "skipped", "unavailable here"),
])
def test_fidelity_budget_failure_paths(fid, status, reason, verdict, needle) -> None:
    rep = _fid_report(fid, status, reason)
    v = evaluate_budget(budget(fidelity="cosine >= 0.5", metric=None), rep, BF, None, "fp")
    assert v.status == verdict and needle in v.detail


@pytest.mark.parametrize(("body", "msg"), [
    ('[[budget]]\nmodel = "m"\nfidelity = "agreement >= 0.9"\nmetric = "p50"\nmax = "1 ms"\n', "not both"),
    ('[[budget]]\nmodel = "m"\nmetric = "p50"\n', "missing max"),
    ('[[budget]]\nmodel = "m"\nfidelity = "agreement > 0.9"\n', "is not 'FIGURE >= VALUE'"),
])
def test_bad_fidelity_budget_files(tmp_path: Path, body: str, msg: str) -> None:
    with pytest.raises(RecipeError, match=msg):
        load_budgets(write_budgets(tmp_path, body))


@pytest.mark.parametrize(("bound", "msg"), [
    # digits-cnn gives class scores (inferred from its output's shape before anything runs)
    ("cosine_worst >= 0.9", "gives logits output, whose fidelity has no cosine_worst (bound agreement, "
                            "topK_overlap or metric.NAME); kind from: one score vector per sample"),
    ("metric.recall >= 0.5", "names none; set measure.metric"),
])
def test_fidelity_budget_the_run_cannot_produce_is_a_usage_error_before_the_run(tmp_path: Path, capsys,
                                                                                 bound: str, msg: str) -> None:
    b = write_budgets(tmp_path, f'[[budget]]\nmodel = "m"\nfidelity = "{bound}"\n')
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert got == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_fidelity_budget_with_a_declared_output_kind_is_checked_against_it(tmp_path: Path) -> None:
    from compress.apps.budget import check_fidelity_budgets

    b = write_budgets(tmp_path, '[[budget]]\nmodel = "m"\nfidelity = "agreement >= 0.9"\n')
    (tmp_path / "r.toml").write_text('name = "m"\nmodel = { source = "zoo:digits-cnn" }\n'
                                     'measure = { output_kind = "embedding", min_runs = 10 }\n')
    bf, recipes = load_budgets(b)
    with pytest.raises(RecipeError, match="gives embedding output.*kind from: declared in the recipe"):
        check_fidelity_budgets(bf, recipes, b, tmp_path / "c")


def test_check_decides_a_fidelity_budget_end_to_end(tmp_path: Path, monkeypatch, capsys) -> None:
    import compress.measuring.measure_timing as pipeline

    monkeypatch.setattr(pipeline, "measure_interleaved", _fake_measure({"torch": 1.0, "onnxruntime": 0.25}))
    b = write_budgets(tmp_path, '[[budget]]\nmodel = "m"\nfidelity = "agreement >= 99%"\n'
                                '[[budget]]\nmodel = "m"\nfidelity = "top5_overlap >= 0.99"\n')
    got = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    verdicts = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"]
    # The original model exported to ONNX Runtime against itself in PyTorch: the same classes.
    assert got == EXIT_PASS, out
    assert [v["status"] for v in verdicts] == ["pass", "pass"] and verdicts[0]["value"] >= 0.99
    assert "logits fidelity to the original model on 64 synthetic inputs" in verdicts[0]["detail"]
