"""Reports: report.json (versioned schema), report.md, pareto.png, report.html (compress.reporting.report_html) and the
terminal table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from ..measuring.cell import Cell
from ..measuring.compare import CellRef
from ..stages.recipe import Recipe, recipe_to_toml
from .report_html import render_html
from .report_plots import plot_latency, plot_pareto
from .report_schema import (
    SCHEMA,
    Contention,
    DataInfo,
    Machine,
    MeasuredRatio,
    Measurement,
    ModelSummary,
    NoiseEntry,
    RecipeInfo,
    Report,
    ResultCell,
    StepInfo,
    VariantInfo,
    parse_latency_key,
)
from .report_tables import generation_lines, noise_lines, table_rows


def _pass_notes(metadata: dict[str, Any]) -> list[str]:
    notes = []
    for k, v in metadata.items():
        if isinstance(v, dict):
            notes += [f"{k}: {n}" for n in v.get("notes", [])]
    return notes


def model_summary(passes: dict[str, Any]) -> ModelSummary:
    """Params, MACs and sparsity of a variant, from what its pruning passes recorded (latest wins)."""
    out: dict[str, Any] = {}
    for meta in passes.values():
        if not isinstance(meta, dict):
            continue
        for src, dst in (("params_after", "params"), ("params", "params"), ("macs_after", "macs"),
                         ("macs_dense", "macs"), ("params_nonzero", "params_nonzero"),
                         ("sparsity", "weight_sparsity")):
            if isinstance(meta.get(src), (int, float)):
                out[dst] = meta[src]
        if "macs_before" in meta and "macs_before" not in out:
            out["macs_before"] = meta["macs_before"]
    return ModelSummary.model_validate(out)


def noise_summary(results: list[ResultCell]) -> list[NoiseEntry]:
    """Per target and batch: the baseline's A/A spread (a second session of it timed alongside, or
    else its odd vs even rounds) and the smallest latency difference the run's paired ratios could
    have detected (80% power, 95% interval)."""
    out = []
    for r in results:
        if r.variant != "baseline":
            continue
        for batch, lat in r.latency.items():
            mdes = [x.mde for o in results if o.target == r.target and o.variant != "baseline"
                    for b, x in o.ratio_to_baseline.items() if b == batch and isinstance(x, MeasuredRatio)]
            aa = lat.aa_session or lat.aa
            if aa is None and not mdes:
                continue
            b, seq = parse_latency_key(batch)
            out.append(NoiseEntry(target=r.target, batch=b, **({"seq": seq} if seq is not None else {}), aa=aa,
                                  aa_kind="second session" if lat.aa_session else "odd vs even rounds",
                                  detectable=max(mdes) if mdes else (aa.mde if aa else None)))
    return out


def build_report(rec: Recipe, variants: list[Any], cells: list[Cell], data: Any, threads: int, auto_export: bool,
                 fingerprint: dict[str, Any], seconds: float, cache: Any,
                 contention: dict[str, Any] | None = None, baseline_label: str | None = None,
                 extra_notes: list[str] | None = None, seq_own: int | None = None) -> Report:
    """The run's typed report (validated: a record that does not fit the schema fails here).

    ``extra_notes`` go after the notes gathered here; ``baseline_label`` names the baseline in tables."""
    notes: list[str] = []
    if contention:
        notes += [f"WARNING {w}" for w in contention.get("warnings", [])]
    if any(c.generation for c in cells):
        pass  # a causal LM: judged by perplexity and agreement on held-out text (its generation table)
    elif data is None:
        notes.append("accuracy not measured: no data given (data.source = \"random\"); fidelity is on random inputs")
    elif not data.labelled:
        notes.append("accuracy not measured: the data has no labels; fidelity to the original model is reported")
    degen = next((c.fidelity["degenerate"] for c in cells if c.fidelity and c.fidelity.get("degenerate")), None)
    if degen:
        notes.append(f"fidelity is not meaningful: {degen}")
    kinds = {c.fidelity.get("kind") for c in cells if c.fidelity}
    if kinds - {"logits", None}:
        notes.append(f"fidelity compared as {', '.join(sorted(k for k in kinds if k))} (no argmax agreement: the "
                     "output is not class scores; set measure.output_kind to override)")
    if auto_export:
        from ..core.registry import lowering_pass

        notes.append(f"{lowering_pass().kind} was inserted automatically where the pipeline needed an ONNX model")
    vjson = {v.name: _variant_info(v) for v in variants}
    for v in variants:
        last = v.onnx_art or v.torch_art
        notes += [f"{v.name}: {n}" for n in _pass_notes(last.metadata if last is not None else {})]
    notes += list(getattr(cache, "notes", []))  # entries that failed verification and were rebuilt
    if any(c.parity for c in cells):
        from ..quality.parity import tolerance_note

        notes.append(tolerance_note())
    notes += extra_notes or []
    results = [_result_cell(c) for c in cells]
    extra: dict[str, Any] = {"baseline_label": baseline_label} if baseline_label else {}
    return Report(
        schema_id=SCHEMA,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        recipe=RecipeInfo(name=rec.name, pipeline=rec.pipeline_text(), toml=recipe_to_toml(rec)),
        machine=Machine.model_validate(fingerprint),
        measurement=Measurement.model_validate({**rec.measure.model_dump(mode="json"), "threads": threads,
                                                "threads_setting": rec.measure.threads,
                                                **({"seq_own": seq_own} if seq_own is not None else {})}),
        data=None if data is None else DataInfo(
            source=data.name, labelled=data.labelled, train=len(data.train), calib=len(data.calib),
            val=len(data.val), digest=data.digest, note=data.note),
        variants=vjson,
        results=results,
        notes=notes,
        contention=None if contention is None else Contention.model_validate(contention),
        noise=noise_summary(results),
        seconds=round(seconds, 2),
        cache=str(cache.root),
        **extra,
    )


def _variant_info(v: Any) -> VariantInfo:
    """What the report keeps of a variant: its models' digests, its steps, what its passes recorded."""
    last = v.onnx_art or v.torch_art
    meta = last.metadata if last is not None else {}
    passes_meta = {k: val for k, val in meta.items() if isinstance(val, dict)}
    return VariantInfo(
        torch_digest=v.torch_art.digest if v.torch_art else None,
        onnx_digest=v.onnx_art.digest if v.onnx_art else None,
        steps=[StepInfo.model_validate(s.to_json()) for s in v.steps],
        passes=passes_meta,
        model=model_summary(passes_meta),
        facts=last.known_facts() if last is not None else None,
    )


