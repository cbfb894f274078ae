"""The README is a test: every `compress ...` command and every Python snippet in the code blocks of
README.md and docs/*.md is run here, and must exit as the page says.

* Every command is parsed by the real CLI parser and its values validated the way `compress` would
  (pipelines, recipes, budgets files, targets, precisions): a flag, pass or setting that stops existing
  fails here, fast.
* Commands that answer at once (listings, --version, --help) run in the default suite; those that
  train or measure run under `pytest -m slow`, scaled down only through settings (fewer training
  epochs, fewer timing rounds), never by changing what the command does.
* A command that names a file or a machine the reader has to provide (RECIPE.toml, a factory of their
  package, a device) is listed in ``NOT_RUN`` with the reason; a new command on a page must be added to
  one of these lists, or this module fails.
* Python snippets run in a fresh interpreter (the ones that train under `-m slow`); TOML recipes on
  the pages are validated as recipes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced block of ``lang`` on the pages."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                line = text[:m.start()].count("\n") + 2
                out.append((f"{page.relative_to(ROOT)}:{line}", m.group(2)))
    return out


def _commands() -> list[tuple[str, dict[str, str], list[str]]]:
    """(where, environment, argv after `compress`) of every compress command in a shell block."""
    out = []
    for where, text in _blocks("sh"):
        for line in text.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            env = {}
            while tokens and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
                k, _, v = tokens.pop(0).partition("=")
                env[k] = v
            if tokens[:1] == ["compress"]:
                out.append((where, env, tokens[1:]))
            elif tokens[:3] == ["python", "-m", "compress"]:
                out.append((where, env, tokens[3:]))
    return out


def _help_examples() -> list[tuple[str, dict[str, str], list[str]]]:
    """The examples of `compress --help` (the CLI's epilog), as commands."""
    from compress.commands.parser import EPILOG

    out = []
    for line in re.sub(r"\\\n\s*", " ", EPILOG).splitlines():
        tokens = shlex.split(re.split(r"\s{3,}", line.strip())[0])  # the epilog's description follows 3 spaces
        if tokens[:1] == ["compress"] and len(tokens) > 1 and tokens[1] in ("run", "export", "compare", "check"):
            out.append(("compress --help", {}, tokens[1:]))
    return out


COMMANDS = _commands() + _help_examples()


def _key(argv: list[str]) -> str:
    return " ".join(argv)


# Run in the default suite: they answer at once. The value is the exit code the page promises.
RUN_FAST = {
    "passes": 0,
    "targets": 0,
    "--version": 0,
    "--help": 0,
}
# Run under -m slow, scaled through settings only; the value is the scaled command line and the exit codes
# the page allows (a gate's verdict depends on the machine it runs on: pass 0, fail 1, inconclusive 3).
RUN_SLOW: dict[str, tuple[list[str], set[int]]] = {
    "run examples/digits.toml": (["run", "examples/digits.toml", "--train-epochs", "3"], {0}),
    "run --model zoo:digits-cnn --data builtin:digits --train-epochs 15 --pipeline quantize.int8 -> torch,onnxruntime":
        (["run", "--model", "zoo:digits-cnn", "--data", "builtin:digits", "--train-epochs", "3", "--pipeline",
          "quantize.int8 -> torch,onnxruntime"], {0}),
    "compare digits-cnn --targets torch,onnxruntime --precision fp32,int8 --train-epochs 15":
        (["compare", "digits-cnn", "--targets", "torch,onnxruntime", "--precision", "fp32,int8", "--train-epochs",
          "3", "--rounds", "5", "--min-time", "0.2"], {0}),
    "run --model fp32.onnx --data builtin:digits --pipeline quantize.int8 -> onnxruntime":
        (["run", "--model", "fp32.onnx", "--data", "builtin:digits", "--pipeline", "quantize.int8 -> onnxruntime"],
         {0}),
    "check examples/budgets.toml --update-baseline": (["check", "examples/budgets.toml", "--update-baseline"],
                                                       {0, 1, 3}),
    "check examples/budgets.toml --junit junit.xml": (["check", "examples/budgets.toml", "--junit", "junit.xml"],
                                                       {0, 1, 3}),
    "check examples/budgets.toml --json": (["check", "examples/budgets.toml", "--json"], {0, 1, 3}),
    "targets --check": (["targets", "--check"], {0}),
    "run --model zoo:digits-cnn --data builtin:digits --train-epochs 15 --pipeline prune.channels{ratio=0.5},"
    "distill{epochs=8} -> torch,onnxruntime":
        (["run", "--model", "zoo:digits-cnn", "--data", "builtin:digits", "--train-epochs", "15", "--pipeline",
          "prune.channels{ratio=0.5},distill{epochs=8} -> torch,onnxruntime"], {0}),
    "compare a.onnx b.onnx c.onnx --targets onnxruntime --data builtin:digits --batch 1,32":
        (["compare", "a.onnx", "b.onnx", "c.onnx", "--targets", "onnxruntime", "--data", "builtin:digits", "--batch",
          "1,32", "--rounds", "5", "--min-time", "0.2"], {0}),
}
# Language models: the pages name the reader's model folder (models/smollm2); the slow suite puts a small
# random Llama with its tokenizer there (tests/llm_models.py) and runs the command as written.
LM_RUN = ["run", "--model", "hf:models/smollm2", "--task", "causal-lm", "--data", "builtin:pydoc-topics",
          "--pipeline", "quantize.weight_only{bits=4,group_size=32,head_bits=8,accuracy_level=4} -> torch,onnxruntime"]
LM_GENERATE = ["generate", "hf:models/smollm2", "--prompt", "def fibonacci(n):", "--tokens", "32"]
LM_COMPARE = ["compare", "hf:models/smollm2", "--task", "causal-lm", "--targets", "torch,onnxruntime,openvino",
              "--precision", "fp32,int8,int4-weights"]
RUN_SLOW[_key(LM_RUN)] = (LM_RUN, {0})
RUN_SLOW[_key(LM_COMPARE)] = ([*LM_COMPARE, "--rounds", "2"], {0})
RUN_SLOW[_key(LM_GENERATE)] = (LM_GENERATE, {0})
# Parsed and validated, not run, and why.
NOT_RUN = {
    "run RECIPE.toml": "a placeholder for the reader's recipe",
    "run --model mypkg.models:make_net --weights net.safetensors --input-shape 1,3,224,224 --data folder:images/ "
    "--pipeline export.onnx -> torch,onnxruntime": "the reader's own package, weights and image folder",
    "run --model zoo:resnet18 --pipeline prune.channels{ratio=0.5},quantize.int8 -> onnxruntime":
        "ResNet-18 at 224x224: minutes of CPU per run; the same passes run on the digits CNN in the slow suite",
    "run --model zoo:resnet18 --data builtin:digits --pipeline prune.channels{macs_target=0.5,round_to=16},"
    "distill{epochs=8},quantize.int8 -> onnxruntime": "ResNet-18 distilled for 8 epochs: tens of minutes",
    "compare resnet18 --precision fp32,int8,int8-nncf --targets onnxruntime,openvino --batch 1,8":
        "ResNet-18 with NNCF calibration: minutes; compare runs on the digits CNN in the slow suite",
    "compare model.onnx --targets onnxruntime,tvm{tuning_trials=200}": "200 TVM tuning trials: many minutes",
    "search examples/search-digits.toml --trials 12": "12 trained trials: tens of minutes (the search tests run "
                                                      "smaller spaces)",
    "search space.toml --dry-run": "a placeholder for the reader's search space",
    "search llm-space.toml --trials 8": "a placeholder for the reader's space over their language model (minutes a "
                                        "trial on SmolLM2; tests/test_llm_search.py searches a tiny Llama)",
    "run recipe.toml": "a placeholder for the reader's recipe",
    "export runs/NAME --target onnxruntime --out bundle": "a placeholder for a finished run (the bundle tests "
                                                          "export real runs)",
}


def _validate(argv: list[str]) -> None:
    """What `compress` checks before any work, without doing the work."""
    from compress.apps.budget import load_budgets
    from compress.commands.parser import build_parser as _parser
    from compress.commands.run_cmd import parse_shape as _shape
    from compress.core.registry import compare_precisions
    from compress.stages.recipe import load_recipe, parse_pipeline

    if argv in (["--help"], ["--version"]):
        return
    a = _parser().parse_args(argv)
    if a.cmd == "run":
        if a.pipeline:
            parse_pipeline(a.pipeline)
        if a.recipe and (ROOT / a.recipe).exists():
            load_recipe(ROOT / a.recipe)
        if a.input_shape:
            _shape(a.input_shape)
    elif a.cmd == "compare":
        if a.targets:
            parse_pipeline("-> " + a.targets)
        for p in a.precision.split(","):
            assert p == "fp32" or p in compare_precisions(), f"--precision {p} is not offered"
    elif a.cmd == "check":
        load_budgets(ROOT / a.budgets)
    elif a.cmd == "search" and (ROOT / a.space).exists():  # the space is validated by its dry run
        r = subprocess.run([sys.executable, "-m", "compress", "search", str(ROOT / a.space), "--dry-run"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr


def test_every_command_on_the_pages_is_classified() -> None:
    assert COMMANDS, "no compress command found: did the pages move?"
    known = set(RUN_FAST) | set(RUN_SLOW) | set(NOT_RUN)
    missing = [f"{w}: compress {_key(argv)}" for w, env, argv in COMMANDS if _key(argv) not in known]
    assert not missing, ("commands on the pages that no test runs; add each to RUN_FAST, RUN_SLOW or NOT_RUN in "
                         "tests/test_readme.py:\n" + "\n".join(missing))


@pytest.mark.parametrize(("where", "env", "argv"), COMMANDS, ids=[f"{w}:{_key(a)[:60]}" for w, _, a in COMMANDS])
def test_every_command_parses_and_validates(where: str, env: dict[str, str], argv: list[str]) -> None:
    _validate(argv)


def _compress(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
              timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_CACHE": str(cwd / ".compress-cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "compress", *argv], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


FAST_CASES = [(w, env, a) for w, env, a in COMMANDS if _key(a) in RUN_FAST]


@pytest.mark.parametrize(("where", "env", "argv"), FAST_CASES, ids=[f"{w}:{_key(a)}" for w, _, a in FAST_CASES])
def test_quick_commands_run_as_documented(where: str, env: dict[str, str], argv: list[str], tmp_path: Path) -> None:
    r = _compress(argv, tmp_path, env, timeout=300)
    assert r.returncode == RUN_FAST[_key(argv)], f"{where}: compress {_key(argv)}\n{r.stderr}"
    assert r.stdout.strip()


def _workdir(tmp_path: Path) -> Path:
    """A folder like a fresh clone's root: the examples, with an ONNX model for the pages' fp32.onnx/a.onnx."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    for name in ("recipe.toml",):
        (tmp_path / name).write_text('model = { source = "zoo:digits-cnn" }\n')
    return tmp_path


def _onnx_files(cwd: Path) -> None:
    """fp32.onnx, a.onnx, b.onnx, c.onnx: the digits CNN exported by the pipeline itself (what a user brings)."""
    import onnx
    from compress.passes.export_onnx import ExportOnnx

    from compress.core.cache import Cache
    from compress.core.manager import PassContext, PassManager
    from compress.inputs.models import load_model
    from compress.stages.recipe import ModelSpec

    cache = Cache(cwd / ".export-cache")
    out, _ = PassManager([ExportOnnx()]).run(load_model(ModelSpec(source="zoo:digits-cnn"), cache),
                                             PassContext(cache=cache, progress=False))
    model = onnx.load(str(out.path / "model.onnx"))
    for name in ("fp32.onnx", "a.onnx", "b.onnx", "c.onnx"):
        onnx.save(model, str(cwd / name))


SLOW_CASES = [(w, env, a) for w, env, a in COMMANDS if _key(a) in RUN_SLOW]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "env", "argv"), SLOW_CASES, ids=[f"{w}:{_key(a)[:60]}" for w, _, a in SLOW_CASES])
def test_commands_that_train_or_measure_run_as_documented(where: str, env: dict[str, str], argv: list[str],
                                                          tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    scaled, codes = RUN_SLOW[_key(argv)]
    if any("models/smollm2" in x for x in scaled):
        from tests.llm_models import tiny_llama

        (cwd / "models").mkdir(exist_ok=True)
        tiny_llama(cwd / "models" / "smollm2", layers=2, vocab=512)
    if any(x.endswith(".onnx") for x in scaled):
        _onnx_files(cwd)
    if scaled[0] == "check":  # the budgets' model trains for 15 epochs and distills for 8: fewer, same recipe
        rec = cwd / "examples" / "digits.toml"
        rec.write_text(rec.read_text().replace("train_epochs = 15", "train_epochs = 3").replace("epochs = 8",
                                                                                                "epochs = 2"))
        if "--update-baseline" not in scaled:
            assert _compress(["check", "examples/budgets.toml", "--update-baseline", "-q"], cwd).returncode in codes
    r = _compress(scaled, cwd, env)
    assert r.returncode in codes, f"{where}: compress {_key(scaled)}\n{r.stderr[-3000:]}"
    # The pages' examples keep accuracy: none of them may end in the accuracy guard.
    assert "ACCURACY -" not in r.stdout, r.stdout


def test_toml_recipes_on_the_pages_are_valid(tmp_path: Path) -> None:
    from compress.apps.search_space import load_space
    from compress.stages.recipe import recipe_from_dict

    checked = 0
    for i, (where, text) in enumerate(_blocks("toml")):
        table = tomllib.loads(text)
        if "search" in table:  # a search space: a recipe with open values and a [search] table
            (tmp_path / f"space{i}.toml").write_text(text)
            load_space(tmp_path / f"space{i}.toml")
            checked += 1
        elif "model" in table:  # a recipe (other blocks: budgets, profiles, plugin entry points)
            recipe_from_dict(table, where=where)
            checked += 1
    assert checked


def _python_snippets() -> list[tuple[str, str]]:
    return _blocks("python")


# Snippets that need a finished run of examples/digits.toml (minutes): -m slow, in order, in one folder.
_SLOW_SNIPPET = re.compile(r"examples/digits\.toml|runs/digits")


@pytest.mark.parametrize(("where", "code"), [s for s in _python_snippets() if not _SLOW_SNIPPET.search(s[1])],
                         ids=[w for w, c in _python_snippets() if not _SLOW_SNIPPET.search(c)])
def test_python_snippets_run(where: str, code: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, f"{where}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_python_snippets_on_the_demo_run(tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    rec = cwd / "examples" / "digits.toml"
    rec.write_text(rec.read_text().replace("train_epochs = 15", "train_epochs = 3").replace("epochs = 8", "epochs = 2"))
    shutil.copytree(ROOT / "docs", cwd / "docs")
    for where, code in [s for s in _python_snippets() if _SLOW_SNIPPET.search(s[1])]:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_CACHE": str(cwd / "c")})
        assert r.returncode == 0, f"{where}\n{r.stderr[-3000:]}"
