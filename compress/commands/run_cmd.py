"""``compress run``: a recipe, or a one-line pipeline, from the command line to a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import RecipeError


def parse_shape(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--input-shape {s!r}: expected integers like 1,3,224,224") from None


# Which command-line option sets which recipe key, so a refused value is reported as typed.
_MODEL_FLAGS = {"source": "--model", "task": "--task", "weights": "--weights", "input_shape": "--input-shape",
                "train_epochs": "--train-epochs", "allow_unsafe_pt2": "--allow-unsafe-pt2"}


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise RecipeError(f"--batch {text!r}: expected positive integers like 1,8") from None
    if not out:
        raise RecipeError(f"--batch {text!r}: expected positive integers like 1,8")
    return out


def _build_recipe(a: argparse.Namespace) -> Any:
    from ..stages.recipe import load_recipe, parse_pipeline, recipe_from_dict, revalidate

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
        model_upd["input_shape"] = parse_shape(a.input_shape)
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
        from ..stages.profiles import get_profile

        get_profile(a.profile)  # an unknown profile is a usage error now, before the heavy imports
        upd["profile"] = a.profile
    if a.pipeline:
        passes, targets = parse_pipeline(a.pipeline)
        upd["passes"], upd["targets"] = passes, targets or list(rec.targets)
    return rec.model_copy(update=upd) if upd else rec


def cmd_run(a: argparse.Namespace) -> int:
    rec = _build_recipe(a)  # before the heavy imports: a bad recipe is reported in a fraction of a second
    if a.print_recipe:
        from ..stages.recipe import recipe_to_toml

        print(recipe_to_toml(rec), end="")
        return 0
    from ..reporting.report import render_text
    from ..stages.pipeline import run
    quiet = a.quiet or a.json
    log, said = progress_logger(quiet)
    out = Path(a.out) if a.out else Path("runs") / rec.name
    own_out(out, a.force)
    instruments = []
    if a.dump_ir:
        from ..core.manager import DumpInstrument
        from ..stages.preflight import check_out_dir

        check_out_dir(Path(a.dump_ir), "--dump-ir")  # now, not after the first pass ran
        instruments.append(DumpInstrument(Path(a.dump_ir)))
    report = run(rec, out_dir=out, cache_dir=a.cache, progress=not quiet and sys.stderr.isatty(), log=log,
                 instruments=instruments)
    from ..apps.history import record_run

    kept = record_run(report, out)
    if kept is not None:
        log(f"figures appended to {kept} (compress history shows the trend)")
    if a.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(render_text(report, said=said))
        print(f"\nwrote {out}/report.json, {out}/report.md, {out}/report.html, {out}/pareto.png, {out}/latency.png")
    return 0


def progress_logger(quiet: bool) -> tuple[Any, set[str]]:
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


def own_out(out: Path, force: bool) -> None:
    """--out has the same meaning for every command that writes a folder: a new or empty folder, or this
    command's own earlier output, is (re)written; a folder holding anything else needs --force (as export's)."""
    from ..errors import InputError

    if force or not out.is_dir() or (out / "report.json").exists() or not any(out.iterdir()):
        return
    raise InputError(f"--out {out}: holds files that are not a compress run's (no report.json); choose a new or "
                     "empty folder, or pass --force to write into it")


def writable_file(path: str, flag: str) -> None:
    """A file the command writes at the end: its folder must be writable now, not after measuring."""
    from ..stages.preflight import check_out_dir

    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"{flag} {p}: is a folder; give a file name")
    check_out_dir(p.parent if str(p.parent) else Path("."), flag=f"{flag} {p}: folder")
