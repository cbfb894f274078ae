"""Run the benchmark suite and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py                 # every benchmarks/bench_*.py, then RESULTS.md
    python benchmarks/run_all.py --only suite    # one benchmark (bench_suite.py), then RESULTS.md
    python benchmarks/run_all.py --collect       # only rebuild RESULTS.md from benchmarks/results/*.md

Each bench_<topic>.py measures ratios against a baseline in the same run and writes
benchmarks/results/<topic>.md (figures, command, date, machine fingerprint). This
script runs them one after another (never in parallel: they would disturb each
other's timings) and gathers their results into one file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["suite", "prune", "quantize", "distill", "tvm", "compat"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="run only these topics (repeatable)")
    ap.add_argument("--collect", action="store_true", help="do not run anything; rebuild RESULTS.md")
    a = ap.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"), key=lambda p: (ORDER.index(p.stem[6:]) if p.stem[6:] in ORDER else 99,
                                                             p.stem))
    if a.only:
        scripts = [s for s in scripts if s.stem[6:] in a.only]
    failed = []
    if not a.collect:
        for s in scripts:
            print(f"== {s.name}", flush=True)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, str(s)], cwd=HERE.parent)
            print(f"== {s.name}: exit {r.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
            if r.returncode != 0:
                failed.append(s.name)
    collect()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def collect() -> None:
    sys.path.insert(0, str(HERE.parent))
    from compress.core.fingerprint import machine_fingerprint

    parts = sorted((HERE / "results").glob("*.md"),
                   key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    lines = [
        "# Benchmark results",
        "",
        f"Collected {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} by `python benchmarks/run_all.py`. "
        "Each section below was written by its own script, with the command that produced it, the date of "
        "the run and the machine it ran on. Headline figures are ratios measured in the same run "
        "(interleaved), because the machines here are shared and noisy.",
        "",
        "Machine that collected this file:",
        "",
        "```json",
        json.dumps(machine_fingerprint(), indent=2),
        "```",
        "",
    ]
    lines += ["## Against the goals", "",
              "Quoted from the sections below (each written by its benchmark run):", ""]
    for p in parts:
        found = headline_lines(p.read_text())
        if found:
            lines += [f"- **{p.stem}**:", *[f"  - {h}" for h in found]]
    lines.append("")
    for p in parts:
        text = p.read_text().strip()
        # Demote headings by one level so every section nests under this page's title.
        lines += [("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines()]
        lines.append("")
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'} from {len(parts)} result files")


def headline_lines(text: str) -> list[str]:
    """The paragraphs of a result file that state a headline or a goal verdict, with the bullets under them."""
    out: list[str] = []
    current: list[str] | None = None
    bullet = False
    for ln in [*text.splitlines(), ""]:
        s = ln.strip()
        starts = s.startswith(("Headline", "Goal", "**Goal")) or "within the 1-point goal" in s
        if starts:
            if current:
                out.append(" ".join(current))
            current, bullet = [s.replace("**", "")], False
        elif current is not None and s.startswith("- "):
            out.append(" ".join(current))
            current, bullet = [s[2:]], True
        elif current is not None and not s and bullet:
            out.append(" ".join(current))  # a list ends at a blank line
            current, bullet = None, False
        elif current is not None and s and not s.startswith(("#", "|")):
            current.append(s.replace("**", ""))
        elif current is not None and not s:
            continue  # a blank line may separate a goal from its bullets
        elif current is not None:
            out.append(" ".join(current))
            current = None
    if current:
        out.append(" ".join(current))
    return out


if __name__ == "__main__":
    sys.exit(main())
