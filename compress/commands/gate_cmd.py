"""``compress check`` (the CI gate) and ``compress history`` (its trend across commits)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RecipeError
from .run_cmd import writable_file


def cmd_check(a: argparse.Namespace) -> int:
    for path, flag in ((a.junit, "--junit"), (a.json, "--json")):
        if path and path != "-":
            writable_file(path, flag)
    from ..apps import history
    from ..apps.budget import check, junit_xml

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


def cmd_history(a: argparse.Namespace) -> int:
    from ..apps import history

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
