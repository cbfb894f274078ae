"""One run: model -> passes -> ONNX -> each target -> measure -> report.

Both the original model (the baseline) and the compressed one go through every
target in the same process, and their latencies are measured interleaved, so
the ratios in the report compare like with like.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import preflight
from .artifact import Artifact
from .cache import Cache
from .config import PassConfig, TargetConfig
from .data import DataBundle, load_data
from .errors import CompressError, RecipeError, TargetUnavailable
from .evaluate import fidelity, predict, predict_arrays, predict_feeds, top1
from .fingerprint import machine_fingerprint
from .manager import PassContext, PassManager, StepRecord, TimingInstrument, VerifyInstrument
from .measure import measure_interleaved, summarize
from .models import load_model
from .recipe import Recipe, format_pipeline, load_recipe
from .registry import get_pass, make_target
from .torch_io import load_torch, torch_artifact

REPORT_SCHEMA = "compress.report/v1"
DEFAULT_TARGETS = ("torch", "onnxruntime")


@dataclass
class Variant:
    """One model to measure: the baseline or the compressed pipeline's output."""

    name: str
    torch_art: Artifact | None
    onnx_art: Artifact | None
    steps: list[StepRecord] = field(default_factory=list)


@dataclass
class Cell:
    """One (variant, target) pair and everything measured on it."""

    variant: str
    target: str
    status: str = "ok"  # ok | unavailable | failed | skipped (nothing new to measure)
    reason: str | None = None
    compiled: Artifact | None = None
    runner: Any = None
    build_s: float | None = None
    cache_hit: bool = False
    latency: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None
    fidelity: dict[str, Any] | None = None
    size_bytes: int | None = None
    parity: dict[str, Any] | None = None  # deployed vs simulated (fake-quantized) model, for QDQ models
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def _resolve_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _with_export(passes: list[PassConfig], need_onnx: bool) -> tuple[list[PassConfig], bool]:
    """Insert export.onnx where the chain switches from torch to onnx (or at the end)."""
    from passes.export_onnx import ExportOnnx

    if any(p.kind == "export.onnx" for p in passes):
        return passes, False
    for i, p in enumerate(passes):
        if get_pass(p.kind).consumes == "onnx":
            return [*passes[:i], ExportOnnx(), *passes[i:]], True
    return ([*passes, ExportOnnx()], True) if need_onnx else (passes, False)


def _train_root(root: Artifact, data: DataBundle, epochs: int, seed: int, ctx: PassContext) -> Artifact:
    """Train the model once on the train split; cached so later runs reuse it."""
    from .training import fit

    key = Cache.key(root.digest, "train", 1, {"epochs": epochs, "seed": seed, "data": data.digest})
    hit = ctx.cache.get(key)
    if hit is not None:
        ctx.log(f"train {epochs} epochs: cache hit")
        return hit
    ctx.log(f"train {epochs} epochs on {data.name} (once; cached afterwards)")
    model = load_torch(root)
    import copy

    model = copy.deepcopy(model)
    curve = fit(model, data, epochs, lr=3e-3, seed=seed, progress=ctx.progress, desc="train")
    art = torch_artifact(model, root, ctx, metadata={"train": {"epochs": epochs, "val_top1_curve": curve}})
    art.parent, art.producer = root.digest, f"train{{epochs={epochs}}}"
    return ctx.cache.put(key, art)


def _compile(target: Any, art: Artifact, ctx: PassContext) -> tuple[Artifact, bool, float]:
    key = Cache.key(art.digest, f"target:{target.name}", 1, target.config.canonical(), extra=target.fingerprint())
    hit = ctx.cache.get(key)
    if hit is not None:
        return hit, True, 0.0
    t0 = time.perf_counter()
    out = target.compile(art, ctx)
    secs = time.perf_counter() - t0
    out.parent = art.digest
    out.producer = f"compile {target.name}"
    out.metadata = {**art.metadata, **out.metadata, "build_s": secs}
    return ctx.cache.put(key, out), False, secs


