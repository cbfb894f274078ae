"""The ``compress`` command line.

Exit codes: 0 success; 1 a failure while running (export, build, pass error);
2 a usage error (bad recipe, unknown pass/target, missing or unsafe input file);
130 interrupted (finished steps are cached; run again to resume); 143 terminated by SIGTERM (the same).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import CompressError, RecipeError

EPILOG = """examples:
  compress run examples/digits.toml
  compress run --model zoo:digits-cnn --data builtin:digits --train-epochs 15 \\
      --pipeline "prune.channels{ratio=0.5},distill{epochs=8} -> torch,onnxruntime"
  compress run --model fp32.onnx --data builtin:digits --pipeline "quantize.int8 -> onnxruntime"
  compress passes            list passes and their settings
  compress targets           list targets and whether they run here
  compress profiles          list hardware profiles (compress run --profile rpi5 ...)
  compress export runs/NAME --target onnxruntime --out bundle   a folder to copy to the device
  compress history           the trend of each figure across commits (runs/history.jsonl)

exit codes: 0 ok, 1 failure while running, 2 usage error, 130 interrupted, 143 SIGTERM (rerun to resume)
"""

CHECK_EPILOG = """exit codes of compress check:
  0  every budget passed (or was skipped where skipping is allowed: --allow-skip, allow_skip = true)
  1  at least one budget failed (its whole confidence interval is beyond the limit)
  2  usage error (bad budgets file, unknown model/target/metric, unit missing, corrupt baseline,
     a fidelity figure the model's output does not produce)
  3  inconclusive: no failure, but at least one interval straddles its limit (too noisy to decide)
  4  failed closed: a budget could not be judged here (no recorded baseline for this machine, a reference
     or target unavailable) and skipping it was not allowed
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress", description="Compress PyTorch models, lower to ONNX, compile per "
                                "target and measure accuracy against latency.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    from . import __version__

    p.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe (or a one-line pipeline) and write a report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    r.add_argument("recipe", nargs="?", help="recipe TOML file")
    r.add_argument("--pipeline", help='one-line pipeline, e.g. "prune.channels{ratio=0.5} -> onnxruntime"; '
                   "replaces the recipe's passes and targets")
    r.add_argument("--model", help="model source when no recipe is given (zoo:NAME, pkg.mod:factory, .pt2, .onnx)")
    r.add_argument("--task", help="what a Hugging Face model (hf:DIR) does: causal-lm, embedding, hidden-states, "
                   "sequence-classification, image-classification, image-features")
    r.add_argument("--weights", help="state dict for the model (.pt loaded with weights_only=True, or .safetensors)")
    r.add_argument("--input-shape", help="model input shape, e.g. 1,3,224,224")
    r.add_argument("--data", help="data source (builtin:digits, folder:PATH, npz:PATH, text:FILE, jsonl:FILE, random)")
    r.add_argument("--train-epochs", type=int, help="train the model first (cached)")
    r.add_argument("--allow-unsafe-pt2", action="store_true", default=None,
                   help="load a .pt2 exported program (torch unpickles it: can run code; only files you trust)")
    r.add_argument("--out", help="output folder for report.json/.md/.html and the plots (default runs/NAME); a "
                   "previous run's folder is updated, a folder holding other files needs --force")
    r.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a previous run's")
    r.add_argument("--cache", help="cache folder (default $COMPRESS_CACHE or .compress-cache)")
    r.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    r.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    r.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as TOML and exit")
    r.add_argument("--dump-ir", metavar="DIR", help="debugging: write what every pass produced into DIR (the ONNX "
                   "graph as text and .onnx, the PyTorch module tree, each artifact's facts), per variant")
    r.add_argument("--profile", help="hardware profile (compress profiles lists them) or a profile .toml file: "
                   "the device's TVM target, ISA (INT8 scheme) and threads become the recipe's defaults")

    c = sub.add_parser("check", help="check latency/accuracy/size/fidelity budgets (a CI gate)", epilog=CHECK_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("budgets", help="budgets TOML file")
    c.add_argument("--baseline", help="baseline file (default BUDGETS.baseline.json beside the budgets file)")
    c.add_argument("--update-baseline", action="store_true", help="record this run as the baseline for this "
                   "machine fingerprint: its numbers and its compiled artifacts (BUDGETS.baseline.artifacts/, "
                   "commit it), which later checks re-time beside the candidate")
    c.add_argument("--junit", help="also write JUnit XML here")
    c.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the verdicts as JSON to stdout (or write them to FILE)")
    c.add_argument("--out", help="folder for the per-model reports (default runs/check)")
    c.add_argument("--cache", help="cache folder")
    c.add_argument("--allow-skip", action="store_true", default=None,
                   help="let budgets that cannot be judged here (no recorded baseline, reference or target "
                   "unavailable) pass as SKIPPED instead of failing the check with exit 4")
    c.add_argument("--fail-on-unavailable", action="store_true", default=None,
                   help="the default (kept for older scripts): a budget that cannot be judged fails (exit 4), "
                   "even where the budgets file allows skipping")
    c.add_argument("--drift", type=int, metavar="N", help="also fail when the last N commits together moved a "
                   "budget's figure past its limit though each step passed (needs the history: docs/history.md)")
    c.add_argument("--drift-max", metavar="PCT", help="with --drift: the movement allowed over N commits for every "
                   "latency and size budget, e.g. 10%% (default: K-1 of 'K x recorded' budgets only)")

    h = sub.add_parser("history", help="the trend of each figure per machine across commits, change points marked "
                       "(every run and check appends to runs/history.jsonl; docs/history.md)")
    h.add_argument("store", nargs="?", help="history file (default $COMPRESS_HISTORY or runs/history.jsonl)")
    h.add_argument("--figure", help="only figures whose name contains this, e.g. p50@1 or onnxruntime")
    h.add_argument("--machine", help="only this machine (a prefix of its fingerprint)")
    h.add_argument("--last", type=int, default=40, help="points per figure (default 40)")
    h.add_argument("--html", metavar="PATH", help="also draw the trends into a self-contained HTML page")

    m = sub.add_parser("compare", help="every available target on one model, or several ONNX files on one "
                       "target, in one interleaved run")
    m.add_argument("model", nargs="+", help="zoo name (resnet18 or zoo:resnet18), a recipe .toml, or .onnx "
                   "file(s); several .onnx files are timed interleaved against the first, with accuracy on "
                   "the same --data")
    m.add_argument("--targets", help="targets to compare, text form (default: all), "
                   'e.g. "onnxruntime,tvm{tuning_trials=64}"')
    m.add_argument("--precision", default="fp32",
                   help="comma list of fp32, int8, int8-nncf, int8-dynamic, int8-weights-nncf, "
                   "fp16 (default fp32)")
    m.add_argument("--data", help="data source (default builtin:digits for zoo models, none for .onnx)")
    m.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8")
    m.add_argument("--rounds", type=int, default=20, help="minimum interleaved timing rounds (default 20)")
    m.add_argument("--min-time", type=float, default=1.0, help="minimum seconds of timed runs per candidate")
    m.add_argument("--input-shape", help="model input shape, e.g. 1,3,224,224")
    m.add_argument("--train-epochs", type=int, default=0, help="train a zoo model on the data first (cached)")
    m.add_argument("--out", help="output folder (default runs/compare-NAME); as for run, a folder holding other "
                   "files needs --force")
    m.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a previous run's")
    m.add_argument("--cache", help="cache folder")
    m.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")

    s = sub.add_parser("search", help="search a space of recipes for the fastest model that keeps its accuracy "
                       "(Optuna; resumable)")
    s.add_argument("space", help="search space TOML: a recipe with ranges/choices and a [search] table")
    s.add_argument("--trials", type=int, help="number of trials (default [search] trials); counts finished ones "
                   "when resuming")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--out", help="output folder: search.db (Optuna study), search.json, front.md, front.png, "
                   "best.toml (default runs/search-NAME)")
    s.add_argument("--cache", help="cache folder (shared by every trial)")
    s.add_argument("--dry-run", action="store_true", help="validate the space and print its open values, then exit")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: trials one after another here; ray: builds spread over a Ray cluster, latency "
                   "measured one trial at a time on nodes of this machine's kind")
    s.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    s.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    s.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    s.add_argument("--json", action="store_true", help="print search.json (or, with --dry-run, the space) to stdout")

    e = sub.add_parser("export", help="write one folder that runs a run's compiled model on the device: the model, "
                       "manifest.json, run.py (needs only the target's runtime) and the report")
    e.add_argument("run_dir", metavar="RUN_DIR", help="folder a compress run wrote (its --out)")
    e.add_argument("--target", required=True, help="the target whose build to export (one that offers bundles: "
                   "onnxruntime, tvm)")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--variant", help="which model of the run (default: the compressed one)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    pr = sub.add_parser("profiles", help="list hardware profiles (built-in, this host, yours from "
                        "$COMPRESS_PROFILE_PATH)")
    pr.add_argument("--check", action="store_true", help="also let TVM judge each profile's target (imports TVM)")
    pr.add_argument("--json", action="store_true", help="print the profiles as JSON")
    t = sub.add_parser("targets", help="list targets and whether they can run here")
    t.add_argument("--check", action="store_true", help="import each runtime and ask for its devices (slower)")
    t.add_argument("--json", action="store_true", help="print the targets as JSON")
    pa = sub.add_parser("passes", help="list passes and their settings")
    pa.add_argument("--json", action="store_true", help="print the passes as JSON")
    m.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    e.add_argument("--json", action="store_true", help="print the bundle's manifest as JSON")
    from .generate_cmd import add_parser as add_generate

    add_generate(sub)
    _add_plugin_commands(sub)
    for sp in sub.choices.values():
        _global_flags(sp)
    return p