def _result_cell(c: Cell) -> ResultCell:
    """A stage-3 cell as the report's record (validated: a record that does not fit the schema fails here)."""
    return ResultCell.model_validate({
        "variant": c.variant, "target": c.target, "status": c.status, "reason": c.reason,
        "compiled_digest": c.compiled.digest if c.compiled else None,
        "compiled_path": str(c.compiled.path) if c.compiled else None, "target_config": c.config,
        "build_s": c.build_s, "build_cache_hit": c.cache_hit, "size_bytes": c.size_bytes,
        "accuracy_top1": c.accuracy, "fidelity": c.fidelity, "parity": c.parity,
        # INT8 cells: the same record, under the name older reports used (deployed vs simulated).
        "quant_parity": c.parity if c.parity and c.parity.get("precision") == "int8" and "cosine" in c.parity
        else None,
        "latency": c.latency, "notes": c.notes,
        "identical_to": str(c.identical_to) if c.identical_to is not None else None,
        "ratio_to_baseline": c.ratios, "reference": c.reference, "device": c.device,
        **({"generation": c.generation} if c.generation else {}),
        "accuracy_guard": c.guard, "artifact_dir": c.artifact_dir,
    })


WIDTH = 120


def seq_lines(report: Report) -> list[str]:
    """Latency at the sequence lengths of measure.seq_lens other than the model's own (keys "B/sS"):
    one line per cell and length, with the paired ratio to the baseline at the same shape."""
    out = []
    for r in report.results:
        for key, lat in r.latency.items():
            b, seq = parse_latency_key(key)
            if seq is None:
                continue
            x = r.ratio_to_baseline.get(key)
            out.append(f"{CellRef.of(r)} b{b} seq {seq}: p50 {lat.p50_ms:.3f} ms, p90 {lat.p90_ms:.3f}"
                       + (f"; vs base {x.text}" if x is not None else ""))
    return out


def _said_key(line: str) -> str:
    return line.removeprefix("note: ").removeprefix("WARNING ").strip()


