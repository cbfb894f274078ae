"""``compress search``: validate a space, then search it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RecipeError


def cmd_search(a: argparse.Namespace) -> int:
    from ..apps.search import check_points, load_space, run_search

    space = load_space(a.space)
    if a.dry_run:  # the space's corner points against the model itself, as the search checks them before a trial
        check_points(space, a.cache)
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