def _dynamic_batch(art: Artifact | None) -> bool:
    if art is None:
        return True
    return bool(art.metadata.get("dynamic_batch", art.metadata.get("export.onnx", {}).get("dynamic_batch", False)))


def run(
    recipe: Recipe | str | Path,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    variants: dict[str, list[PassConfig]] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Run a recipe end to end; write report.json, report.md and pareto.png; return the report.

    ``variants`` replaces the recipe's single pass chain with several named chains
    (``compress compare`` uses it for precisions); all are measured in one session.
    """
    rec = _resolve_recipe(recipe)
    say = log or (lambda m: None)
    out = Path(out_dir) if out_dir else Path("runs") / rec.name
    cache = Cache(Path(cache_dir) if cache_dir else None)
    threads = rec.measure.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(rec.seed)
    t_start = time.perf_counter()

    # Validate everything that can be validated before any work is done.
    if write:
        preflight.check_out_dir(out)
    target_cfgs: list[TargetConfig] = list(rec.targets) or _default_targets()
    targets = [make_target(c) for c in target_cfgs]
    for t in targets:
        check = getattr(t, "check_config", None)
        if check is not None:
            check()  # settings the target's library would reject only at build time
    need_onnx = any(t.consumes == "onnx" for t in targets)
    if rec.measure.metric:
        from .fidelity import load_metric

        load_metric(rec.measure.metric)  # a typo in the metric fails now, not after the passes ran
    chains_in = variants if variants is not None else ({rec.name: list(rec.passes)} if rec.passes else {})
    if "baseline" in chains_in:
        raise RecipeError("'baseline' is reserved for the original model; name the variant otherwise")
    root = load_model(rec.model, cache)
    chains: dict[str, PassManager] = {}
    auto_export = False
    export_cfg: PassConfig | None = None
    for name, chain in chains_in.items():
        passes, auto = _with_export(list(chain), need_onnx)
        auto_export |= auto
        export_cfg = export_cfg or next((p for p in passes if p.kind == "export.onnx"), None)
        chains[name] = PassManager(passes, [TimingInstrument(), VerifyInstrument()])
        chains[name].validate(root.kind)
    if export_cfg is None and need_onnx:
        from passes.export_onnx import ExportOnnx

        export_cfg, auto_export = ExportOnnx(), True
    base_pm = PassManager([export_cfg] if (export_cfg and root.kind == "torch") else [])
    base_pm.validate(root.kind)

    data = load_data(rec.data, root.inputs[0].shape, root.inputs)
    if data is not None and data.note:
        say(f"data: {data.note}")
    n_classes = preflight.model_classes(root, data)
    preflight.check_labels(data, n_classes)
    for pm in chains.values():
        preflight.check_data_needed(pm.steps, data, synthetic_ok=any(
            not np.issubdtype(np.dtype(s.dtype), np.floating) for s in root.inputs))
    ctx = PassContext(cache=cache, data=data, seed=rec.seed, progress=progress, log=say)
    if rec.model.train_epochs:
        if root.kind != "torch":
            raise RecipeError("model.train_epochs needs a PyTorch model, not an ONNX file")
        if data is None or not data.labelled:
            raise RecipeError("model.train_epochs needs labelled data (e.g. data = { source = \"builtin:digits\" })")
        root = _train_root(root, data, rec.model.train_epochs, rec.seed, ctx)
    ctx.original = root

    for name, pm in chains.items():
        say(f"pipeline {name}: {format_pipeline(pm.steps, target_cfgs)}")
    base_art, base_steps = base_pm.run(root, ctx)
    measured = [Variant("baseline", root if root.kind == "torch" else None,
                        base_art if base_art.kind == "onnx" else None, base_steps)]
    for name, pm in chains.items():
        ctx.history = []
        cand_art, cand_steps = pm.run(root, ctx)
        torch_art = root if root.kind == "torch" else None
        for r in cand_steps:
            if r.artifact is not None and r.artifact.kind == "torch":
                torch_art = r.artifact
        onnx_art = cand_art if cand_art.kind == "onnx" else None
        measured.append(Variant(name, torch_art, onnx_art, cand_steps))

    cells = _build_cells(measured, targets, ctx, say)
    try:
        _measure_latency(cells, root, rec, threads, progress, say)
        kind: str = rec.measure.output_kind
        if kind == "auto" and root.metadata.get("task"):  # a Hugging Face task head says what its output is
            from .hf import task_output_kind

            kind = task_output_kind(str(root.metadata["task"]))
        _measure_accuracy(cells, measured, data, root, say, kind, rec.measure.metric)
        _measure_quant_parity(cells, measured, data, say)
    finally:
        for c in cells:
            if c.runner is not None:
                c.runner.close()

    from .report import build_report, write_report

    report = build_report(rec, measured, cells, data, threads, auto_export, machine_fingerprint(),
                          time.perf_counter() - t_start, cache)
    base_acc = next((c.accuracy for c in cells if c.variant == "baseline" and c.accuracy is not None), None)
    trained = bool(rec.model.train_epochs or rec.model.weights)
    note = preflight.chance_note(base_acc, n_classes, rec.model.source, trained)
    if note:
        report["notes"].append(note)
        say(f"note: {note}")
    if write:
        write_report(report, out)
    if not any(c.status == "ok" for c in cells):
        why = "; ".join(f"{c.variant}/{c.target}: {c.reason}" for c in cells)
        raise TargetUnavailable(f"nothing could be measured ({why}); the report in {out} lists the reasons")
    return report


def _default_targets() -> list[TargetConfig]:
    from .registry import get_target_config

    return [get_target_config(k)() for k in DEFAULT_TARGETS]


def _build_cells(variants: list[Variant], targets: list[Any], ctx: PassContext,
                 say: Callable[[str], None]) -> list[Cell]:
    cells = []
    for t in targets:
        reason = t.unavailable_reason()
        for v in variants:
            cell = Cell(v.name, t.name, config=t.config.canonical())
            cells.append(cell)
            src = v.torch_art if t.consumes == "torch" else v.onnx_art
            if reason is not None:
                cell.status, cell.reason = "unavailable", reason
                continue
            if src is None:
                cell.status = "unavailable"
                cell.reason = ("no PyTorch model (the run started from an ONNX file)" if t.consumes == "torch"
                               else "the pipeline produced no ONNX model")
                continue
            if t.consumes == "torch" and v.onnx_art is not None and v.steps:
                onnx_after = [r.kind for r in v.steps if get_pass(r.kind).consumes == "onnx"]
                base_torch = variants[0].torch_art
                if onnx_after and v is not variants[0] and base_torch is not None and src.digest == base_torch.digest:
                    # Measuring the baseline's own model again would only show noise as a "speed-up".
                    cell.status = "skipped"
                    cell.reason = (f"same PyTorch model as the baseline ({', '.join(onnx_after)} acts on the ONNX "
                                   "model only)")
                    continue
                if onnx_after:
                    cell.notes.append(f"measures the PyTorch model before the ONNX passes ({', '.join(onnx_after)})")
            try:
                compiled, hit, secs = _compile(t, src, ctx)
                cell.compiled, cell.cache_hit = compiled, hit
                cell.build_s = compiled.metadata.get("build_s", secs)
                cell.size_bytes = src.size_bytes() if t.consumes == "torch" else compiled.size_bytes()
                cell.notes += list(compiled.metadata.get("target_notes", []))  # kept if it cannot run here
                cell.runner = t.runner(compiled, threads=torch.get_num_threads())
                say(f"compile {v.name} for {t.name}: {'cache hit' if hit else f'{secs:.1f}s'}")
            except TargetUnavailable as e:
                cell.status, cell.reason = "unavailable", str(e)
            except CompressError as e:
                # One target failing must not stop the others: the report shows why.
                cell.status, cell.reason = "failed", str(e)
                say(f"compile {v.name} for {t.name}: failed: {e}")
    return cells


def _feeds(root: Artifact, batch: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    feeds = {}
    for s in root.inputs:
        shape = (batch, *s.shape[1:])
        if np.issubdtype(np.dtype(s.dtype), np.floating):
            feeds[s.name] = g.standard_normal(shape).astype(s.dtype)
        else:  # token ids within the vocabulary, masks of ones (see torch_io.sample_inputs)
            from .torch_io import sample_inputs

            feeds[s.name] = sample_inputs((s,), batch=batch, seed=seed)[0].numpy()
    return feeds


def _measure_latency(cells: list[Cell], root: Artifact, rec: Recipe, threads: int, progress: bool,
                     say: Callable[[str], None]) -> None:
    live = [c for c in cells if c.status == "ok"]
    for batch in rec.measure.batch_sizes:
        fns = {}
        for c in live:
            if batch > 1 and c.target != "torch" and not _dynamic_batch(c.compiled):
                c.notes.append(f"batch {batch} skipped: the model has a fixed batch size of 1")
                continue
            feeds = _feeds(root, batch, rec.seed)
            renamed = dict(zip(c.runner.input_names, feeds.values(), strict=False))
            fns[(c.variant, c.target)] = (lambda r=c.runner, f=renamed: r.infer(f))
        if not fns:
            continue
        say(f"latency at batch {batch}: {len(fns)} candidates interleaved, {threads} threads")
        for c in live:  # runners that time on the device (TensorRT: CUDA events) keep a list per call
            if isinstance(getattr(c.runner, "gpu_ms", None), list):
                c.runner.gpu_ms.clear()
        try:
            samples = measure_interleaved(
                {f"{v}/{t}": fn for (v, t), fn in fns.items()}, rec.measure.warmup, rec.measure.min_runs,
                rec.measure.min_time_s, rec.measure.max_time_s, progress=progress, desc=f"latency b{batch}")
        except Exception as e:  # a runtime failure mid-measurement is reported per cell below
            raise CompressError(f"latency measurement at batch {batch} failed: {e}") from e
        for c in live:
            key = f"{c.variant}/{c.target}"
            if key in samples:
                # Raw samples stay in the report: the budget gate bootstraps intervals from them.
                c.latency[str(batch)] = {**summarize(samples[key], batch).to_json(),
                                         "samples_ms": [round(x, 5) for x in samples[key]]}
                gpu = getattr(c.runner, "gpu_ms", None)
                if isinstance(gpu, list) and gpu:
                    # Device time from CUDA events, beside the host wall time above (warm-up calls included).
                    c.latency[str(batch)]["device"] = summarize(list(gpu), batch).to_json()


def _output_name(variants: list[Variant]) -> str | None:
    """The first output's name in the baseline's ONNX graph (a hint to what the output is), if there is one."""
    art = variants[0].onnx_art if variants else None
    if art is None:
        return None
    try:
        import onnx

        return str(onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph.output[0].name)
    except Exception:  # only a hint: an unreadable graph is reported by the targets that load it
        return None


def _measure_accuracy(cells: list[Cell], variants: list[Variant], data: DataBundle | None, root: Artifact,
                      say: Callable[[str], None], output_kind: str = "auto", metric: str | None = None) -> None:
    """Top-1 on the validation split and fidelity to the original model on the reference target.

    Fidelity is measured the way the output calls for (compress.fidelity): argmax agreement for
    logits, per-sample cosine for embeddings, SNR for regression, plus the user's metric if named.
    """
    from .fidelity import infer_kind, load_metric, run_metric

    metric_fn = load_metric(metric) if metric else None
    kind: str | None = None
    ref: np.ndarray | None = None
    xs: np.ndarray | None = None
    if data is None:
        # No data: fidelity on seeded random inputs only; accuracy stays "not measured".
        all_feeds = _feeds(root, 64, 1234)
        xs = all_feeds[root.inputs[0].name]
    ref_cell = next((c for c in cells if c.variant == "baseline" and c.status == "ok"
                     and c.target == "torch"), None) or next(
        (c for c in cells if c.variant == "baseline" and c.status == "ok"), None)
    ordered = ([ref_cell] if ref_cell else []) + [c for c in cells if c is not ref_cell]
    for c in ordered:
        if c.status != "ok":
            continue
        bs = 64 if (c.target == "torch" or _dynamic_batch(c.compiled)) else 1
        try:
            if data is not None and data.input_names:  # one named array per model input
                logits = predict_feeds(c.runner, data.feeds(data.val), bs)
            elif data is not None:
                logits = predict(c.runner, data, data.val, bs)
            elif len(root.inputs) > 1:  # several named inputs (token ids and a mask): synthetic, valid values
                logits = predict_feeds(c.runner, all_feeds, bs)
            else:
                assert xs is not None  # set above whenever there is no data
                logits = predict_arrays(c.runner, xs, bs)
        except Exception as e:  # report the failing target instead of aborting the run
            c.status, c.reason = "failed", f"inference on the validation data failed: {str(e).splitlines()[0]}"
            continue
        if c is ref_cell:
            ref = logits
            kind, why = infer_kind(ref, _output_name(variants), output_kind)
            say(f"fidelity as {kind} ({why})")
        if data is not None and data.labelled and (kind or "logits") == "logits":
            c.accuracy = top1(logits, data.val.y)  # type: ignore[arg-type]
        if ref is not None:
            c.fidelity = fidelity(ref, logits, kind or "logits")
            if metric_fn is not None and metric is not None:
                labels = data.val.y if data is not None else None
                c.fidelity["metric"] = run_metric(metric_fn, metric, ref, logits, labels)
            if c is ref_cell and c.fidelity.get("degenerate"):
                say(f"WARNING fidelity: {c.fidelity['degenerate']}")
    if ref_cell is not None:
        say(f"fidelity reference: baseline on {ref_cell.target}")


QDQ_PASSES = ("quantize.int8", "quantize.qat")


def _measure_quant_parity(cells: list[Cell], variants: list[Variant], data: DataBundle | None,
                          say: Callable[[str], None]) -> None:
    """Per ONNX target, agreement of the deployed INT8 model with its simulation (the QDQ graph run
    with reference kernels), so a backend whose integer kernels drift is flagged, not hidden."""
    by_name = {v.name: v for v in variants}
    for c in cells:
        v = by_name.get(c.variant)
        if c.status != "ok" or v is None or v.onnx_art is None or c.target == "torch":
            continue
        if not any(k in v.onnx_art.metadata for k in QDQ_PASSES):
            continue
        from passes.quantize_int8 import simulated_agreement

        bs = 64 if _dynamic_batch(c.compiled) else 1
        try:
            c.parity = simulated_agreement(v.onnx_art, c.runner.infer, data, split="val", max_samples=256, batch=bs)
        except Exception as e:  # parity is a check on top; its failure is reported, the run goes on
            c.notes.append(f"deployed-vs-simulated parity not measured: {str(e).splitlines()[0]}")
            continue
        if c.parity["flagged"]:
            agr = c.parity.get("agreement")
            msg = (f"deployed INT8 on {c.target} disagrees with the simulated model: "
                   f"{'' if agr is None else f'agreement {100 * agr:.1f}%, '}cosine {c.parity['cosine']:.4f} "
                   f"(tolerance {c.parity['tolerance']})")
            c.notes.append(msg)
            say(f"WARNING {c.variant}/{c.target}: {msg}")


def clean_output(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
