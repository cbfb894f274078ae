"""The report's rows and lines that report.md, the terminal summary and report.html share (so each view
reads them from one place, and report.html needs nothing of report.md's module)."""

from __future__ import annotations

from ..measuring.compare import clock
from ..quality.fidelity import headline as fidelity_headline
from .report_schema import (
    Report,
    ResultCell,
)


def fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def noise_lines(report: Report) -> list[str]:
    lines = []
    for n in report.noise:
        aa = n.aa
        aa_txt = (f"A/A (baseline, {n.aa_kind}) x{aa.ratio:.3f} [{aa.low:.3f}, {aa.high:.3f}]" if aa
                  else "A/A not measured (too few rounds)")
        det = n.detectable
        det_txt = f"; smallest detectable difference ~{100 * det:.0f}%" if det is not None else ""
        seq = f" s{n.seq}" if n.seq is not None else ""
        lines.append(f"noise {n.target} b{n.batch}{seq}: {aa_txt}{det_txt}")
    return lines


def _lat(r: ResultCell, batch: str, key: str) -> float | None:
    """A latency figure of the cell on its clock (``measuring.compare.clock``: a remote (RPC) cell's device's own,
    its host figures include the network round trip); the table marks such a cell's target with "(device)"."""
    ck = clock(r, batch)
    return ck.figure(key) if ck is not None else None


_BRIEF_DROP = ("p90", "p99", "cv")  # the terminal table leaves these to report.md, so it fits 120 columns


def table_rows(report: Report, compare: bool = False, brief: bool = False) -> tuple[list[str], list[list[str]]]:
    """Rows of the results table. ``compare`` adds throughput and build time and names the baseline fp32;
    ``brief`` (the terminal) leaves out p90, p99 and cv, which report.md keeps."""
    head, rows = _table_rows(report, compare)
    if brief:
        # compare: the ranking below the table gives every cell's ratio to the fastest, so the per-baseline
        # ratios stay in report.md.
        keep = [i for i, h in enumerate(head) if h not in _BRIEF_DROP and not (compare and h.startswith("vs base"))]
        head, rows = [head[i] for i in keep], [[r[i] for i in keep] for r in rows]
        rows = [[c.replace("no measurable difference", "~1x") for c in r] for r in rows]
    return head, rows


def _table_rows(report: Report, compare: bool = False) -> tuple[list[str], list[list[str]]]:
    batches = report.batches
    b0 = batches[0]
    head = ["variant", "target", "top-1", "fidelity", f"p50 ms (b{b0})", "p90", "p99", "cv",
            *[f"vs base (b{b})" for b in batches], "size"]
    if len(batches) > 1:
        head.append(f"p50 ms (b{batches[-1]})")
    if compare:
        head += [f"items/s (b{batches[-1]})", "build s"]
    head.append("status")
    rows = []
    for r in report.results:
        p50 = _lat(r, b0, "p50_ms")
        ratios = [x.text if (x := r.ratio_to_baseline.get(b)) is not None else "-" for b in batches]
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        if r.status == "ok" and r.accuracy_guard is not None:
            status = r.accuracy_guard.text
        cv = _lat(r, b0, "cv")
        row = [
            (report.baseline_label or ("fp32" if compare else "baseline")) if r.variant == "baseline"
            else r.variant, r.target + (" (device)" if r.device is not None else ""),
            f"{100 * r.accuracy_top1:.2f}%" if r.accuracy_top1 is not None else "not measured",
            fidelity_headline(r.fidelity.model_dump(exclude_none=True) if r.fidelity else None),
            f"{p50:.3f}" if p50 is not None else "-",
            f"{_lat(r, b0, 'p90_ms'):.3f}" if p50 is not None else "-",
            f"{_lat(r, b0, 'p99_ms'):.3f}" if p50 is not None else "-",
            f"{100 * cv:.1f}%" if cv is not None else "-",
            *ratios, fmt_size(r.size_bytes),
        ]
        if len(batches) > 1:
            pl = _lat(r, batches[-1], "p50_ms")
            row.append(f"{pl:.3f}" if pl is not None else "-")
        if compare:
            tp = _lat(r, batches[-1], "throughput")
            row += [f"{tp:.1f}" if tp is not None else "-",
                    f"{r.build_s:.2f}" if r.build_s is not None else "-"]
        row.append(status)
        rows.append(row)
    return head, rows


def generation_lines(report: Report) -> list[str]:
    """A causal LM's table: perplexity and agreement against the reference, time to first token and decode
    speed with their paired ratios (empty for other models)."""
    rows = [r for r in report.results if r.generation is not None and r.generation.perplexity is not None]
    if not rows:
        return []
    g0 = rows[0].generation
    assert g0 is not None
    head = ["variant", "target", "perplexity", "rise", "KL", "top-1 agr", "greedy agr", "TTFT ms", "vs ref",
            "decode tok/s", "vs ref", "peak mem", "size"]
    out_rows = []
    for r in rows:
        g = r.generation
        assert g is not None
        tr, ds = g.ttft_ratio, g.decode_speedup
        out_rows.append([
            r.variant, r.target, f"{g.perplexity:.3f}", f"{100 * (g.perplexity_rise or 0):+.1f}%",
            f"{g.kl or 0:.4f}", f"{100 * (g.top1_agreement or 0):.1f}%", f"{100 * (g.greedy_agreement or 0):.0f}%"
            + (f" ({g.greedy_identical_prompts}/{g.greedy_prompts} same)" if g.greedy_prompts else ""),
            f"{g.ttft_ms:.1f}" if g.ttft_ms is not None else "-",
            f"{tr.ratio:.2f}x [{tr.low:.2f}, {tr.high:.2f}]" if tr else "ref",
            f"{g.decode_tokens_per_s:.1f}" if g.decode_tokens_per_s is not None else "-",
            f"{ds.ratio:.2f}x [{ds.low:.2f}, {ds.high:.2f}]" if ds else "ref",
            fmt_size(g.peak_rss_bytes) if g.peak_rss_bytes else "-", fmt_size(r.size_bytes)])
    widths = [max(len(h), *(len(x[i]) for x in out_rows)) for i, h in enumerate(head)]
    lines = [f"generation: prompt {g0.prompt_tokens} tokens, {g0.new_tokens} new greedy tokens, batch {g0.batch}, "
             f"{g0.rounds} interleaved rounds; perplexity over {g0.eval_tokens} held-out tokens; peak mem: "
             "resident memory a fresh process added loading the model and generating",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in out_rows]
    return lines + _batch_lines(rows)


def _batch_lines(rows: list[ResultCell]) -> list[str]:
    """Decode speed at measure.lm_batch > 1, one line per cell (or why it was not timed)."""
    out, batch = [], 0
    for r in rows:
        bd = r.generation.batch_decode if r.generation is not None else None
        if bd is None:
            continue
        batch = bd.batch
        if bd.unavailable:
            out.append(f"  {r.variant}/{r.target}: not timed at batch {bd.batch}: {bd.unavailable}")
            continue
        ds = bd.decode_speedup
        vs = f"{ds.ratio:.2f}x [{ds.low:.2f}, {ds.high:.2f}] vs ref" if ds else "ref"
        out.append(f"  {r.variant}/{r.target}: {bd.decode_tokens_per_s:.1f} tok/s ({vs})")
    return [f"decode at batch {batch} (tokens/s summed over the batch, paired rounds):", *out] if out else []
