"""compress search: does a Ray cluster of two workers finish a training-bound search sooner than one,
and do its measurements agree with a local (no Ray) search?

The same space (digits CNN; distillation on or off with 2-6 epochs, channel pruning ratio; each
trial's training dominates its time), the same seeded random sampler and the same number of
trials, run locally and with ``--executor ray`` on a local cluster of one worker and of two, each
from a cold cache. Reported: wall time of each Ray search and their ratio; each trial's latency
ratio with its interval from every run, the thread count it was timed with and the other
processes' load while it was timed; whether the intervals agree (overlap) across runs.

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


def fmt(t: dict) -> str:
    m = t["metrics"]
    ci = m.get("latency_ratio_ci")
    if not ci:
        return t["state"]
    return (f"{m['latency_ratio']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({m.get('threads')} thr, "
            f"others {m.get('others_cores', '?')} cores)")


def overlap(a: dict, b: dict) -> bool | None:
    ca, cb = a["metrics"].get("latency_ratio_ci"), b["metrics"].get("latency_ratio_ci")
    if not ca or not cb:
        return None
    return ca[0] <= cb[1] and cb[0] <= ca[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    a = ap.parse_args()
    runs = {"local": ("local", 1), "ray, 1 worker": ("ray", 1), "ray, 2 workers": ("ray", 2)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.toml"
        space.write_text(SPACE.format(trials=a.trials))
        for i, (label, (executor, workers)) in enumerate(runs.items()):
            t0 = time.perf_counter()
            res = run_search(space, Path(tmp) / f"out{i}", cache_dir=Path(tmp) / f"cache{i}", executor=executor,
                             workers=workers, log=lambda m: print(m, flush=True))
            rows[label] = (time.perf_counter() - t0, res)
    w1, w2 = rows["ray, 1 worker"][0], rows["ray, 2 workers"][0]
    cpu = cpu_info()
    lines = [f"# compress search: Ray one worker vs two, and agreement with a local search ({dt.date.today()})",
             "",
             f"Machine: {cpu['model']}, {cpu['affinity_cores']} cores (shared with other work while this ran). "
             f"{a.trials} trials, seeded random sampler, each search from a cold cache (the model is trained 10 "
             "epochs first in every run). Every trial is timed with 1 thread (the search pins it, see "
             "`compress.search.pin_threads`).",
             f"Command: `.venv/bin/python benchmarks/bench_search.py --trials {a.trials}`", "",
             "| run | wall time (s) | trials complete |", "|---|---|---|"]
    for label, (secs, res) in rows.items():
        lines.append(f"| {label} | {secs:.0f} | {sum(t['state'] == 'COMPLETE' for t in res['trials'])} |")
    lines += ["", f"Two Ray workers / one, wall time: **{w2 / w1:.2f}x**.", "",
              "| trial | recipe | " + " | ".join(f"latency ratio, {k}" for k in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    trials = [r[1]["trials"] for r in rows.values()]
    agree = {k: 0 for k in list(runs)[1:]}
    pairs = 0
    for ts in zip(*trials, strict=False):
        lines.append(f"| {ts[0]['number']} | `{ts[0]['recipe']}` | " + " | ".join(fmt(t) for t in ts) + " |")
        if all(overlap(ts[0], t) is not None for t in ts[1:]):
            pairs += 1
            for k, t in zip(list(runs)[1:], ts[1:], strict=True):
                agree[k] += bool(overlap(ts[0], t))
    ray12 = sum(bool(overlap(t1, t2)) for t1, t2 in zip(trials[1], trials[2], strict=False))
    lines += ["", "Agreement with the local search (95% intervals overlap): "
              + "; ".join(f"{k}: {n} of {pairs} trials" for k, n in agree.items())
              + f". Ray 1 worker vs 2 workers: {ray12} of {min(len(trials[1]), len(trials[2]))} trials.", "",
              f"Goal (issue 19): two Ray workers {'finish in less' if w2 < w1 else 'do not finish in less'} wall "
              f"time than one ({w2 / w1:.2f}x); the distributed run's intervals "
              + ("agree with" if all(n == pairs for n in agree.values()) else "do not all agree with")
              + " the local run's (" + "; ".join(f"{k}: {n} of {pairs}" for k, n in agree.items()) + ")."]
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "search.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