def _global_flags(sp: argparse.ArgumentParser) -> None:
    """--debug and -q work after the subcommand too (``compress check b.toml --debug``); SUPPRESS keeps a
    value given before the subcommand when the flag is not repeated after it."""
    have = sp._option_string_actions
    if "--debug" not in have:
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    if "-q" not in have:
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")


def _add_plugin_commands(sub: Any) -> None:
    """Commands the plugins register (``compress.registry.register_command``), from the manifest: listing
    them imports no plugin; running one imports its module."""
    from .registry import manifest

    for name, c in manifest().get("commands", {}).items():
        if name in sub.choices:
            continue  # a plugin cannot replace a built-in command
        from .registry import argparse_options

        cp = sub.add_parser(name, help=c["help"])
        for flags, opts in c["arguments"]:
            cp.add_argument(*flags, **argparse_options(opts))
        cp.set_defaults(_plugin=(c["module"], c["function"]))


def _shape(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--input-shape {s!r}: expected integers like 1,3,224,224") from None


# Which command-line option sets which recipe key, so a refused value is reported as typed.
_MODEL_FLAGS = {"source": "--model", "task": "--task", "weights": "--weights", "input_shape": "--input-shape",
                "train_epochs": "--train-epochs", "allow_unsafe_pt2": "--allow-unsafe-pt2"}


def _batches(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise RecipeError(f"--batch {text!r}: expected positive integers like 1,8") from None
    if not out:
        raise RecipeError(f"--batch {text!r}: expected positive integers like 1,8")
    return out


def _build_recipe(a: argparse.Namespace) -> Any:
    from .recipe import load_recipe, parse_pipeline, recipe_from_dict, revalidate

    if a.recipe:
        rec = load_recipe(a.recipe)
    elif a.model:
        rec = recipe_from_dict({"name": Path(a.model.split(":")[-1]).stem or "model", "model": {"source": a.model}},
                               where="command line")
    else:
        raise RecipeError("give a recipe file or --model (see compress run --help)")
    model_upd: dict[str, Any] = {}
    if a.model and a.recipe:
        model_upd["source"] = a.model
    if a.task:
        model_upd["task"] = a.task
    if a.weights:
        model_upd["weights"] = a.weights
    if a.input_shape:
        model_upd["input_shape"] = _shape(a.input_shape)
    if a.train_epochs is not None:
        model_upd["train_epochs"] = a.train_epochs
    if a.allow_unsafe_pt2:
        model_upd["allow_unsafe_pt2"] = True
    upd: dict[str, Any] = {}
    if model_upd:  # the same validation as a recipe's [model] table
        upd["model"] = revalidate(rec.model, model_upd, "command line", _MODEL_FLAGS)
    if a.data:
        upd["data"] = revalidate(rec.data, {"source": a.data}, "command line", {"source": "--data"})
    if a.profile:
        from .profiles import get_profile

        get_profile(a.profile)  # an unknown profile is a usage error now, before the heavy imports
        upd["profile"] = a.profile
    if a.pipeline:
        passes, targets = parse_pipeline(a.pipeline)
        upd["passes"], upd["targets"] = passes, targets or list(rec.targets)
    return rec.model_copy(update=upd) if upd else rec


def _cmd_run(a: argparse.Namespace) -> int:
    rec = _build_recipe(a)  # before the heavy imports: a bad recipe is reported in a fraction of a second
    if a.print_recipe:
        from .recipe import recipe_to_toml

        print(recipe_to_toml(rec), end="")
        return 0
    from .pipeline import run
    from .report import render_text
    quiet = a.quiet or a.json
    log, said = _logger(quiet)
    out = Path(a.out) if a.out else Path("runs") / rec.name
    _own_out(out, a.force)
    instruments = []
    if a.dump_ir:
        from .manager import DumpInstrument
        from .preflight import check_out_dir

        check_out_dir(Path(a.dump_ir), "--dump-ir")  # now, not after the first pass ran
        instruments.append(DumpInstrument(Path(a.dump_ir)))
    report = run(rec, out_dir=out, cache_dir=a.cache, progress=not quiet and sys.stderr.isatty(), log=log,
                 instruments=instruments)
    from .history import record_run

    kept = record_run(report, out)
    if kept is not None:
        log(f"figures appended to {kept} (compress history shows the trend)")
    if a.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(render_text(report, said=said))
        print(f"\nwrote {out}/report.json, {out}/report.md, {out}/report.html, {out}/pareto.png, {out}/latency.png")
    return 0


def _logger(quiet: bool) -> tuple[Any, set[str]]:
    """The progress log (stderr, one line per message, each message once) and the set of what it said, so the
    summary does not repeat a warning the user already saw."""
    said: set[str] = set()

    def log(m: str) -> None:
        if m in said:
            return
        said.add(m)
        if not quiet:
            print(f"· {m}", file=sys.stderr, flush=True)

    return log, (said if not quiet else set())


def _own_out(out: Path, force: bool) -> None:
    """--out has the same meaning for every command that writes a folder: a new or empty folder, or this
    command's own earlier output, is (re)written; a folder holding anything else needs --force (as export's)."""
    from .errors import InputError

    if force or not out.is_dir() or (out / "report.json").exists() or not any(out.iterdir()):
        return
    raise InputError(f"--out {out}: holds files that are not a compress run's (no report.json); choose a new or "
                     "empty folder, or pass --force to write into it")


def _writable_file(path: str, flag: str) -> None:
    """A file the command writes at the end: its folder must be writable now, not after measuring."""
    from .preflight import check_out_dir

    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"{flag} {p}: is a folder; give a file name")
    check_out_dir(p.parent if str(p.parent) else Path("."), flag=f"{flag} {p}: folder")


def _cmd_check(a: argparse.Namespace) -> int:
    for path, flag in ((a.junit, "--junit"), (a.json, "--json")):
        if path and path != "-":
            _writable_file(path, flag)
    from . import history
    from .budget import check, junit_xml

    drift_max = _percent(a.drift_max, "--drift-max") if a.drift_max is not None else None
    if a.drift is not None and a.drift < 1:
        raise RecipeError(f"--drift {a.drift}: give a number of commits, at least 1")
    if drift_max is not None and a.drift is None:
        raise RecipeError("--drift-max needs --drift N")
    store = history.store_path(Path(a.out) if a.out else Path("runs") / "check")
    log = (lambda m: None) if a.quiet else (lambda m: print(f"· {m}", file=sys.stderr, flush=True))
    res = check(a.budgets, baseline=a.baseline, update_baseline=a.update_baseline, out_dir=a.out,
                cache_dir=a.cache, fail_on_unavailable=a.fail_on_unavailable, log=log,
                progress=sys.stderr.isatty(), allow_skip=a.allow_skip)
    if a.drift is not None:
        if store is None:
            raise RecipeError(f"--drift needs the history, and ${history.ENV} turns it off")
        if not history.apply_drift(res, history.read(store)[0], a.drift, drift_max):
            print("drift: no budget to follow: --drift judges 'K x recorded' latency budgets, and every latency and "
                  "size budget with --drift-max PCT", file=sys.stderr)
        out = Path(a.out) if a.out else Path("runs") / "check"  # check() wrote these before drift was judged
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.json").write_text(json.dumps(res.to_json(), indent=2))
        (out / "junit.xml").write_text(junit_xml(res.verdicts, 0.0))
    history.record_check(res, store)
    if a.json == "-":
        print(json.dumps(res.to_json(), indent=2))
    else:
        print(res.summary())
    if a.junit:
        Path(a.junit).write_text(junit_xml(res.verdicts, res.seconds))
    if a.json and a.json != "-":
        Path(a.json).write_text(json.dumps(res.to_json(), indent=2))
    return res.exit_code


def _percent(text: str, flag: str) -> float:
    """"10%" or "0.1" as a fraction."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise RecipeError(f"{flag} {text!r}: give a percentage like 10% (or a fraction like 0.1)") from None
    if not 0 < v < 10:
        raise RecipeError(f"{flag} {text!r}: give a positive percentage like 10%")
    return v


def _cmd_history(a: argparse.Namespace) -> int:
    from . import history

    path = Path(a.store) if a.store else history.store_path()
    if path is None:
        raise RecipeError(f"${history.ENV} turns the history off; give the file: compress history PATH")
    if not path.exists():
        raise RecipeError(f"{path}: no history yet; every compress run and check appends to it")
    if a.last < 2:
        raise RecipeError(f"--last {a.last}: give at least 2")
    records, skipped = history.read(path)
    ss = history.series(records, figure=a.figure, machine=a.machine)
    print(f"history: {path} ({len(records)} records, {len({s.machine for s in ss})} machine(s))"
          + (f"; {skipped} unreadable line(s) skipped" if skipped else ""))
    if not ss:
        print("no figure matches" if a.figure or a.machine else "no figures recorded")
        return 0
    print(history.render_text(ss, a.last))
    if a.html:
        Path(a.html).write_text(history.render_html(ss, a.last), encoding="utf-8")
        print(f"wrote {a.html}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from .recipe import load_recipe, parse_pipeline, recipe_from_dict, revalidate
    from .registry import compare_precisions, get_target_config, targets

    src, more = a.model[0], a.model[1:]
    if more and not all(x.endswith(".onnx") for x in a.model):
        raise RecipeError("compare with several models takes .onnx files only, e.g. compress compare a.onnx b.onnx")
    if more and a.precision.strip() != "fp32":
        raise RecipeError("--precision applies to one model; with several .onnx files each is measured as it is")
    if src.endswith(".toml"):
        rec = load_recipe(src)
    else:
        if not (src.endswith(".onnx") or ":" in src):
            src = f"zoo:{src}"
        data = a.data or ("random" if src.endswith(".onnx") else "builtin:digits")
        model: dict[str, Any] = {"source": src, "train_epochs": a.train_epochs}
        if a.input_shape:
            model["input_shape"] = _shape(a.input_shape)
        rec = recipe_from_dict({"name": f"compare-{Path(src.split(':')[-1]).stem}", "model": model,
                                "data": {"source": data}}, where="command line")
    if a.targets:
        _, tcfgs = parse_pipeline("-> " + a.targets)
    else:
        tcfgs = [get_target_config(k)() for k in targets()]
    variants: dict[str, list[Any]] = {}
    offered = compare_precisions()  # the passes that offer a precision under a name (PassCaps.compare_precision)
    for prec in [p.strip() for p in a.precision.split(",") if p.strip()]:
        if prec != "fp32" and prec not in offered:
            raise RecipeError(f"--precision {prec!r}: choose from {', '.join(['fp32', *offered])}")
        if prec != "fp32":
            variants[prec] = [offered[prec].config_cls()]
    measure = revalidate(rec.measure, {"batch_sizes": _batches(a.batch), "min_runs": a.rounds,
                                       "min_time_s": a.min_time}, "command line",
                         {"batch_sizes": "--batch", "min_runs": "--rounds", "min_time_s": "--min-time"})
    rec = rec.model_copy(update={"targets": tcfgs, "measure": measure})
    from .pipeline import run
    from .report import render_text

    out = Path(a.out) if a.out else Path("runs") / rec.name
    _own_out(out, a.force)
    quiet = a.quiet or a.json
    log, said = _logger(quiet)
    extra = _extra_onnx(src, more, a.cache) if more else None
    report = run(rec, out_dir=out, cache_dir=a.cache, progress=not quiet and sys.stderr.isatty(), log=log,
                 variants=variants, extra_models=extra, baseline_label=Path(src).stem if more else None)
    if a.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        return 0
    print(render_text(report, compare=True, said=said))
    print(f"\nwrote {out}/report.json, {out}/report.md, {out}/report.html, {out}/pareto.png, {out}/latency.png")
    return 0


def _extra_onnx(first: str, files: list[str], cache_dir: str | None) -> dict[str, Any]:
    """The 2nd.. ONNX files of ``compress compare a.onnx b.onnx ...`` as artifacts, named by file stem."""
    from .cache import Cache
    from .models import load_model
    from .recipe import ModelSpec

    cache = Cache(Path(cache_dir) if cache_dir else None)
    root = load_model(ModelSpec(source=first), cache)
    out: dict[str, Any] = {}
    for f in files:
        art = load_model(ModelSpec(source=f), cache)
        if [s.shape[1:] for s in art.inputs] != [s.shape[1:] for s in root.inputs]:
            raise RecipeError(f"{f}: inputs {[list(s.shape) for s in art.inputs]} differ from {first}'s "
                              f"{[list(s.shape) for s in root.inputs]}; compare models that take the same input")
        name, i = Path(f).stem, 2
        while name in out or name == Path(first).stem or name in ("baseline", "recorded", "baseline~aa"):
            name, i = f"{Path(f).stem}-{i}", i + 1
        out[name] = art
    return out


def _cmd_passes(a: argparse.Namespace) -> int:
    from .registry import manifest

    # From the plugin manifest when it is current: listing needs no torch import (see registry).
    listed = manifest()["passes"]
    if a.json:
        print(json.dumps({"passes": {k: {"consumes": i["consumes"], "produces": i["produces"], "doc": i["doc"],
                                         "compare_precision": i.get("compare_precision"),
                                         "settings": [dict(zip(("name", "type", "default", "help"), f, strict=True))
                                                      for f in i["fields"]]}
                                     for k, i in listed.items()}}, indent=2))
        return 0
    for kind, info in listed.items():
        precision = info.get("compare_precision")
        offered = f"  [compress compare --precision {precision}]" if precision else ""
        print(f"{kind}  ({info['consumes']} -> {info['produces']})  {info['doc']}{offered}")
        _print_fields(info["fields"])
    return 0


def _print_fields(fields: list[list[str]]) -> None:
    for name, ann, default, desc in fields:
        print(f"    {name}: {ann}, {default}{'  ' + desc if desc else ''}")


def _module_missing(name: str) -> bool:
    """Whether an import name is absent, found without importing it. A folder with no module (type stubs
    alone install a 'tensorrt' folder of .pyi files) is absent too."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return True
    return spec is None or spec.origin in (None, "namespace")


def quick_unavailable(info: dict[str, Any]) -> str | None:
    """Why a target cannot run here, as far as its declared modules tell (``TargetCaps.requires``), without
    importing its runtime; None when they are installed (``unavailable_reason()`` is the full check)."""
    missing = [m for m in info.get("requires", []) if _module_missing(m)]
    if missing:
        nor = f" (nor {', '.join(missing[1:])})" if missing[1:] else ""
        return f"{missing[0]} is not installed{nor}; {info.get('install') or 'install it'}"
    return None


def _cmd_targets(a: argparse.Namespace) -> int:
    from .fingerprint import ARCH_ENV, ISA_ENV, cpu_info
    from .int8_scheme import choose_scheme
    from .registry import manifest

    cpu = cpu_info()
    listed = manifest()["targets"]  # settings and required modules, without importing any runtime
    states: dict[str, dict[str, Any]] = {}
    for kind, info in listed.items():
        reason = quick_unavailable(info)
        if reason is None and a.check:  # the full check: imports the runtime, asks for its devices
            from .registry import get_target_config, make_target

            reason = make_target(get_target_config(kind)()).unavailable_reason()
        states[kind] = {"available": reason is None, "reason": reason, "checked": "full" if a.check else "modules",
                        "settings": [dict(zip(("name", "type", "default", "help"), f, strict=True))
                                     for f in info["fields"]]}
    if a.json:
        print(json.dumps({"host": {"cpu": cpu["model"], "arch": cpu["arch"], "cores": cpu["affinity_cores"],
                                   "isa": cpu["isa"], "isa_forced": cpu["isa_forced"]},
                          "int8": choose_scheme("auto")[1], "targets": states}, indent=2))
        return 0
    forced = (f" (forced by {ISA_ENV}/{ARCH_ENV}; detected: {', '.join(cpu['isa_detected']) or 'none'})"
              if cpu["isa_forced"] else "")
    print(f"host: {cpu['model']} ({cpu['arch']}, {cpu['affinity_cores']} cores usable)")
    print(f"ISA:  {', '.join(cpu['isa']) or 'no optional extensions'}{forced}")
    print(f"INT8: {choose_scheme('auto')[1]}")
    print()
    for kind, st in states.items():
        state = ("available" if a.check else "installed") if st["available"] else f"unavailable: {st['reason']}"
        print(f"{kind:12s} {state}")
        _print_fields(listed[kind]["fields"])
    if not a.check:
        print("\n(installed: its modules are present; compress targets --check imports each runtime and asks "
              "for its devices)")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .bundle import export_bundle

    out = export_bundle(a.run_dir, a.target, a.out, variant=a.variant, force=a.force)
    import hashlib

    raw = (out / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    if a.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"wrote {out}: {manifest['variant']} on {a.target} ({manifest['precision']}, {manifest['model']}); on the "
          f"device: pip install '{manifest['runtime']['package']}=={manifest['runtime']['version']}' numpy, then "
          f"python {out}/run.py --expect-manifest-sha256 {hashlib.sha256(raw).hexdigest()} (the manifest's digest: "
          "keep it where the bundle's copy cannot change it)")
    return 0


def _cmd_profiles(a: argparse.Namespace) -> int:
    from .profiles import all_profiles

    found, errors = all_profiles()
    checks: dict[str, dict[str, str]] = {}
    if a.check:
        checks = {name: _check_profile_targets(p) for name, p in found.items()}
    if a.json:
        print(json.dumps({"profiles": {n: {**p.model_dump(mode="json"), **({"checks": checks[n]} if checks else {})}
                                       for n, p in found.items()}, "errors": errors}, indent=2))
    else:
        for name, p in found.items():
            spec = p.tvm_target_json()
            print(f"{name}  v{p.version}  ({p.source})  {p.description}")
            print(f"    arch {p.arch}; ISA {', '.join(p.isa) or 'none'}; cores {p.cores or 'as found'}, threads "
                  f"{p.threads or 'as found'}; INT8 {p.int8_scheme}; fast {', '.join(p.fast_precisions)}")
            print(f"    backends {', '.join(p.backends)}; tvm target "
                  f"{json.dumps(spec) if spec else 'this host (LLVM names its CPU)'}"
                  + (f"; GPU tag {p.tvm_gpu_tag}" if p.tvm_gpu_tag else "")
                  + "".join(f"; {kind}: {why}" for kind, why in checks.get(name, {}).items()))
            for note in p.notes:
                print(f"    note: {note}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 2
    return 1 if any(why != "ok" and not why.startswith("not checked") for c in checks.values()
                    for why in c.values()) else 0


def _check_profile_targets(p: Any) -> dict[str, str]:
    """Per target that takes settings from the profile (``TargetConfig.for_profile``): 'ok', 'not checked: why'
    (the target cannot run here), or its refusal of the profile's settings as one line."""
    from pydantic import ValidationError

    from .registry import make_target, targets

    out: dict[str, str] = {}
    for kind, (cfg_cls, _) in targets().items():
        base = cfg_cls()
        try:
            cfg = base.for_profile(p)
        except ValidationError as e:
            out[kind] = f"refused: {e.errors()[0]['msg']}"
            continue
        if cfg == base:
            continue  # nothing of the profile's for this target
        try:
            t = make_target(cfg)
            reason = t.unavailable_reason()
            if reason is not None:
                out[kind] = f"not checked: {reason}"
                continue
            t.check_config()  # the target's library judges the settings (TVM: the target JSON)
        except CompressError as e:
            out[kind] = str(e)
        else:
            out[kind] = "ok"
    return out


def _cmd_search(a: argparse.Namespace) -> int:
    from .search import load_space, run_search

    space = load_space(a.space)
    if a.trials is not None and a.trials < 1:
        raise RecipeError(f"--trials {a.trials}: give at least 1")
    if a.timeout is not None and a.timeout <= 0:
        raise RecipeError(f"--timeout {a.timeout}: give a positive number of seconds")
    if a.dry_run and a.json:
        print(json.dumps({"space": str(a.space), "objectives": list(space.search.objectives),
                          "params": [{"name": p.name, "kind": p.kind, "choices": list(p.choices or []) or None,
                                      "low": p.low, "high": p.high, "log": p.log} for p in space.params]},
                         indent=2, default=str))
        return 0
    if a.dry_run:
        print(f"{a.space}: {len(space.params)} open value(s); objectives {', '.join(space.search.objectives)}")
        for p in space.params:
            what = {"optional": "on/off", "choice": f"one of {list(p.choices)}",
                    "int": f"int in [{p.low}, {p.high}]",
                    "float": f"float in [{p.low}, {p.high}]" + (" (log)" if p.log else "")}[p.kind]
            print(f"  {p.name}: {what}")
        return 0
    out = Path(a.out) if a.out else Path("runs") / f"search-{Path(a.space).stem}"
    log = (lambda m: None) if (a.quiet or a.json) else (lambda m: print(f"· {m}", file=sys.stderr, flush=True))
    if a.workers < 1:
        raise RecipeError(f"--workers {a.workers}: give at least 1")
    if a.address and a.executor != "ray":
        raise RecipeError("--address needs --executor ray")
    res = run_search(space, out, cache_dir=a.cache, trials=a.trials, timeout_s=a.timeout, log=log,
                     executor=a.executor, address=a.address, workers=a.workers,
                     warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    if a.json:
        print((out / "search.json").read_text())
    else:
        print((out / "front.md").read_text())
    if res["best"] is None:
        print("no trial met every constraint; see search.json for each trial's figures", file=sys.stderr)
        return 1
    print(f"best: trial {res['best']}, written as a recipe to {res['best_recipe']} (compress run reproduces it)")
    return 0


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _one_line(msg: str, debug: bool) -> str:
    """An error as one line without terminal colour codes; --debug keeps every line."""
    msg = _ANSI.sub("", msg).strip()
    if debug:
        return msg
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "(no message)"
    return f"{lines[0]} (more with --debug)"


def _dispatch(a: argparse.Namespace) -> int:
    if a.cmd == "run":
        return _cmd_run(a)
    if a.cmd == "passes":
        return _cmd_passes(a)
    if a.cmd == "export":
        return _cmd_export(a)
    if a.cmd == "profiles":
        return _cmd_profiles(a)
    if a.cmd == "check":
        return _cmd_check(a)
    if a.cmd == "compare":
        return _cmd_compare(a)
    if a.cmd == "history":
        return _cmd_history(a)
    if a.cmd == "generate":
        from .generate_cmd import run as generate

        return generate(a)
    if getattr(a, "_plugin", None):
        import importlib

        module, function = a._plugin
        return int(getattr(importlib.import_module(module), function)(a))
    if a.cmd == "search":
        return _cmd_search(a)
    return _cmd_targets(a)


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    if not a.cmd:
        p.print_help()
        return 2
    if a.debug:
        import logging

        # Read by parts that keep a library's own console output out of the way unless asked (TVM tuning).
        logging.getLogger("compress").setLevel(logging.DEBUG)
    from .interrupts import EXIT_SIGTERM, Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return _dispatch(a)
    except CompressError as e:
        if a.debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(e), a.debug)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("terminated (SIGTERM): finished steps are cached; run the same command again to resume",
                  file=sys.stderr)
            return EXIT_SIGTERM
        print("interrupted: finished steps are cached; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as e:  # an unexpected bug: still one line unless --debug
        if a.debug:
            traceback.print_exc()
        else:
            print(f"error: unexpected {type(e).__name__}: {_one_line(str(e), False)} (rerun with --debug for the "
                  "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
