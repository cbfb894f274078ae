"""compress search: does a Ray cluster of two workers finish a training-bound search sooner than one?

The same space (digits CNN; distillation on or off with 2-6 epochs, channel pruning ratio; each
trial's training dominates its time), the same seeded random sampler and the same number of
trials, run with ``--executor ray`` on a local cluster of one worker and of two, each from a cold
cache. Reported: wall time of each search, their ratio, and each trial's latency ratio with its
interval from both runs (measurement is one trial at a time on this machine either way, so the
figures should agree within their intervals).

    python benchmarks/bench_search.py [--trials 6]

Writes benchmarks/results/search.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.fingerprint import cpu_info  # noqa: E402
from compress.search import run_search  # noqa: E402

SPACE = '''name = "bench-search"
model = {{ source = "zoo:digits-cnn", train_epochs = 10 }}
data = {{ source = "builtin:digits" }}
measure = {{ batch_sizes = [1], warmup = 5, min_runs = 100, min_time_s = 0.2 }}

[search]
trials = {trials}
sampler = "random"
seed = 0
objectives = ["latency_ratio", "accuracy_drop"]

[[passes]]
kind = "prune.channels"
ratio = [0.2, 0.6]
round_to = 4

[[passes]]
kind = "distill"
optional = true
epochs = [2, 6]
patience = 0

[[targets]]
kind = "onnxruntime"
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.toml"
        space.write_text(SPACE.format(trials=a.trials))
        for workers in (1, 2):
            t0 = time.perf_counter()
            res = run_search(space, Path(tmp) / f"out{workers}", cache_dir=Path(tmp) / f"cache{workers}",
                             executor="ray", workers=workers, log=lambda m: print(m, flush=True))
            rows[workers] = (time.perf_counter() - t0, res)
    w1, w2 = rows[1][0], rows[2][0]
    cpu = cpu_info()
    lines = [f"# compress search on Ray: one worker vs two ({dt.date.today()})", "",
             f"Machine: {cpu['model']}, {cpu['affinity_cores']} cores (shared with other work while this ran). "
             f"{a.trials} trials, seeded random sampler, each from a cold cache (the model is trained 10 epochs "
             "first in both runs).",
             f"Command: `.venv/bin/python benchmarks/bench_search.py --trials {a.trials}`", "",
             "| workers | wall time (s) | trials complete |", "|---|---|---|"]
    for w, (secs, res) in rows.items():
        lines.append(f"| {w} | {secs:.0f} | {sum(t['state'] == 'COMPLETE' for t in res['trials'])} |")
    lines += ["", f"Two workers / one worker, wall time: **{w2 / w1:.2f}x**.", "",
              "| trial | recipe | latency ratio, 1 worker | latency ratio, 2 workers |", "|---|---|---|---|"]
    for t1, t2 in zip(rows[1][1]["trials"], rows[2][1]["trials"], strict=False):
        def fmt(t: dict) -> str:
            m = t["metrics"]
            ci = m.get("latency_ratio_ci")
            return f"{m['latency_ratio']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else t["state"]
        lines.append(f"| {t1['number']} | `{t1['recipe']}` | {fmt(t1)} | {fmt(t2)} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "search.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
