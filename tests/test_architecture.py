"""The core knows no pass or target by name: it asks what they declare (compress.core.capabilities).

A plugin installed from outside the package (a ``compress.plugins`` entry point) with a second
PyTorch-based target and a second Q/DQ-producing pass gets the same treatment as the built-in ones.
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compress.core import registry
from compress.core.capabilities import Facts, TargetCaps, refusal
from compress.quality.parity import LOWERING

ROOT = Path(__file__).resolve().parent.parent


def _string_constants(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every string constant but docstrings (documentation may name passes and targets)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_core_names_no_pass_kind_and_no_target() -> None:
    names = set(registry.passes()) | set(registry.targets())
    names = {n for n in names if not n.startswith("test.")}
    assert {"export.onnx", "quantize.int8", "torch", "onnxruntime"} <= names  # the check has something to find
    found = []
    for path in sorted((ROOT / "compress").rglob("*.py")):
        if "templates" in path.parts:  # programs copied into bundles, never imported by the core
            continue
        for line, value in _string_constants(ast.parse(path.read_text())):
            if value in names:
                found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert found == [], "the core compares plugin names instead of asking their capabilities:\n" + "\n".join(found)


def test_the_string_scan_would_see_a_name() -> None:
    """The scan above cannot pass vacuously: a literal in code is found, a docstring is not."""
    src = 'def f():\n    "quantize.int8 in a docstring"\n    return x == "onnxruntime"\n'
    assert [v for _, v in _string_constants(ast.parse(src))] == ["onnxruntime"]


def test_no_top_level_passes_or_targets_package_is_imported() -> None:
    """The plugin folders import as compress.passes / compress.targets only (a generic top-level name would
    collide with other packages, and a second name would load every plugin twice)."""
    bad = []
    for folder in ("compress", "passes", "targets", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] in ("passes", "targets")]
    assert bad == []
    import compress.passes
    import compress.targets

    assert Path(compress.passes.__file__).parent == ROOT / "passes"
    assert Path(compress.targets.__file__).parent == ROOT / "targets"
    assert "passes" not in sys.modules and "targets" not in sys.modules


def test_targets_refuse_what_they_cannot_run() -> None:
    caps = TargetCaps(consumes="onnx", precisions=frozenset({"fp32", "int8"}))
    assert refusal(caps, Facts(), "x") is None
    assert "does not run fp16 models" in (refusal(caps, Facts(precision="fp16"), "x") or "")
    needs = Facts(required_ops=("com.microsoft:MatMulNBits",))
    assert "com.microsoft:MatMulNBits" in (refusal(caps, needs, "x") or "")
    ort_like = TargetCaps(consumes="onnx", op_domains=frozenset({"com.microsoft"}))
    assert refusal(ort_like, needs, "x") is None
    assert refusal(ort_like, Facts(required_ops=("com.microsoft.nchwc:Conv",)), "x") is None  # a sub-domain
    assert refusal(ort_like, Facts(required_ops=("com.microsoftx:Op",)), "x") is not None  # not a sub-domain
    # Facts only get lower in precision as passes stack up.
    assert Facts(precision="int8").lower_precision("fp16").precision == "int8"
    assert Facts().lower_precision("fp16").precision == "fp16"


# ---------------------------------------------------------------- a plugin from outside the package

PLUGIN = '''
"""A third-party plugin: a second eager PyTorch target and a second Q/DQ-producing pass."""
import shutil
from typing import Any, Literal

from compress.core.artifact import PYTORCH, Artifact, sha256_files
from compress.core.capabilities import TargetCaps
from compress.core.config import PassConfig, TargetConfig
from compress.passes.quantize_int8 import QuantizeInt8, quantize_int8
from compress.core.registry import register_command, register_pass, register_target
from compress.inputs.torch_io import load_torch

CALLS = []


@register_command("ext-hello", help="say hello (a plugin's own command)",
                  arguments=[(("--name",), {"default": "you"}), (("--times",), {"type": "int", "default": 1})])
def hello(a: Any) -> int:
    print(("hello " + a.name + chr(10)) * a.times, end="")
    return 0


class ExtQdq(PassConfig):
    """Static INT8 by another route (here: the built-in quantizer, under another name)."""

    kind: Literal["ext.qdq"] = "ext.qdq"
    samples: int = 32

    def data_needed(self) -> str | None:
        return "any"


@register_pass(ExtQdq, consumes="onnx", produces="onnx", compare_precision="int8-ext")
def ext_qdq(art: Artifact, cfg: ExtQdq, ctx: Any) -> Artifact:
    CALLS.append(cfg.kind)
    made = quantize_int8(art, QuantizeInt8(samples=cfg.samples), ctx)
    return Artifact("onnx", made.path, made.digest, art.inputs, metadata={"ext.qdq": {"notes": ["ext"]}},
                    facts=made.facts)


class ExtEagerConfig(TargetConfig):
    kind: Literal["ext.eager"] = "ext.eager"


class _Runner:
    def __init__(self, module: Any, names: list[str]) -> None:
        self.module, self.input_names = module, names

    def infer(self, feeds: dict) -> list:
        import torch

        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return [out.numpy()]

    def close(self) -> None:
        pass


@register_target(ExtEagerConfig)
class ExtEager:
    name = "ext.eager"
    caps = TargetCaps(consumes=PYTORCH, any_batch=True)

    def __init__(self, config: ExtEagerConfig) -> None:
        self.config = config

    def unavailable_reason(self) -> str | None:
        return None

    def fingerprint(self) -> dict:
        return {}

    def compile(self, art: Artifact, ctx: Any) -> Artifact:
        out = ctx.new_dir("ext")
        for name in ("source.json", "model.pt"):
            shutil.copy2(art.path / name, out / name)
        return Artifact("compiled", out, sha256_files(out), art.inputs)

    def runner(self, compiled: Artifact, threads: int = 0) -> _Runner:
        tmp = Artifact(PYTORCH, compiled.path, compiled.digest, compiled.inputs)
        return _Runner(load_torch(tmp), [s.name for s in compiled.inputs])
'''


@pytest.fixture
def ext_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``extplug`` installed as a distribution with a ``compress.plugins`` entry point (on sys.path, the way
    pip lays out site-packages), then discovered by the registry like any installed plugin."""
    site = tmp_path / "site"
    (site / "extplug").mkdir(parents=True)
    (site / "extplug" / "__init__.py").write_text("")
    (site / "extplug" / "plugin.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "extplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[compress.plugins]\nextplug = extplug.plugin\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    before_p, before_t = dict(registry._PASSES), dict(registry._TARGETS)
    monkeypatch.setattr(registry, "_loaded", False)
    registry.passes()  # loads the built-ins, then the entry point
    yield importlib.import_module("extplug.plugin")
    registry._PASSES.clear()
    registry._PASSES.update(before_p)
    registry._TARGETS.clear()
    registry._TARGETS.update(before_t)
    for m in [m for m in sys.modules if m.startswith("extplug")]:
        del sys.modules[m]


def test_an_entry_point_plugin_is_listed_and_offered(ext_plugin: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from compress.cli import main

    assert "ext.qdq" in registry.passes() and "ext.eager" in registry.targets()
    assert registry.compare_precisions()["int8-ext"].kind == "ext.qdq"
    assert main(["passes"]) == 0
    assert "ext.qdq  (onnx -> onnx)" in capsys.readouterr().out
    # Its CLI command is listed and runs, with its typed arguments.
    assert main(["--help"]) == 0 and "ext-hello" in capsys.readouterr().out
    assert main(["ext-hello", "--name", "plugin", "--times", "2"]) == 0
    assert capsys.readouterr().out == "hello plugin\nhello plugin\n"
    assert main(["ext-hello", "--times", "two"]) == 2  # argparse's usage error, exit 2


def test_an_entry_point_plugin_gets_the_right_treatment_everywhere(ext_plugin: Any, tmp_path: Path) -> None:
    from compress.stages.pipeline import run

    recipe = tmp_path / "ext.toml"
    recipe.write_text(textwrap.dedent("""
        name = "ext"
        model = { source = "zoo:digits-cnn" }
        data = { source = "builtin:digits" }
        measure = { batch_sizes = [1, 4], warmup = 1, min_runs = 3, min_time_s = 0.0, max_time_s = 5.0 }
        [[passes]]
        kind = "ext.qdq"
        [[targets]]
        kind = "ext.eager"
        [[targets]]
        kind = "onnxruntime"
    """))
    rep = run(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False).to_json()
    assert ext_plugin.CALLS == ["ext.qdq"]
    cells = {(c["variant"], c["target"]): c for c in rep["results"]}
    eager = cells[("baseline", "ext.eager")]
    # A second PyTorch target: any batch size (not "fixed batch size of 1"), no parity row of its own ...
    assert eager["status"] == "ok" and set(eager["latency"]) == {"1", "4"}
    assert not any("fixed batch size" in n for n in eager["notes"])
    assert eager["parity"] is None and eager["quant_parity"] is None
    # ... and the pass that acts on ONNX only leaves its PyTorch model as the baseline's: not raced against itself.
    assert cells[("ext", "ext.eager")]["status"] == "skipped"
    # A second Q/DQ pass: its facts say int8 Q/DQ, so the target is judged against the simulated model at
    # the INT8 lowering tolerance, as for the built-in quantizer.
    q = cells[("ext", "onnxruntime")]
    assert q["status"] == "ok", q["reason"]
    assert q["parity"]["precision"] == "int8" and "simulated" in q["parity"]["reference"]
    assert q["parity"]["tolerance"] == LOWERING["int8"].to_json()
    assert cells[("baseline", "onnxruntime")]["parity"]["precision"] == "fp32"
    assert rep["variants"]["ext"]["passes"]["ext.qdq"]["notes"] == ["ext"]
    # The report shows each variant's facts (report.json, schema v1).
    assert rep["variants"]["ext"]["facts"]["precision"] == "int8"
    assert rep["variants"]["ext"]["facts"]["quantization"] == "qdq"
    assert rep["variants"]["baseline"]["facts"] == {**rep["variants"]["ext"]["facts"], "precision": "fp32",
                                                  "quantization": None}
    # The lowering pass was inserted before the ONNX pass without being named anywhere in the core.
    assert [s["pass"] for s in rep["variants"]["ext"]["steps"]] == ["export.onnx", "ext.qdq"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["results"] == json.loads(json.dumps(rep["results"], default=str))


# ---------------------------------------------------------------- code identity in cache keys


def test_editing_a_plugin_changes_exactly_its_code_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "idpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_shared.py").write_text("K = 1\n")
    (pkg / "a.py").write_text("from ._shared import K\n")
    (pkg / "b.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry.code_identity.cache_clear()
    a0, b0 = registry.code_identity("idpkg.a"), registry.code_identity("idpkg.b")
    (pkg / "_shared.py").write_text("K = 2\n")  # a helper of a, not of b
    registry.code_identity.cache_clear()
    a1, b1 = registry.code_identity("idpkg.a"), registry.code_identity("idpkg.b")
    assert a1 != a0 and b1 == b0
    registry.code_identity.cache_clear()


def test_a_pass_code_identity_is_in_its_cache_key(tiny: Any, cache: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.api import module_artifact
    from compress.core.manager import PassContext, PassManager

    info = registry.get_pass("test.scale")  # the suite's own pass (conftest)
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    steps = [info.config_cls(factor=2.0)]
    _, (r1,) = PassManager(steps).run(root, PassContext(cache=cache, progress=False))
    _, (again,) = PassManager(steps).run(root, PassContext(cache=cache, progress=False))
    assert again.cache_hit and again.key == r1.key  # same code: the entry is reused
    monkeypatch.setattr(registry, "code_identity", lambda module: "edited")  # as if the pass's source changed
    _, (r2,) = PassManager(steps).run(root, PassContext(cache=cache, progress=False))
    assert r1.key != r2.key and not r2.cache_hit


def test_dump_ir_writes_every_step(tmp_path: Path) -> None:
    from compress.cli import main

    out = tmp_path / "ir"
    code = main(["run", "--model", "zoo:digits-cnn", "--data", "random", "--pipeline",
                 "prune.magnitude{sparsity=0.5} -> onnxruntime", "--dump-ir", str(out), "--out",
                 str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "-q"])
    assert code == 0
    chain = sorted(p.name for p in (out / "digits-cnn").iterdir())
    assert chain == ["01-prune.magnitude.json", "01-prune.magnitude.txt", "02-export.onnx.json",
                     "02-export.onnx.onnx", "02-export.onnx.onnx.txt"]
    facts = json.loads((out / "digits-cnn" / "01-prune.magnitude.json").read_text())["facts"]
    assert facts["sparsity"] == "unstructured"
    assert "Conv" in (out / "digits-cnn" / "02-export.onnx.onnx.txt").read_text()
    assert sorted(p.name for p in (out / "baseline").iterdir())[0] == "01-export.onnx.json"


def test_dump_ir_into_a_file_is_a_usage_error_before_any_work(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from compress.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["run", "--model", "zoo:digits-cnn", "--data", "random", "--pipeline", "-> onnxruntime",
                 "--dump-ir", str(blocker), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --dump-ir ") and "not a folder" in err[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ one home for "how do two cells compare"

# The statistics of a latency ratio (measuring.stats): only measuring.compare calls them on measured cells.
_RATIO_FUNCTIONS = {"ratio_ci", "bootstrap_ratio", "widen", "split_half_aa"}
# What a cell's clock is made of: its raw per-round samples, and the figures of a device's own clock.
_SAMPLES = "samples_ms"


def _compare_decisions(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Where a module decides part of "how do two cells compare" itself: it imports or calls a ratio
    statistic, reads a cell's raw samples (``.samples_ms``, ``["samples_ms"]``), or picks a device's clock
    (``lat.device.p50_ms``)."""
    from compress.reporting.report_schema import DeviceLatency

    device_fields = set(DeviceLatency.model_fields)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name in _RATIO_FUNCTIONS:
                    yield node.lineno, f"imports {a.name}"
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in _RATIO_FUNCTIONS:
                yield node.lineno, f"calls {name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if node.attr == _SAMPLES:
                yield node.lineno, f"reads .{_SAMPLES}"
            elif isinstance(node.value, ast.Attribute) and node.value.attr == "device" and node.attr in device_fields:
                yield node.lineno, f"reads .device.{node.attr}"
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if isinstance(node.slice, ast.Constant) and node.slice.value == _SAMPLES:
                yield node.lineno, f"reads [{_SAMPLES!r}]"


# compare.py is the home; stats.py defines the statistics (and composes them).
_COMPARE_HOME = {"compare.py", "stats.py"}


def test_only_compare_decides_how_two_cells_compare() -> None:
    """No module but compress/measuring/compare.py reads a cell's clock samples or computes a latency ratio: which
    clock, same device or not, same build or not and the ratio itself are decided there once (they had drifted
    apart in measurement, report, budget and search)."""
    found = []
    files = sorted((ROOT / "compress").rglob("*.py"))
    assert any(p.name == "compare.py" for p in files) and len(files) > 40  # the scan has the tree to look at
    for path in files:
        if path.name in _COMPARE_HOME:
            continue
        for line, what in _compare_decisions(ast.parse(path.read_text())):
            found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert found == [], ("decides how two cells compare outside compress/measuring/compare.py (ask compare.clock / "
                         "compare.compare instead):\n" + "\n".join(found))


def test_the_compare_scan_would_see_a_second_home() -> None:
    """The scan above cannot pass vacuously: each way of deciding a comparison outside compare.py is seen."""
    src = textwrap.dedent("""
        from .stats import ratio_ci
        def f(cell, base, lat):
            r = stats.widen(ratio_ci(cell.latency["1"].samples_ms, base["samples_ms"]), None)
            return lat.device.p50_ms, cell.device
    """)
    got = sorted(what for _, what in _compare_decisions(ast.parse(src)))
    assert got == sorted(["calls ratio_ci", "calls widen", "imports ratio_ci", "reads ['samples_ms']",
                          "reads .device.p50_ms", "reads .samples_ms"])


# ------------------------------------------------------------------ declared, not probed

# What the core asks of a plugin: members of compress.core.protocols (Target, DeviceRunner, Instrument) and settings
# named by the capabilities. Probing them with getattr would make an undeclared second contract.
_DECLARED = {"check_config", "parity_precision", "parity_batch", "max_batch", "device_name", "remote",
             "device_notes", "device_ms", "for_chain", "max_accuracy_drop", "min_sample_cosine"}


def _probes(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in _DECLARED):
            yield node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"


def test_the_core_asks_plugins_only_what_they_declare() -> None:
    found = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in sorted((ROOT / "compress").rglob("*.py"))
             for line, what in _probes(ast.parse(p.read_text()))]
    assert found == [], "probes for a member a protocol declares (call it):\n" + "\n".join(found)
    assert [w for _, w in _probes(ast.parse("getattr(t, 'check_config', None)\ngetattr(t, 'name')"))] == [
        "getattr(..., 'check_config')"]  # the scan sees a probe


def test_a_plugin_target_gets_the_declared_defaults(ext_plugin: Any) -> None:
    """A target class that does not derive from TargetBase still answers the whole protocol."""
    from compress.core.protocols import OPTIONAL_TARGET_MEMBERS, TargetBase

    cls = registry.targets()["ext.eager"][1]
    assert not issubclass(cls, TargetBase)
    t = cls(registry.get_target_config("ext.eager")())
    assert all(callable(getattr(t, m)) for m in OPTIONAL_TARGET_MEMBERS)
    assert t.check_config() is None and t.parity_precision(None, "fp16") == "fp16" and t.parity_batch() == 16


def test_every_builtin_target_derives_from_the_protocols_defaults() -> None:
    from compress.core.protocols import TargetBase

    builtin = {k: cls for k, (_, cls) in registry.targets().items() if cls.__module__.startswith("compress.targets.")}
    assert {"torch", "onnxruntime"} <= set(builtin)
    assert [k for k, cls in builtin.items() if not issubclass(cls, TargetBase)] == []


def test_a_sparsity_pattern_without_kernels_is_said_to_run_dense() -> None:
    from compress.core.capabilities import dense_note

    facts = Facts(sparsity="2:4")
    with_kernels = TargetCaps(consumes="onnx", sparse_kernels=frozenset({"2:4"}))
    without = TargetCaps(consumes="onnx")
    assert dense_note(with_kernels, facts, "gpu", ["gpu"]) is None
    note = dense_note(without, facts, "cpu", ["gpu"]) or ""
    assert "2:4 sparsity runs as dense weights on 'cpu'" in note and "gpu" in note
    assert dense_note(without, Facts(sparsity="unstructured"), "cpu", []) is None  # nobody has kernels: no note
    assert dense_note(without, Facts(), "cpu", ["gpu"]) is None
