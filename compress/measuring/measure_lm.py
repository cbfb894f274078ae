"""Stage 3 for a causal language model: generation timed, quality scored.

Each (variant, target) cell gets a generation runner from its target (``target.lm_runner``, declared by
``TargetCaps.generates``). Then:

* quality: every cell's logits over the held-out windows give its perplexity, and against the
  reference cell (the original model on the reference target) the per-token KL divergence and top-1
  next-token agreement; greedy generations from ``lm_greedy_prompts`` held-out prompts give greedy-token
  agreement (mean over prompts) and the count of prompts generated identically;
* speed: every cell generates ``lm_new_tokens`` tokens after an ``lm_prompt``-token prompt once per
  round, in an order that changes every round (``compress.measuring.measure.round_orders``); time to first token
  and decode tokens/s are compared with the reference cell's as paired ratios with bootstrap intervals
  (``compress.measuring.stats.ratio_ci``), as every latency of the product is; with ``lm_batch`` > 1, decode
  tokens/s at that batch too, timed the same way (``batch_decode``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CompressError
from .cell import Live
from .compare import CellRef, sample_ratio
from .measure import round_orders
from .stats import bootstrap_stat


def _cells(plan: Any, variants: list[Any], say: Callable[[str], None], rt: Live) -> list[Any]:
    from .measure_build import cell_build, compile_for, new_cell

    cells = []
    for t in plan.targets:
        reason = plan.unavailable.get(t.name)
        for v in variants:
            cell, src = new_cell(t, v, variants, reason, say)
            cells.append(cell)
            if src is None:
                continue
            if not t.caps.generates:  # a PyTorch target (no decoder facts to refuse) without a generate loop
                cell.status = "failed"
                cell.reason = f"refused: target '{t.name}' has no generate loop for a causal language model"
                continue
            with cell_build(cell, say):
                compiled, hit, secs = compile_for(t, src, plan.ctx)
                cell.compiled, cell.cache_hit, cell.build_s = compiled, hit, secs
                cell.size_bytes = src.size_bytes()
                rt.spawns[cell.ref] = (lambda n, t=t, comp=compiled: t.lm_runner(comp, n))
                say(f"compile {v.name} for {t.name}: {'cache hit' if hit else f'{secs:.1f}s'}")
    return cells


def _reference(cells: list[Any], baseline: str) -> Any:
    live = [c for c in cells if c.status == "ok"]
    return next((c for c in live if c.variant == baseline and c.caps.reference),
                next((c for c in live if c.variant == baseline), live[0] if live else None))


def greedy_prompts(text: Any, prompt: int, n: int) -> np.ndarray:
    """``n`` prompts of the same length cut from the held-out text at evenly spaced offsets, (n, length)."""
    held = np.concatenate(list(text.eval))
    length = min(prompt, len(held))
    starts = np.linspace(0, len(held) - length, n).astype(int)
    return np.stack([held[s:s + length] for s in starts])


def _quality(cells: list[Any], rt: Live, ref: Any, text: Any, m: Any, say: Callable[[str], None]) -> None:
    from ..inputs.causal_lm import WindowScores

    live = [c for c in cells if c.status == "ok"]
    scores = {id(c): WindowScores() for c in live}
    for i, w in enumerate(text.eval):
        ref_logits = rt[ref].logits(w)
        for c in live:
            got = ref_logits if c is ref else rt[c].logits(w)
            scores[id(c)].add(got, w, None if c is ref else ref_logits)
        say(f"perplexity: window {i + 1}/{len(text.eval)}")
    # Greedy tokens agree up to the first divergence (after it the contexts differ); averaged over prompts.
    prompts = greedy_prompts(text, min(m.lm_prompt, text.window), m.lm_greedy_prompts)
    ref_toks = [rt[ref].generate(p[None], m.lm_new_tokens).tokens[0] for p in prompts]
    base_ppl = scores[id(ref)].figures()["perplexity"]
    for c in live:
        f = scores[id(c)].figures()
        toks = ref_toks if c is ref else [rt[c].generate(p[None], m.lm_new_tokens).tokens[0] for p in prompts]
        agree = [float(np.cumprod(t == r).sum() / len(r)) for t, r in zip(toks, ref_toks, strict=True)]
        c.generation.update({
            "perplexity": f["perplexity"], "eval_tokens": int(f["tokens"]),
            "perplexity_rise": f["perplexity"] / base_ppl - 1.0,
            "kl": f.get("kl", 0.0), "top1_agreement": f.get("top1_agreement", 1.0),
            "greedy_agreement": float(np.mean(agree)), "greedy_prompts": len(prompts),
            "greedy_identical_prompts": sum(a == 1.0 for a in agree),
        })
    say(f"greedy agreement: {len(prompts)} held-out prompt(s) of {prompts.shape[1]} tokens")


def _rounds(live: list[Any], rt: Live, prompt: np.ndarray, new: int, rounds: int, seed: int,
            say: Callable[[str], None]) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Every cell generates once per round, in an order that changes every round: time to first token and time
    per decode step (ms) per cell, after one untimed warm-up each (first calls allocate and page in weights)."""
    for c in live:
        rt[c].generate(prompt, min(new, 4))
    ttft: dict[int, list[float]] = {id(c): [] for c in live}
    tpot: dict[int, list[float]] = {id(c): [] for c in live}
    for r, order in enumerate(round_orders(len(live), rounds, seed)):
        for k in order:
            c = live[k]
            run = rt[c].generate(prompt, new)
            ttft[id(c)].append(run.ttft_s * 1e3)
            tpot[id(c)].append(run.decode_s * 1e3 / max(new - 1, 1))
        say(f"generation{f' at batch {len(prompt)}' if len(prompt) > 1 else ''}: round {r + 1}/{rounds}")
    return ttft, tpot


