"""compress search: does a Ray cluster of two workers finish a training-bound search sooner than one,
and do its measurements agree with a local (no Ray) search?

The same space (digits CNN; channel pruning ratio 0.2-0.6, then distillation from the unpruned model
for 60-90 epochs in every trial, so training is most of a trial's time), the same seeded random
sampler and the same number of trials, run locally and with ``--executor ray`` on a local cluster of
one worker and of two, each from a cold cache. The model is trained 10 epochs once before the trials
of each run. On this machine's cores a one-worker cluster's build trains with all of them, a
two-worker cluster's builds with half each (``compress.apps.search.task_threads``). Reported: wall time of
each run and the Ray runs' ratio; how much of it was training (the root's and the trials' training
passes, summed over workers, / (wall time x workers)); other processes' CPU use during each run; each
trial's latency ratio with its interval from every run, the thread count it was timed with and the
other processes' load while it was timed; whether the intervals agree (overlap) across runs.

    python benchmarks/bench_search.py [--trials 8]

Writes benchmarks/results/search.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.apps.search import run_search  # noqa: E402
from compress.core.fingerprint import cpu_info  # noqa: E402

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
epochs = [60, 90]
patience = 0

[[targets]]
kind = "onnxruntime"
'''


class OthersLoad:
    """Other processes' CPU use (cores) over a run: the machine's busy time from /proc/stat minus this
    process's tree (the driver, Ray's raylet/GCS and its workers), sampled every second, because the
    Ray workers are gone by the end."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _busy() -> tuple[int, int, int]:
        vals = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
        return sum(vals), sum(vals) - vals[3] - vals[4], os.cpu_count() or 1

    @staticmethod
    def _tree() -> int:
        """utime + stime of this process and its descendants alive now (jiffies)."""
        procs = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                procs[int(d)] = (int(f[1]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))
        mine, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            p = frontier.pop()
            for pid, (ppid, _) in procs.items():
                if ppid == p and pid not in mine:
                    mine.add(pid)
                    frontier.append(pid)
        return sum(procs[p][1] for p in mine if p in procs)

    def _loop(self) -> None:
        prev = (*self._busy(), self._tree())
        while not self._stop.wait(1.0):
            now = (*self._busy(), self._tree())
            dt_total = max(now[0] - prev[0], 1)
            # Own time counts reaped children's times (cutime/cstime) too, so a worker that exits moves its
            # time to its parent in the tree and the sum stays continuous.
            own = max(0, now[3] - prev[3])
            self.samples.append(max(0.0, (now[1] - prev[1] - own) / (dt_total / now[2])))
            prev = now

    def __enter__(self) -> OthersLoad:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


def training(res: dict, workers: int, wall: float) -> tuple[float, float, str]:
    """Training seconds of a run (the root's and every trial's training passes), the fraction of the
    workers' time it was, and the thread counts the trials trained with."""
    secs = float((res.get("root_train") or {}).get("train_s") or 0.0)
    secs += sum(float(t["metrics"].get("train_s") or 0.0) for t in res["trials"])
    threads = [t["metrics"].get("train_threads") for t in res["trials"] if t["metrics"].get("train_threads")]
    counts = ", ".join(f"{n} thr x {threads.count(n)}" for n in sorted(set(threads)))
    return secs, secs / (wall * workers), counts or "?"


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
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--abba", action="store_true", help="run the Ray searches with 1, 2, 2, 1 workers (the "
                    "machine's load drifts; the ratio is then of the summed wall times)")
    a = ap.parse_args()
    runs = {"local": ("local", 1), "ray, 1 worker": ("ray", 1), "ray, 2 workers": ("ray", 2)}
    if a.abba:
        runs.update({"ray, 2 workers (2nd)": ("ray", 2), "ray, 1 worker (2nd)": ("ray", 1)})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.toml"
        space.write_text(SPACE.format(trials=a.trials))
        for i, (label, (executor, workers)) in enumerate(runs.items()):
            t0 = time.perf_counter()
            with OthersLoad() as load:
                res = run_search(space, Path(tmp) / f"out{i}", cache_dir=Path(tmp) / f"cache{i}", executor=executor,
                                 workers=workers, log=lambda m, t0=t0: print(
                                     f"[{time.perf_counter() - t0:5.0f} s] {m}", flush=True))
            rows[label] = (time.perf_counter() - t0, res, workers, load.mean())
    w1 = sum(r[0] for k, r in rows.items() if runs[k] == ("ray", 1))
    w2 = sum(r[0] for k, r in rows.items() if runs[k] == ("ray", 2))
    cpu = cpu_info()
    lines = [f"# compress search: Ray one worker vs two, and agreement with a local search ({dt.date.today()})",
             "",
             f"Machine: {cpu['model']}, {cpu['affinity_cores']} cores (shared with other work while this ran: "
             "the other processes' load is in the table). "
             f"{a.trials} trials, seeded random sampler, each search from a cold cache. What is trained: the "
             "digits CNN 10 epochs once before the trials of each run, then in every trial a channel pruning "
             "(ratio 0.2-0.6, no fine-tuning) and 60-90 epochs of distillation from the unpruned model on the "
             "digits train split. The Ray clusters are local, on this machine's cores: with one worker its "
             "builds train with every core that other processes leave free when the build starts "
             "(`compress.apps.search.training_threads`); with two, each build trains with one thread "
             "(`compress.apps.search.task_threads`), i.e. two cores for two workers. The root's training holds "
             "the whole node in both. Every trial is timed with 1 thread (`compress.apps.search.pin_threads`), "
             "one measurement at a time holding the node.",
             f"Command: `.venv/bin/python benchmarks/bench_search.py --trials {a.trials}{' --abba' * a.abba}` "
             "(runs in the order of the table).", "",
             "| run | wall time (s) | trials complete | training (s, summed over workers) | training threads "
             "per build | training / (wall x workers) | other processes' load (cores, mean) |",
             "|---|---|---|---|---|---|---|"]
    for label, (secs, res, workers, others) in rows.items():
        tr, frac, thr = training(res, workers, secs)
        lines.append(f"| {label} | {secs:.0f} | {sum(t['state'] == 'COMPLETE' for t in res['trials'])} | "
                     f"{tr:.0f} | {thr} | {frac:.0%} | {others:.2f} |")
    lines += ["", f"Two Ray workers / one, wall time{' (summed over both runs of each)' * a.abba}: **{w2 / w1:.2f}x**"
              + (f" (first pair {rows['ray, 2 workers'][0] / rows['ray, 1 worker'][0]:.2f}x, second pair "
                 f"{rows['ray, 2 workers (2nd)'][0] / rows['ray, 1 worker (2nd)'][0]:.2f}x)" if a.abba else "")
              + ".", "",
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
    lines += ["", "Each trial's training (s, the threads it trained with) and its time from start to told (s):", "",
              "| trial | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for ts in zip(*trials, strict=False):
        lines.append(f"| {ts[0]['number']} | " + " | ".join(
            f"{t['metrics'].get('train_s', 0):.0f} ({t['metrics'].get('train_threads', '?')} thr), "
            f"{t['metrics'].get('seconds', 0):.0f}" for t in ts) + " |")
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
