"""``compress compare``: every target (or several ONNX files) on one model, in one interleaved run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .run_cmd import own_out, parse_batches, parse_shape, progress_logger


def cmd_compare(a: argparse.Namespace) -> int:
    from ..core.registry import compare_precisions, get_target_config, targets
    from ..stages.recipe import load_recipe, parse_pipeline, recipe_from_dict, revalidate

    src, more = a.model[0], a.model[1:]
    if more and not all(x.endswith(".onnx") for x in a.model):
        raise RecipeError("compare with several models takes .onnx files only, e.g. compress compare a.onnx b.onnx")
    if more and a.precision.strip() != "fp32":
        raise RecipeError("--precision applies to one model; with several .onnx files each is measured as it is")
    if src.endswith(".toml"):
        if a.task:
            raise RecipeError("compare: --task goes with a model, not a recipe (set task in its [model] table)")
        rec = load_recipe(src)
    else:
        if not (src.endswith(".onnx") or ":" in src):
            src = f"zoo:{src}"
        lm = a.task == "causal-lm"
        data = a.data or ("random" if src.endswith(".onnx") else "builtin:pydoc-topics" if lm else "builtin:digits")
        model: dict[str, Any] = {"source": src, "train_epochs": a.train_epochs}
        if a.task:
            model["task"] = a.task
        if a.input_shape:
            model["input_shape"] = parse_shape(a.input_shape)
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
    # A causal LM is timed by generation rounds (measure.lm_rounds), not by forward-pass runs.
    rounds = "lm_rounds" if rec.model.task == "causal-lm" else "min_runs"
    upd: dict[str, Any] = {"batch_sizes": parse_batches(a.batch), "min_time_s": a.min_time}
    if a.rounds is not None or rounds == "min_runs":
        upd[rounds] = 20 if a.rounds is None else a.rounds
    measure = revalidate(rec.measure, upd, "command line",
                         {"batch_sizes": "--batch", rounds: "--rounds", "min_time_s": "--min-time"})
    rec = rec.model_copy(update={"targets": tcfgs, "measure": measure})
    from ..reporting.report import render_text
    from ..stages.pipeline import run

    out = Path(a.out) if a.out else Path("runs") / rec.name
    own_out(out, a.force)
    quiet = a.quiet or a.json
    log, said = progress_logger(quiet)
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
    from ..core.cache import Cache
    from ..inputs.models import load_model
    from ..stages.recipe import ModelSpec

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