def _speed(cells: list[Any], rt: Live, ref: Any, text: Any, m: Any, seed: int, say: Callable[[str], None]) -> None:
    from .speculative import speculative_figures

    live = [c for c in cells if c.status == "ok"]
    prompt_len, new, rounds = m.lm_prompt, m.lm_new_tokens, m.lm_rounds
    ids = np.concatenate(list(text.eval) + list(text.calib))
    if len(ids) < prompt_len * m.lm_batch:
        raise CompressError(f"measure.lm_prompt = {prompt_len} x measure.lm_batch = {m.lm_batch}: the text has "
                            f"only {len(ids)} tokens")
    ttft, tpot = _rounds(live, rt, ids[:prompt_len][None], new, rounds, seed, say)
    for c in live:
        t50, tlo, thi = bootstrap_stat(ttft[id(c)], "p50", seed=seed)
        d50, dlo, dhi = bootstrap_stat(tpot[id(c)], "p50", seed=seed)
        g: dict[str, Any] = {
            "prompt_tokens": prompt_len, "new_tokens": new, "batch": 1, "rounds": rounds,
            "ttft_ms": t50, "ttft_ms_low": tlo, "ttft_ms_high": thi,
            "decode_tokens_per_s": 1e3 / d50, "decode_tokens_per_s_low": 1e3 / dhi,
            "decode_tokens_per_s_high": 1e3 / dlo,
        }
        if c is not ref:
            # Ratios from paired rounds: time to first token candidate/reference (lower is better), decode
            # speed-up reference time per token / candidate's (higher is better).
            g["ttft_ratio"] = sample_ratio(ttft[id(c)], ttft[id(ref)], "p50", seed=seed).model_dump()
            g["decode_speedup"] = sample_ratio(tpot[id(ref)], tpot[id(c)], "p50", seed=seed).model_dump()
        c.generation.update(g, **speculative_figures(rt[c]))
    if m.lm_batch > 1:
        _batch_speed(live, rt, ref, ids[: prompt_len * m.lm_batch].reshape(m.lm_batch, prompt_len), m, seed, say)


def _batch_speed(live: list[Any], rt: Live, ref: Any, prompts: np.ndarray, m: Any, seed: int,
                 say: Callable[[str], None]) -> None:
    """Decode tokens/s at batch ``len(prompts)``: the cells that run it (a runner that cannot says why in one
    line: OpenVINO's fused attention and speculative decoding run batch 1) timed as at batch 1."""
    b = len(prompts)
    able = []
    for c in live:
        try:
            rt[c].generate(prompts, 2)
            able.append(c)
        except CompressError as e:
            c.generation["batch_decode"] = {"batch": b, "unavailable": str(e)}
            say(f"batch {b} on {c.variant}/{c.target}: not timed: {e}")
    if not able:
        return
    _, tpot = _rounds(able, rt, prompts, m.lm_new_tokens, m.lm_rounds, seed, say)
    for c in able:
        d50, dlo, dhi = bootstrap_stat(tpot[id(c)], "p50", seed=seed)
        bd: dict[str, Any] = {"batch": b, "decode_tokens_per_s": b * 1e3 / d50,
                              "decode_tokens_per_s_low": b * 1e3 / dhi, "decode_tokens_per_s_high": b * 1e3 / dlo}
        if c is not ref and ref in able:
            bd["decode_speedup"] = sample_ratio(tpot[id(ref)], tpot[id(c)], "p50", seed=seed).model_dump()
        c.generation["batch_decode"] = bd


