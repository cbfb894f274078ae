"""Reports: report.json (versioned schema), report.md, pareto.png, and the terminal table."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .fidelity import headline as fidelity_headline
from .recipe import Recipe, recipe_to_toml

SCHEMA = "compress.report/v1"


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _pass_notes(metadata: dict[str, Any]) -> list[str]:
    notes = []
    for k, v in metadata.items():
        if isinstance(v, dict):
            notes += [f"{k}: {n}" for n in v.get("notes", [])]
    return notes


def model_summary(passes: dict[str, Any]) -> dict[str, Any]:
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
    return out


def build_report(rec: Recipe, variants: list[Any], cells: list[Any], data: Any, threads: int, auto_export: bool,
                 fingerprint: dict[str, Any], seconds: float, cache: Any) -> dict[str, Any]:
    notes: list[str] = []
    if data is None:
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
        notes.append("export.onnx was inserted automatically where the pipeline needed an ONNX model")
    if any(c.target == "onnxruntime" for c in cells):
        notes.append("ONNX Runtime measured with intra-op thread spinning off unless the target config says otherwise")
    vjson = {}
    for v in variants:
        last = v.onnx_art or v.torch_art
        meta = last.metadata if last is not None else {}
        passes_meta = {k: val for k, val in meta.items() if isinstance(val, dict)}
        vjson[v.name] = {
            "torch_digest": v.torch_art.digest if v.torch_art else None,
            "onnx_digest": v.onnx_art.digest if v.onnx_art else None,
            "steps": [s.to_json() for s in v.steps],
            "passes": passes_meta,
            "model": model_summary(passes_meta),
        }
        notes += [f"{v.name}: {n}" for n in _pass_notes(meta)]
    results = []
    for c in cells:
        results.append({
            "variant": c.variant, "target": c.target, "status": c.status, "reason": c.reason,
            "compiled_digest": c.compiled.digest if c.compiled else None,
            "compiled_path": str(c.compiled.path) if c.compiled else None, "target_config": c.config,
            "build_s": c.build_s, "build_cache_hit": c.cache_hit, "size_bytes": c.size_bytes,
            "accuracy_top1": c.accuracy, "fidelity": c.fidelity, "quant_parity": c.parity,
            "latency": c.latency, "notes": c.notes,
        })
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "recipe": {"name": rec.name, "pipeline": rec.pipeline_text(), "toml": recipe_to_toml(rec)},
        "machine": fingerprint,
        "measurement": {**rec.measure.model_dump(mode="json"), "threads": threads},
        "data": None if data is None else {
            "source": data.name, "labelled": data.labelled, "train": len(data.train), "calib": len(data.calib),
            "val": len(data.val), "digest": data.digest, "note": data.note},
        "variants": vjson,
        "results": results,
        "notes": notes,
        "seconds": round(seconds, 2),
        "cache": str(cache.root),
    }


def _lat(r: dict[str, Any], batch: str, key: str) -> float | None:
    v = r["latency"].get(batch, {}).get(key)
    return float(v) if v is not None else None


def table_rows(report: dict[str, Any], compare: bool = False) -> tuple[list[str], list[list[str]]]:
    """Rows of the results table. ``compare`` adds throughput and build time and names the baseline fp32."""
    batches = [str(b) for b in report["measurement"]["batch_sizes"]]
    b0 = batches[0]
    base_p50 = {r["target"]: _lat(r, b0, "p50_ms") for r in report["results"] if r["variant"] == "baseline"}
    head = ["variant", "target", "top-1", "fidelity", f"p50 ms (b{b0})", "p90", "p99", "cv", "vs base", "size"]
    if len(batches) > 1:
        head.append(f"p50 ms (b{batches[-1]})")
    if compare:
        head += [f"items/s (b{batches[-1]})", "build s"]
    head.append("status")
    rows = []
    for r in report["results"]:
        p50 = _lat(r, b0, "p50_ms")
        base = base_p50.get(r["target"])
        ratio = f"{base / p50:.2f}x" if p50 and base and r["variant"] != "baseline" else "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        cv = _lat(r, b0, "cv")
        row = [
            "fp32" if compare and r["variant"] == "baseline" else r["variant"], r["target"],
            f"{100 * r['accuracy_top1']:.2f}%" if r["accuracy_top1"] is not None else "not measured",
            fidelity_headline(r["fidelity"]),
            f"{p50:.3f}" if p50 is not None else "-",
            f"{_lat(r, b0, 'p90_ms'):.3f}" if p50 is not None else "-",
            f"{_lat(r, b0, 'p99_ms'):.3f}" if p50 is not None else "-",
            f"{100 * cv:.1f}%" if cv is not None else "-",
            ratio, _fmt_size(r["size_bytes"]),
        ]
        if len(batches) > 1:
            pl = _lat(r, batches[-1], "p50_ms")
            row.append(f"{pl:.3f}" if pl is not None else "-")
        if compare:
            tp = _lat(r, batches[-1], "throughput")
            row += [f"{tp:.1f}" if tp is not None else "-",
                    f"{r['build_s']:.2f}" if r["build_s"] is not None else "-"]
        row.append(status)
        rows.append(row)
    return head, rows


def render_text(report: dict[str, Any], compare: bool = False) -> str:
    head, rows = table_rows(report, compare)
    if compare:  # unavailable targets go below the table, once each, with the reason
        gone = {r[1]: r[-1] for r in rows if r[-1].startswith("unavailable")}
        gone.update({f"{r[0]}/{r[1]}": r[-1] for r in rows if r[-1].startswith("skipped")})
        rows = [r for r in rows if not r[-1].startswith(("unavailable", "skipped"))]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if compare and gone:
        out += ["", *[f"{t}: {why}" for t, why in gone.items()]]
    if report["notes"]:
        out += ["", *[f"note: {n}" for n in report["notes"]]]
    cell_notes = [f"note: {r['variant']}/{r['target']}: {n}" for r in report["results"] for n in r.get("notes", [])]
    if cell_notes:
        out += ([] if report["notes"] else [""]) + cell_notes
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    head, rows = table_rows(report)
    m = report["machine"]
    lines = [
        f"# {report['recipe']['name']}",
        "",
        f"Pipeline: `{report['recipe']['pipeline']}`  ",
        f"Created {report['created']} in {report['seconds']} s on {m['cpu']['model']} "
        f"({m['cpu']['cores']} cores, {', '.join(m['cpu']['isa'])}), {report['measurement']['threads']} threads.",
        "",
    ]
    if m["cpu"].get("isa_forced"):
        lines[-1:-1] = [f"ISA forced by COMPRESS_ISA/COMPRESS_ARCH (this CPU has: "
                        f"{', '.join(m['cpu'].get('isa_detected', [])) or 'none'}); ISA-dependent choices follow the "
                        "forced ISA.  "]
    for target in dict.fromkeys(r["target"] for r in report["results"]):
        sub = [row for row in rows if row[1] == target]
        lines += [f"## {target}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in sub]
        lines.append("")
    models = {name: v.get("model") for name, v in report["variants"].items() if v.get("model")}
    if models:
        # What the passes did to the model, beside what it bought on each target (p50 vs baseline).
        b0 = str(report["measurement"]["batch_sizes"][0])
        base = {r["target"]: _lat(r, b0, "p50_ms") for r in report["results"] if r["variant"] == "baseline"}
        lines += ["## Model changes vs latency", "",
                  "| variant | params | MACs | weight sparsity | speed-up vs baseline (p50) |", "|---|---|---|---|---|"]
        for name, s in models.items():
            ups = []
            for r in report["results"]:
                p50, b = _lat(r, b0, "p50_ms"), base.get(r["target"])
                if r["variant"] == name and p50 and b:
                    ups.append(f"{r['target']} {b / p50:.2f}x")
            macs = (f"{s['macs']:,}" + (f" ({s['macs'] / s['macs_before']:.2f}x)" if s.get("macs_before") else "")
                    if "macs" in s else "-")
            sp = f"{100 * s['weight_sparsity']:.1f}%" if "weight_sparsity" in s else "-"
            params = f"{s['params']:,}" if isinstance(s.get("params"), int) else "-"
            lines.append(f"| {name} | {params} | {macs} | {sp} | {', '.join(ups) or '-'} |")
        lines.append("")
    cell_notes = [(r, n) for r in report["results"] for n in r.get("notes", [])]
    parity = [r for r in report["results"] if r.get("quant_parity")]
    if parity:
        lines += ["## Quantized: deployed vs simulated", "",
                  "| variant | target | agreement | cosine | top-1 simulated | top-1 deployed | flagged |",
                  "|---|---|---|---|---|---|---|"]
        for r in parity:
            q = r["quant_parity"]
            t1s, t1d = q.get("top1_simulated"), q.get("top1_deployed")
            agr = "-" if q.get("agreement") is None else f"{100 * q['agreement']:.1f}%"
            lines.append(f"| {r['variant']} | {r['target']} | {agr} | {q['cosine']:.4f} | "
                         f"{'-' if t1s is None else f'{100 * t1s:.2f}%'} | "
                         f"{'-' if t1d is None else f'{100 * t1d:.2f}%'} | {'**yes**' if q['flagged'] else 'no'} |")
        lines.append("")
    if cell_notes:
        lines += ["## Per-target notes", "", *[f"- {r['variant']} / {r['target']}: {n}" for r, n in cell_notes], ""]
    lines += ["## Passes", ""]
    for name, v in report["variants"].items():
        for s in v["steps"]:
            took = "(cache hit)" if s["cache_hit"] else f"{s['seconds']:.2f} s"
            lines.append(f"- {name}: `{s['text']}` {took}")
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    lines += ["", "## Machine", "", "```json", json.dumps(m, indent=2), "```", ""]
    return "\n".join(lines)


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b0 = str(report["measurement"]["batch_sizes"][0])
    use_acc = any(r["accuracy_top1"] is not None for r in report["results"])
    pts = []
    for r in report["results"]:
        p50 = _lat(r, b0, "p50_ms")
        fid = r["fidelity"] or {}
        y = r["accuracy_top1"] if use_acc else fid.get("agreement", fid.get("cosine_mean"))
        if p50 is None or y is None:
            continue
        pts.append((p50, 100 * y, r["variant"], r["target"]))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = {t: plt.cm.tab10(i) for i, t in enumerate(dict.fromkeys(p[3] for p in pts))}  # type: ignore[attr-defined]
    for p50, y, v, t in pts:
        base = v == "baseline"
        ax.scatter(p50, y, marker="s" if base else "o", s=80, edgecolors="black", color=colors[t], zorder=3,
                   alpha=0.6 if base else 1.0)
        ax.annotate(f"{v} / {t}", (p50, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.margins(x=0.3, y=0.12)
    front: list[tuple[Any, ...]] = []
    for p in sorted(pts):
        if not front or p[1] > front[-1][1]:
            front.append(p)
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:orange", zorder=2,
                label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(f"p50 latency, batch {b0} (ms)")
    ax.set_ylabel("top-1 accuracy (%)" if use_acc else "fidelity to original (%: agreement, or 100 x cosine)")
    ax.set_title(f"{report['recipe']['name']}: accuracy vs latency (squares: baseline)")
    ax.grid(alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write the three report files; each appears whole or not at all. json goes last: it marks completion."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "report.md", lambda p: p.write_text(render_markdown(report)))
    _atomic_write(out / "pareto.png", lambda p: plot_pareto(report, p))
    _atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2, default=str)))
