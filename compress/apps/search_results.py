"""The results of a search: ``search.json``, ``front.md``, ``front.png`` and ``best.toml`` from its study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..stages.recipe import recipe_to_toml
from .search_space import TIMED, SearchSpec, Space
from .search_study import INTERRUPTED, _final_best, _front, _values
from .search_trials import pooled_ci, session_spread


def write_results(study: Any, sp: Space, out: Path, target: str) -> dict[str, Any]:
    spec = sp.search
    spread, draws = session_spread(study.trials)
    rt = study.user_attrs.get("retimed") or {}
    trials = []
    for t in study.trials:
        metrics = {k: v for k, v in t.user_attrs.items()
                   if k not in ("recipe", "error", "pruned", INTERRUPTED, "retry_of", "repeat_of")}
        if "latency_ratio_ci" in metrics:  # the run's own interval stays beside the pooled one
            metrics["latency_ratio_ci_own"] = metrics["latency_ratio_ci"]
            metrics["latency_ratio_ci"] = pooled_ci(t.user_attrs, spread)
        metrics.update({f"retimed_{k}": v for k, v in rt.get(str(t.number), {}).items()})
        trials.append({"number": t.number, "state": "INTERRUPTED" if INTERRUPTED in t.user_attrs else t.state.name,
                       "retry_of": t.user_attrs.get("retry_of"), "repeat_of": t.user_attrs.get("repeat_of"),
                       "params": t.params,
                       "recipe": t.user_attrs.get("recipe"), "error": t.user_attrs.get("error"),
                       "pruned": t.user_attrs.get("pruned"), "metrics": metrics, "values": t.values})
    front = sorted(_front(study), key=lambda t: tuple(t.values))
    best = _final_best(study, spec)
    result = {"schema": "compress.search/v1", "space": sp.source, "target": target, "batch": spec.batch,
              "objectives": spec.objectives, "constraints": spec.constraints, "sampler": spec.sampler,
              "trials": trials, "front": [t.number for t in front],
              "best": None if best is None else best.number, "storage": str(out / "search.db"),
              "session_spread": {"log_rms": round(spread, 6), "draws": draws,
                                 "note": "latency_ratio_ci is widened by this pooled between-session spread "
                                         "(latency_ratio_ci_own: by the trial's own one-draw A/A offset)"},
              "retimed": {"trials": sorted(int(n) for n in rt), "run": str(out / "front-retimed")} if rt else None}
    if best is not None:
        rec = sp.recipe(_values(sp, best), name=f"{Path(sp.source).stem}-best")
        (out / "best.toml").write_text(f"# best feasible trial ({best.number}) of {sp.source}; "
                                       f"objectives {', '.join(spec.objectives)}\n" + recipe_to_toml(rec))
        result["best_recipe"] = str(out / "best.toml")
    (out / "search.json").write_text(json.dumps(result, indent=1, default=str))
    timed = _timed_objective(spec)
    lines = [f"# Search: {sp.source}", "", f"Target {target}, batch {spec.batch}; objectives "
             f"{', '.join(spec.objectives)} (minimized); constraints "
             f"{', '.join(f'{k} {v}' for k, v in spec.constraints.items()) or 'none'}.", "",
             "| trial | " + " | ".join(spec.objectives)
             + f" | {timed.replace('_', ' ')} 95% CI | re-timed together [95%] | recipe |",
             "|---|" + "---|" * len(spec.objectives) + "---|---|---|"]
    for t in front:
        ci = _ci(t.user_attrs, timed, spread)
        again = rt.get(str(t.number)) or {}
        ci2 = again.get(TIMED[timed])
        lines.append(f"| {t.number}{' (best)' if best is not None and t.number == best.number else ''} | "
                     + " | ".join(f"{v:.4g}" for v in t.values)
                     + f" | {'-' if not ci else f'[{ci[0]:.3f}, {ci[1]:.3f}]'} | "
                     + (f"{again[timed]:.4g} [{ci2[0]:.3f}, {ci2[1]:.3f}]" if timed in again and ci2 else "-")
                     + f" | `{t.user_attrs.get('recipe')}` |")
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    if pruned:
        lines += ["", "Pruned trials (ruled out by their untrained probe, never trained):"] + [
            f"- trial {t['number']}: {t['pruned']}" for t in pruned]
    failed = [t for t in trials if t["state"] in ("FAIL", "INTERRUPTED")]
    if failed:
        lines += ["", "Failed trials:"] + [f"- trial {t['number']}: {t['error']}" for t in failed]
    (out / "front.md").write_text("\n".join(lines) + "\n")
    _plot(study, spec, front, out / "front.png")
    _plot_svg(study, sp, front, spread, out / "front.svg")
    return result


def _timed_objective(spec: SearchSpec) -> str:
    """The timed ratio whose interval the front's table shows: the first timed objective, else latency_ratio."""
    return next((o for o in spec.objectives if o in TIMED and o != "p50_ms"), "latency_ratio")


def _ci(attrs: dict[str, Any], key: str, spread: float) -> list[float] | None:
    """A trial's 95% interval of a timed metric (latency_ratio's widened by the pooled session spread)."""
    return pooled_ci(attrs, spread) if key == "latency_ratio" else attrs.get(TIMED[key])


def _plot_svg(study: Any, sp: Space, front: list[Any], spread: float, path: Path) -> None:
    """The front as an SVG (compress.reporting.svg_plot, as report.html draws its plots): the first two objectives,
    every finished trial a point, a timed objective's 95% interval as bars, the Pareto front joined."""
    from ..reporting.svg_plot import Axis, Point, padded, scatter

    spec = sp.search
    if len(spec.objectives) < 2:
        return
    (xo, yo), done = spec.objectives[:2], [t for t in study.trials if t.state.name == "COMPLETE"]
    pts = []
    for t in sorted(done, key=lambda t: t.values[0]):
        ci = _ci(t.user_attrs, xo, spread) if xo in TIMED else None
        pts.append(Point(t.values[0], t.values[1], ci[0] if ci else None, ci[1] if ci else None,
                         label=f"trial {t.number}", series="front" if t in front else "trials",
                         title=str(t.user_attrs.get("recipe", ""))))
    if not pts:
        return
    xs = [v for p in pts for v in (p.x, p.x_low, p.x_high) if v is not None]
    ys = [p.y for p in pts]
    ax = Axis(*padded(min(xs), max(xs), False), label=f"{xo} (lower is better)")
    ay = Axis(*padded(min(ys), max(ys), False), label=f"{yo} (lower is better)")
    idx = [i for i, p in enumerate(pts) if p.series == "front"]
    path.write_text(scatter(pts, ax, ay, f"{Path(sp.source).stem}: search trials and their Pareto front", idx))


def _plot(study: Any, spec: SearchSpec, front: list[Any], path: Path) -> None:
    if len(spec.objectives) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [t.values[0] for t in done]
    ys = [t.values[1] for t in done]
    ax.scatter(xs, ys, c="#bbbbbb", label="trials")
    f = sorted(front, key=lambda t: t.values[0])
    ax.plot([t.values[0] for t in f], [t.values[1] for t in f], "o-", c="#d62728", label="Pareto front")
    for t in f:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(spec.objectives[0])
    ax.set_ylabel(spec.objectives[1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