def _peak_memory(cells: list[Any], targets: list[Any], threads: int, say: Callable[[str], None]) -> None:
    """Peak RSS of each cell while generating, each in a fresh process (one process cannot attribute its
    peak to one of several models it holds)."""
    from .memprobe import measure_peak_memory

    by_name = {t.name: t for t in targets}
    for c in cells:
        if c.status != "ok" or c.compiled is None:
            continue
        try:
            got = measure_peak_memory(by_name[c.target].config, c.compiled, 1, threads, runs=2)
        except (RuntimeError, OSError, ValueError) as e:  # the child failed or timed out: say so, keep the rest
            c.notes.append(f"peak memory not measured: {e}")
            continue
        # What loading and generating added to the process: every probe imports the same libraries first.
        c.generation["peak_rss_bytes"] = got["model_peak_bytes"]
        say(f"peak memory {c.variant}/{c.target}: +{got['model_peak_bytes'] / 2**20:.0f} MiB while generating "
            f"(process total {got['peak_rss_bytes'] / 2**20:.0f} MiB)")


def choose_threads(cells: list[Any], spawns: dict[CellRef, Any], text: Any, options: list[int], seed: int,
                   say: Callable[[str], None]) -> tuple[int, str]:
    """The thread count that decodes fastest here, measured: the first compiled cell that is not the reference
    (the model being deployed) generates a short continuation at each count, alternating, three times each;
    the lowest median time per token wins. On a shared 2-core machine one thread has been faster than two
    for every engine (OpenMP threads wait on each other), so this is measured, not assumed."""
    live = [c for c in cells if c.status == "ok"]
    probe = next((c for c in live if not c.caps.reference and c.variant != "baseline"),
                 next((c for c in live if not c.caps.reference), live[0] if live else None))
    if probe is None or len(options) < 2:
        n = options[0] if options else 1
        return n, f"threads: {n} (nothing to choose between)"
    prompt = np.concatenate(list(text.calib))[:32][None]
    runners = {n: spawns[CellRef.of(probe)](n) for n in options}
    times: dict[int, list[float]] = {n: [] for n in options}
    try:
        for r in range(4):
            for n in options if r % 2 == 0 else reversed(options):
                g = runners[n].generate(prompt, 9)
                if r:  # the first round warms up
                    times[n].append(g.decode_s / 8)
    finally:
        for rn in runners.values():
            rn.close()
    med = {n: float(np.median(v)) * 1e3 for n, v in times.items()}
    best = min(med, key=lambda n: med[n])
    note = (f"threads: {best}, chosen by measurement on {probe.variant}/{probe.target} ("
            + ", ".join(f"{n} thread{'s' if n > 1 else ''}: {m:.2f} ms/token" for n, m in med.items()) + ")")
    say(note)
    return best, note


def measure_generation(plan: Any, variants: list[Any], threads: int,
                       say: Callable[[str], None]) -> tuple[list[Any], int, str]:
    """Cells of a causal-LM run: built, scored on held-out text and timed generating; returns them with the
    thread count used and how it was chosen. With measure.threads = 0 (auto) the count is chosen by
    measurement (:func:`choose_threads`) and every cell notes it."""
    import os

    from ..stages.plan import BASELINE
    from .speculative import attach_draft

    rec, text = plan.recipe, plan.ctx.text
    rt = Live()  # the runners, apart from the cells (which are data)
    cells = _cells(plan, variants, say, rt)
    note = f"threads: {threads} (measure.threads)"
    if rec.measure.threads == 0:
        options = sorted({1, threads, os.cpu_count() or 1})
        threads, note = choose_threads(cells, rt.spawns, text, options, rec.seed, say)
    for c in cells:
        c.generation = {}
        if c.status == "ok":
            try:
                rt.runners[c.ref] = rt.spawns[c.ref](threads)
            except CompressError as e:
                c.status, c.reason = "failed", str(e)
    for t in plan.targets:  # a target's ``draft`` setting: speculative decoding (compress.measuring.speculative)
        attach_draft(t, cells, rt, variants, threads)
    ref = _reference(cells, BASELINE)
    try:
        if ref is not None:
            m = rec.measure
            _quality(cells, rt, ref, text, m, say)
            _speed(cells, rt, ref, text, m, rec.seed, say)
            if m.lm_peak_memory:
                _peak_memory(cells, plan.targets, threads, say)
            for c in cells:
                if c.status == "ok" and c is not ref:
                    c.notes.append(f"generation compared with {ref.variant}/{ref.target} (paired rounds)")
    finally:
        rt.close_all()
    return cells, threads, note