def render_text(report: Report, compare: bool = False, said: set[str] | None = None) -> str:
    """The terminal's summary: a table that fits 120 columns (a long status is cut there and given whole
    below it), then the notes. ``said``: lines already printed while the run went (its log), so a warning
    the user saw live is not repeated here."""
    gen = generation_lines(report)
    if gen:  # a causal LM: its own table (the classifier table's columns are all empty for it)
        return "\n".join([*gen, *([""] + [f"note: {n}" for n in report.notes] if report.notes else []),
                          *[f"note: {CellRef.of(r)}: {r.status}: {r.reason}" for r in report.results
                            if r.status != "ok"]])
    head, rows = table_rows(report, compare, brief=True)
    gone: dict[str, str] = {}
    if compare:  # unavailable targets go below the table, once each, with the reason
        gone = {r[1]: r[-1] for r in rows if r[-1].startswith("unavailable")}
        gone.update({f"{r[0]}/{r[1]}": r[-1] for r in rows if r[-1].startswith("skipped")})
        rows = [r for r in rows if not r[-1].startswith(("unavailable", "skipped"))]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    room = WIDTH - (sum(widths[:-1]) + 2 * (len(widths) - 1))
    if widths[-1] > room:  # the status column: cut, and the whole reason below the table
        cut = max(room, len("status"), 12)
        for r in rows:
            if len(r[-1]) > cut:
                gone[f"{r[0]}/{r[1]}"] = r[-1]
                r[-1] = r[-1][:cut - 3] + "..."
        widths[-1] = max(len(head[-1]), *(len(r[-1]) for r in rows)) if rows else len(head[-1])
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if compare:  # which backend (and precision) is fastest here, per batch size: right below the table
        from .ranking import ranking_lines

        ranked = ranking_lines(report, report.baseline_label or "fp32")
        if ranked:
            out += ["", *ranked]
    if gone:
        out += ["", *[f"{t}: {why}" for t, why in gone.items()]]
    heard = {_said_key(x) for x in (said or set())}
    notes = [n for n in dict.fromkeys(report.notes) if _said_key(n) not in heard]
    if notes:
        out += ["", *[f"note: {n}" for n in notes]]
    cell_notes = [f"note: {CellRef.of(r)}: {n}" for r in report.results for n in r.notes
                  if _said_key(f"{CellRef.of(r)}: {n}") not in heard]
    if cell_notes:
        out += ([] if notes else [""]) + cell_notes
    seqs = seq_lines(report)
    if seqs:
        out += ["", *[f"latency {x}" for x in seqs]]
    noise = noise_lines(report)
    if noise:
        out += ["", *noise]
    return "\n".join(out)


def render_markdown(report: Report) -> str:
    """report.md: the results (or a causal LM's generation table), then one section per thing measured."""
    lines = [*_md_head(report), *_md_results(report)]
    for section in (_md_ranking, _md_seq, _md_model_changes, _md_parity, _md_notes, _md_noise, _md_passes):
        lines += section(report)
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    lines += ["", "## Machine", "", "```json", json.dumps(report.machine.model_dump(mode="json"), indent=2), "```",
              ""]
    return "\n".join(lines)


def _md_head(report: Report) -> list[str]:
    m = report.machine
    lines = [
        f"# {report.recipe.name}",
        "",
        f"Pipeline: `{report.recipe.pipeline}`  ",
        f"Created {report.created} in {report.seconds} s on {m.cpu.model} "
        f"({m.cpu.cores} cores, {', '.join(m.cpu.isa)}), {report.measurement.threads} threads.",
        "",
    ]
    if m.cpu.isa_forced:
        lines[-1:-1] = [f"ISA forced by {m.cpu.isa_forced_by or 'COMPRESS_ISA/COMPRESS_ARCH'} (this CPU has: "
                        f"{', '.join(m.cpu.isa_detected) or 'none'}); ISA-dependent choices follow the "
                        "forced ISA.  "]
    if m.profile is not None:
        lines[-1:-1] = [f"Built for hardware profile `{m.profile.name}` ({m.profile.arch or '?'}, "
                        f"{', '.join(m.profile.isa or []) or 'no optional ISA extensions'}): the passes and builds "
                        "followed it; every figure here was measured on the machine above, not on that device.  "]
    return lines


def _md_results(report: Report) -> list[str]:
    gen = generation_lines(report)
    if gen:  # a causal LM: one table of quality and generation speed (the latency table has no figures)
        return ["## Generation", "", gen[0], "", "```", *gen[1:], "```", ""]
    # One table for every variant on every target, so backends are read side by side.
    head, rows = table_rows(report)
    return ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows], ""]


def _md_ranking(report: Report) -> list[str]:
    from .ranking import ranking

    lines: list[str] = []
    for bkey in report.batches if not generation_lines(report) else []:
        ranked = ranking(report, bkey)
        if len(ranked) < 2:
            continue
        lines += [f"## Ranking at batch {bkey}", "", "p50 latency, fastest first; the ratio to the fastest and its 95% "
                  "interval come from the same interleaved rounds, paired round by round.", "",
                  "| # | variant | target | p50 ms | vs fastest | 95% interval |", "|---|---|---|---|---|---|"]
        for i, rk in enumerate(ranked, 1):
            lines.append(f"| {i} | {rk.variant} | {rk.target} | {rk.p50_ms:.3f} | "
                         f"{'fastest' if i == 1 else f'{rk.ratio:.2f}x'} | "
                         f"{'-' if i == 1 else f'[{rk.low:.2f}x, {rk.high:.2f}x]'} |")
        lines.append("")
    return lines


def _md_seq(report: Report) -> list[str]:
    seqs = seq_lines(report)
    return ["## Latency at other sequence lengths", "", *[f"- {x}" for x in seqs], ""] if seqs else []


