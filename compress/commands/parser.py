"""The command line's parser: every command's flags, in one place per command."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress", description="Compress PyTorch models, lower to ONNX, compile per "
                                "target and measure accuracy against latency.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    from .. import __version__

    p.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    for add in (_add_run, _add_check, _add_history, _add_compare, _add_search, _add_export, _add_listings):
        add(sub)
    from .generate_cmd import add_parser as add_generate

    add_generate(sub)
    _add_plugin_commands(sub)
    for sp in sub.choices.values():
        _global_flags(sp)
    return p




def _add_run(sub: Any) -> None:
    """compress run: a recipe or a one-line pipeline."""
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


def _add_check(sub: Any) -> None:
    """compress check: the CI gate."""
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


def _add_history(sub: Any) -> None:
    """compress history: each figure's trend."""
    h = sub.add_parser("history", help="the trend of each figure per machine across commits, change points marked "
                       "(every run and check appends to runs/history.jsonl; docs/history.md)")
    h.add_argument("store", nargs="?", help="history file (default $COMPRESS_HISTORY or runs/history.jsonl)")
    h.add_argument("--figure", help="only figures whose name contains this, e.g. p50@1 or onnxruntime")
    h.add_argument("--machine", help="only this machine (a prefix of its fingerprint)")
    h.add_argument("--last", type=int, default=40, help="points per figure (default 40)")
    h.add_argument("--html", metavar="PATH", help="also draw the trends into a self-contained HTML page")


def _add_compare(sub: Any) -> None:
    """compress compare: targets (or ONNX files) side by side."""
    m = sub.add_parser("compare", help="every available target on one model, or several ONNX files on one "
                       "target, in one interleaved run")
    m.add_argument("model", nargs="+", help="zoo name (resnet18 or zoo:resnet18), a recipe .toml, or .onnx "
                   "file(s); several .onnx files are timed interleaved against the first, with accuracy on "
                   "the same --data")
    m.add_argument("--targets", help="targets to compare, text form (default: all), "
                   'e.g. "onnxruntime,tvm{tuning_trials=64}"')
    m.add_argument("--precision", default="fp32",
                   help="comma list of fp32, int8, int8-nncf, int8-dynamic, int8-weights-nncf, int4-weights, "
                   "fp16 (default fp32)")
    m.add_argument("--task", help="what a Hugging Face model (hf:DIR) does, as for run: causal-lm compares "
                   "generation (perplexity, time to first token, decode tokens/s) on every target that generates")
    m.add_argument("--data", help="data source (default builtin:digits for zoo models, builtin:pydoc-topics "
                   "for --task causal-lm, none for .onnx)")
    m.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8")
    m.add_argument("--rounds", type=int, help="minimum interleaved timing rounds (default 20; for --task causal-lm "
                   "the generation rounds, default 5)")
    m.add_argument("--min-time", type=float, default=1.0, help="minimum seconds of timed runs per candidate")
    m.add_argument("--input-shape", help="model input shape, e.g. 1,3,224,224")
    m.add_argument("--train-epochs", type=int, default=0, help="train a zoo model on the data first (cached)")
    m.add_argument("--out", help="output folder (default runs/compare-NAME); as for run, a folder holding other "
                   "files needs --force")
    m.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a previous run's")
    m.add_argument("--cache", help="cache folder")
    m.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    m.add_argument("--json", action="store_true", help="print the report JSON instead of the table")


def _add_search(sub: Any) -> None:
    """compress search: a space of recipes."""
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


def _add_export(sub: Any) -> None:
    """compress export: a bundle for the device."""
    e = sub.add_parser("export", help="write one folder that runs a run's compiled model on the device: the model, "
                       "manifest.json, run.py (needs only the target's runtime) and the report")
    e.add_argument("run_dir", metavar="RUN_DIR", help="folder a compress run wrote (its --out)")
    e.add_argument("--target", required=True, help="the target whose build to export (one that offers bundles: "
                   "onnxruntime, tvm)")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--variant", help="which model of the run (default: the compressed one)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    e.add_argument("--json", action="store_true", help="print the bundle's manifest as JSON")


def _add_listings(sub: Any) -> None:
    """compress profiles, targets, passes: what is here."""
    pr = sub.add_parser("profiles", help="list hardware profiles (built-in, this host, yours from "
                        "$COMPRESS_PROFILE_PATH)")
    pr.add_argument("--check", action="store_true", help="also let TVM judge each profile's target (imports TVM)")
    pr.add_argument("--json", action="store_true", help="print the profiles as JSON")
    t = sub.add_parser("targets", help="list targets and whether they can run here")
    t.add_argument("--check", action="store_true", help="import each runtime and ask for its devices (slower)")
    t.add_argument("--json", action="store_true", help="print the targets as JSON")
    pa = sub.add_parser("passes", help="list passes and their settings")
    pa.add_argument("--json", action="store_true", help="print the passes as JSON")


def _global_flags(sp: argparse.ArgumentParser) -> None:
    """--debug and -q work after the subcommand too (``compress check b.toml --debug``); SUPPRESS keeps a
    value given before the subcommand when the flag is not repeated after it."""
    have = sp._option_string_actions
    if "--debug" not in have:
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    if "-q" not in have:
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")


def _add_plugin_commands(sub: Any) -> None:
    """Commands the plugins register (``compress.core.registry.register_command``), from the manifest: listing
    them imports no plugin; running one imports its module."""
    from ..core.registry import manifest

    for name, c in manifest().get("commands", {}).items():
        if name in sub.choices:
            continue  # a plugin cannot replace a built-in command
        from ..core.registry import argparse_options

        cp = sub.add_parser(name, help=c["help"])
        for flags, opts in c["arguments"]:
            cp.add_argument(*flags, **argparse_options(opts))
        cp.set_defaults(_plugin=(c["module"], c["function"]))
