"""Distillation vs plain fine-tuning after channel pruning, on the digits CNN.

Arms, all measured in this one run:
  original     digits-cnn trained with compress.inputs.training.fit
  pruned       prune.channels to ~1/4 of the MACs, no recovery
  fine-tuned   pruned + compress.inputs.training.fit for N epochs (cross-entropy, AdamW + cosine)
  distilled    pruned + the distill pass for the same N epochs (teacher = original)

Selection and measurement use different samples: the pass picks its best epoch on
``select`` (part of the validation split); every reported top-1 is on ``test``
(the rest of the validation split plus the calibration split), which no arm
trains or selects on. A test split of digits holds ~430 images (1 image = 0.23
points), so the whole comparison is repeated over several data splits (each
with its own original and pruned model) and several training seeds, and the
differences are reported paired (same split, same seed, same pruned start).
Data split 1 was used to choose the recovery learning rate and is left out of
the default splits.

Run: .venv/bin/python benchmarks/bench_distill.py [--epochs N] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.passes.distill import Distill  # noqa: E402

from compress.api import module_artifact  # noqa: E402
from compress.core.cache import Cache  # noqa: E402
from compress.core.fingerprint import machine_fingerprint  # noqa: E402
from compress.core.manager import PassContext, PassManager  # noqa: E402
from compress.core.registry import passes  # noqa: E402
from compress.inputs.data import DataBundle, Split, load_data  # noqa: E402
from compress.inputs.models import load_model  # noqa: E402
from compress.inputs.torch_io import clone_module, load_torch, torch_artifact  # noqa: E402
from compress.inputs.training import fit, predict  # noqa: E402
from compress.stages.recipe import DataSpec, ModelSpec  # noqa: E402

SHAPE = (1, 1, 8, 8)


def split_data(seed: int = 0) -> tuple[DataBundle, Split]:
    """Train / select / test from builtin:digits (val_fraction 0.25, calib 0.1)."""
    d = load_data(DataSpec(source="builtin:digits", val_fraction=0.25, calib_fraction=0.1, seed=seed), SHAPE)
    assert d is not None and d.val.y is not None and d.calib.y is not None
    n_sel = 200
    select = Split(d.val.x[:n_sel], d.val.y[:n_sel])
    test = Split(np.concatenate([d.val.x[n_sel:], d.calib.x]), np.concatenate([d.val.y[n_sel:], d.calib.y]))
    bundle = DataBundle(d.name, d.train, d.calib, select, True, d.digest + ":select", d.sample_shape, d.input_shape)
    return bundle, test


def top1(model: torch.nn.Module, data: DataBundle, split: Split) -> float:
    return float((predict(model, data, split).argmax(1) == split.y).mean())


def prune(teacher_art, data: DataBundle, ctx: PassContext, macs_target: float):  # type: ignore[no-untyped-def]
    if "prune.channels" in passes():
        cfg = passes()["prune.channels"].config_cls(macs_target=macs_target)
        out, _ = PassManager([cfg]).run(teacher_art, ctx)
        meta = out.metadata["prune.channels"]
        return out, meta["macs_before"], meta["macs_after"], f"prune.channels{{macs_target={macs_target:g}}}"
    import torch_pruning as tp  # fallback when the pass is absent: the same library directly

    m = clone_module(teacher_art)
    ex = torch.randn(*SHAPE)
    macs0, _ = tp.utils.count_ops_and_params(m, ex)
    pr = tp.pruner.MetaPruner(m, ex, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                              ignored_layers=[m.classifier])
    pr.step()
    macs1, _ = tp.utils.count_ops_and_params(m, ex)
    return module_artifact(m, SHAPE, ctx.cache), int(macs0), int(macs1), "torch-pruning MetaPruner ratio 0.5 (L2)"


def run_split(split: int, args: argparse.Namespace, root_cache: Path) -> tuple[dict, list[dict]]:
    data, test = split_data(split)
    cache = Cache(root_cache / f"split{split}")
    root = load_model(ModelSpec(source="zoo:digits-cnn"), cache)
    ctx = PassContext(cache=cache, data=data, seed=0, progress=False, original=root)
    model = copy.deepcopy(load_torch(root))
    t0 = time.perf_counter()
    fit(model, data, args.train_epochs, lr=args.train_lr, seed=0)
    t_train = time.perf_counter() - t0
    teacher = torch_artifact(model, root, ctx)
    ctx.original = teacher
    pruned_art, macs0, macs1, how = prune(teacher, data, ctx, args.macs_target)
    head = {"split": split, "original_test": top1(model, data, test),
            "pruned_test": top1(load_torch(pruned_art), data, test),
            "macs_before": macs0, "macs_after": macs1, "how": how, "train_s": t_train, "n_train": len(data.train),
            "n_select": len(data.val), "n_test": len(test)}
    print(json.dumps(head), flush=True)
    rows = []
    for n_ep in args.epochs:
        for seed in args.seeds:
            ft = clone_module(pruned_art)
            t0 = time.perf_counter()
            fit(ft, data, n_ep, lr=args.lr, seed=seed)
            row: dict = {"split": split, "epochs": n_ep, "seed": seed, "finetune_test": top1(ft, data, test),
                         "finetune_s": time.perf_counter() - t0}
            for arm, labels in (("distill", "auto"), ("distill_nolabels", "ignore")):
                # A cache per run: the manager's cache key does not include ctx.seed, so seeds would share entries.
                dctx = PassContext(cache=Cache(cache.root / f"{arm}-{n_ep}-{seed}"), data=data, seed=seed,
                                   progress=False, original=teacher)
                t0 = time.perf_counter()
                cfg = Distill(epochs=n_ep, lr=args.lr, patience=0, labels=labels)
                out, _ = PassManager([cfg]).run(pruned_art, dctx)
                row[f"{arm}_s"] = time.perf_counter() - t0
                row[f"{arm}_test"] = top1(load_torch(out), data, test)
                row[f"{arm}_best_epoch"] = out.metadata["distill"]["best_epoch"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return head, rows


ARMS = ("finetune", "distill", "distill_nolabels")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 2, 3, 4, 5], help="data split seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recovery training seeds")
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 10],
                    help="recovery budgets N (epochs) for fine-tuning and distillation; the largest is the headline")
    ap.add_argument("--train-epochs", type=int, default=20)
    ap.add_argument("--train-lr", type=float, default=3e-3)
    ap.add_argument("--lr", type=float, default=1e-2, help="recovery learning rate, the same for every arm")
    ap.add_argument("--macs-target", type=float, default=0.25)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.md"))
    args = ap.parse_args()
    # One intra-op thread: tiny models gain nothing from two, and on a shared 2-core machine two threads
    # contending with another process ran ~15x slower here.
    torch.set_num_threads(1)
    cmd = " ".join(["cd /work/main && .venv/bin/python benchmarks/bench_distill.py", *sys.argv[1:]])
    t_all = time.perf_counter()
    root_cache = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    heads, rows = [], []
    for split in args.splits:
        h, r = run_split(split, args, root_cache)
        heads.append(h)
        rows += r

    orig = statistics.mean(h["original_test"] for h in heads)
    per_budget: dict[int, dict] = {}
    for n_ep in args.epochs:
        rs = [r for r in rows if r["epochs"] == n_ep]
        b: dict = {k: statistics.mean(r[f"{k}_test"] for r in rs) for k in ARMS}
        b.update({f"{k}_sd": statistics.pstdev(r[f"{k}_test"] for r in rs) for k in ARMS})
        diffs = [r["distill_test"] - r["finetune_test"] for r in rs]
        b["paired_diff"] = statistics.mean(diffs)
        b["paired_diff_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        b["wins"] = sum(d > 0 for d in diffs)
        b["ties"] = sum(d == 0 for d in diffs)
        b["losses"] = sum(d < 0 for d in diffs)
        b["gaps"] = [h["original_test"] - statistics.mean(r["distill_test"] for r in rs if r["split"] == h["split"])
                     for h in heads]
        per_budget[n_ep] = b
    main_n = max(args.epochs)
    summary = {
        "original_test": orig, "pruned_test": statistics.mean(h["pruned_test"] for h in heads),
        "main_epochs": main_n, "per_budget": per_budget,
        "distill_gap_to_original_points": 100 * (orig - per_budget[main_n]["distill"]),
        "distill_minus_finetune_points": 100 * per_budget[main_n]["paired_diff"],
        "total_s": time.perf_counter() - t_all,
    }
    print(json.dumps(summary), flush=True)
    write_report(Path(args.out), cmd, args, heads, summary, rows)


def verdict(b: dict) -> str:
    """Better / worse only when the paired mean is two standard errors away from zero."""
    d, se = b["paired_diff"], b["paired_diff_se"]
    if not se == se or abs(d) < 2 * se:  # NaN (one run) or within noise
        return "within two standard errors of zero: not distinguishable at this sample size"
    return "distillation better" if d > 0 else "distillation worse"


def write_report(path: Path, cmd: str, args: argparse.Namespace, heads: list[dict], s: dict, rows: list[dict]) -> None:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    fp = machine_fingerprint()
    gap = s["distill_gap_to_original_points"]
    diff = s["distill_minus_finetune_points"]
    main_n = s["main_epochs"]
    n_runs = len(args.seeds) * len(heads)
    h0 = heads[0]
    lines = [
        "# Distillation after channel pruning (digits CNN)",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{cmd}`",
        "- The machine was shared with other jobs while this ran; that affects only the wall times "
        "(accuracy is deterministic for a split and seed). torch intra-op threads: 1.",
        f"- Data: builtin:digits, {len(heads)} data splits ({', '.join(str(h['split']) for h in heads)}; split 1 "
        f"was used to pick the recovery lr and is excluded), each train {h0['n_train']}, select {h0['n_select']} "
        f"(distill's best-epoch choice), test {h0['n_test']} (never trained or selected on; 1 image = "
        f"{100 / h0['n_test']:.2f} points).",
        f"- Original: digits-cnn, compress.inputs.training.fit {args.train_epochs} epochs, lr {args.train_lr}, "
        "per split.",
        f"- Pruning: {h0['how']}: MACs {h0['macs_before']:,} -> {h0['macs_after']:,} "
        f"({h0['macs_after'] / h0['macs_before']:.3f}x).",
        f"- Recovery budgets N = {', '.join(map(str, args.epochs))} epochs, the same for every arm; lr {args.lr}, "
        f"AdamW + cosine, batch 64, seeds {', '.join(map(str, args.seeds))}. Fine-tuning: compress.inputs.training.fit "
        "(cross-entropy, final epoch kept). Distillation: the distill pass with its defaults (T=4, alpha=0.7 KD + "
        "0.3 CE) and patience 0; it keeps its best epoch on `select`. Label-free: the same pass with "
        "labels=\"ignore\" (teacher signal only; best epoch by agreement with the teacher).",
        "",
        f"## Test top-1 (%), mean ± sd over {len(heads)} splits x {len(args.seeds)} seeds",
        "",
        "| model | test top-1 (%) |",
        "|---|---|",
        f"| original | {pct(s['original_test'])} |",
        f"| pruned, no recovery | {pct(s['pruned_test'])} |",
    ]
    labels = {"finetune": "fine-tune", "distill": "distill", "distill_nolabels": "distill, label-free"}
    for n_ep, b in s["per_budget"].items():
        for k in ARMS:
            lines.append(f"| pruned + {labels[k]}, {n_ep} epochs | {pct(b[k])} ± {pct(b[k + '_sd'])} |")
    lines += [
        "",
        "## Distill minus fine-tune, paired (same split, seed and pruned start)",
        "",
        "| N | mean difference (points) | standard error | distill wins / ties / losses |",
        "|---|---|---|---|",
        *[f"| {n} | {100 * b['paired_diff']:+.2f} | {100 * b['paired_diff_se']:.2f} | "
          f"{b['wins']} / {b['ties']} / {b['losses']} of {n_runs} |" for n, b in s["per_budget"].items()],
        "",
        f"At N = {main_n}: distillation is {abs(gap):.2f} points {'below' if gap >= 0 else 'above'} the original "
        f"({'within' if gap <= 1.0 else 'NOT within'} the 1-point goal) and {diff:+.2f} points against plain "
        f"fine-tuning on average ({verdict(s['per_budget'][main_n])}). Per split, distill's gap to the original at "
        f"N = {main_n}: " + ", ".join(f"{100 * g:+.2f}" for g in s["per_budget"][main_n]["gaps"]) + " points.",
        "",
        *[f"At N = {n}: distill minus fine-tune {100 * b['paired_diff']:+.2f} points: {verdict(b)}."
          for n, b in s["per_budget"].items() if n != main_n],
        "",
        "## Per split",
        "",
        "| split | original | pruned | train s |",
        "|---|---|---|---|",
        *[f"| {h['split']} | {pct(h['original_test'])} | {pct(h['pruned_test'])} | {h['train_s']:.1f} |"
          for h in heads],
        "",
        "| split | N | seed | fine-tune | distill | distill label-free | distill best epoch | fine-tune s "
        "| distill s |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['split']} | {r['epochs']} | {r['seed']} | {pct(r['finetune_test'])} | {pct(r['distill_test'])} | "
          f"{pct(r['distill_nolabels_test'])} | {r['distill_best_epoch']} | {r['finetune_s']:.1f} | "
          f"{r['distill_s']:.1f} |" for r in rows],
        "",
        f"Total benchmark wall time: {s['total_s']:.0f} s.",
        "",
        "Machine fingerprint:",
        "",
        "```json",
        json.dumps(fp, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