def _md_model_changes(report: Report) -> list[str]:
    """What the passes did to the model, beside what it bought on each target (p50 vs baseline)."""
    models = {name: v.model for name, v in report.variants.items() if v.model.model_fields_set}
    if not models:
        return []
    lines = ["## Model changes vs latency", "",
             "| variant | params | MACs | weight sparsity | vs baseline (p50, 95% interval, every batch) |",
             "|---|---|---|---|---|"]
    for name, s in models.items():
        ups = [f"{r.target} b{b}: {x.text}" for r in report.results if r.variant == name
               for b, x in r.ratio_to_baseline.items()]
        macs = (f"{s.macs:,}" + (f" ({s.macs / s.macs_before:.2f}x)" if s.macs_before else "")
                if s.macs is not None else "-")
        sp = f"{100 * s.weight_sparsity:.1f}%" if s.weight_sparsity is not None else "-"
        params = f"{s.params:,}" if isinstance(s.params, int) else "-"
        lines.append(f"| {name} | {params} | {macs} | {sp} | {', '.join(ups) or '-'} |")
    return [*lines, ""]


def _md_parity(report: Report) -> list[str]:
    """Every compiled target against its input model, with the bound it was held to. INT8 cells are held to
    their simulated (Q/DQ) model; their top-1 on both sides is shown too."""
    checked = [r for r in report.results if r.parity]
    if not checked:
        return []
    lines = ["## Parity (each target vs its input model)", "",
             "| variant | target | precision | max abs diff | cosine | top-1 agreement | inputs | "
             "top-1 simulated -> deployed | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in checked:
        q = r.parity
        assert q is not None
        res = "ok" if q.ok else ("not checked" if q.ok is None else "**FAILED**")
        if q.flagged:
            res += " (**flagged**)"
        fig = (f"{q.max_abs_diff:.3g} | {q.cosine:.6f} | {100 * (q.agreement or 0.0):.1f}%"
               if q.cosine is not None and q.max_abs_diff is not None else "- | - | -")
        t1s, t1d = q.top1_simulated, q.top1_deployed
        top1 = (f"{'-' if t1s is None else f'{100 * t1s:.2f}%'} -> {'-' if t1d is None else f'{100 * t1d:.2f}%'}"
                if r.quant_parity is not None else "-")
        lines.append(f"| {r.variant} | {r.target} | {q.precision} | {fig} | "
                     f"{'-' if q.samples is None else q.samples} {q.inputs} | {top1} | {res} |")
    return [*lines, ""]


def _md_notes(report: Report) -> list[str]:
    cell_notes = [(r, n) for r in report.results for n in r.notes]
    if not cell_notes:
        return []
    return ["## Per-target notes", "", *[f"- {r.variant} / {r.target}: {n}" for r, n in cell_notes], ""]


def _md_noise(report: Report) -> list[str]:
    noise = noise_lines(report)
    cont = report.contention
    if not noise and not cont:
        return []
    lines = ["## Measurement noise and machine load", "", *[f"- {n}" for n in noise]]
    if cont is not None and cont.before is not None:
        b = cont.before
        lines.append(f"- before measuring: other processes used {b.others_cores} of {b.cpus} cores, "
                     f"steal {b.steal_pct}%")
    for label, d in ((cont.during or {}) if cont is not None else {}).items():
        lines.append(f"- while measuring {label}: others {d.others_cores} cores, this process "
                     f"{d.own_cores}, steal {d.steal_pct}%")
    lines += [f"- **{w}**" for w in (cont.warnings if cont is not None else [])]
    return [*lines, ""]


def _md_passes(report: Report) -> list[str]:
    lines = ["## Passes", ""]
    for name, v in report.variants.items():
        for step in v.steps:
            took = "(cache hit)" if step.cache_hit else f"{step.seconds:.2f} s"
            lines.append(f"- {name}: `{step.text}` {took}")
    return lines


def write_report(report: Report, out: Path) -> None:
    """Write the report files as one set (``reporting.report_files``): ``out`` ends up holding the whole new
    report (report.md, pareto.png, report.html, report.json), or stays as it was. json goes last where files
    are moved in one by one: it marks completion.

    report.json is ``report.to_json()``: the schema in docs/report.schema.json (``reporting.report_schema``)."""
    from ..core.lineage import lineage_files
    from .report_files import write_report_set

    md = render_markdown(report)
    js = json.dumps(report.to_json(), indent=2, default=str)
    html = render_html(report)
    write_report_set(out, [("report.md", lambda p: p.write_text(md)), ("pareto.png", lambda p: plot_pareto(report, p)),
                           ("latency.png", lambda p: plot_latency(report, p)), *lineage_files(report.lineage),
                           ("report.html", lambda p: p.write_text(html, encoding="utf-8")),
                           ("report.json", lambda p: p.write_text(js))], known_bytes=len(md) + len(js) + len(html))
