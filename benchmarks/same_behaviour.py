"""Did a refactor change what a run produces? Compare two report.json of the same recipe (before, after).

Deterministic figures must be identical: each cell's status, compiled model digest, size, accuracy, fidelity and
parity (each variant's exported ONNX digest is shown, not judged: torch.onnx records source paths in it).
Latency ratios are measurements: their intervals must overlap.

usage: python benchmarks/same_behaviour.py BEFORE/report.json AFTER/report.json [--md OUT.md]
Exit 0: the same behaviour; 1: a deterministic figure differs or two intervals do not overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DETERMINISTIC = ("status", "compiled_digest", "size_bytes", "accuracy_top1")


def _cells(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["variant"], c["target"]): c for c in report["results"]}


def _parity(c: dict[str, Any]) -> Any:
    p = c.get("parity") or {}
    return {k: p.get(k) for k in ("ok", "max_abs_diff", "cosine", "agreement", "precision") if k in p}


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], bool]:
    rows = ["| cell | field | before | after | same |", "|---|---|---|---|---|"]
    same = True
    a_cells, b_cells = _cells(before), _cells(after)
    if set(a_cells) != set(b_cells):
        rows.append(f"| (cells) | set | {sorted(a_cells)} | {sorted(b_cells)} | no |")
        same = False
    for key in sorted(set(a_cells) & set(b_cells)):
        x, y = a_cells[key], b_cells[key]
        name = "/".join(key)
        checks = [(f, x.get(f), y.get(f)) for f in DETERMINISTIC]
        checks += [("fidelity", x.get("fidelity"), y.get("fidelity")), ("parity", _parity(x), _parity(y))]
        for field, u, v in checks:
            ok = u == v
            same &= ok
            if field in ("fidelity", "parity") and ok:
                u = v = "equal"
            rows.append(f"| {name} | {field} | {u} | {v} | {'yes' if ok else 'NO'} |")
        for batch in sorted(set(x.get("ratio_to_baseline") or {}) & set(y.get("ratio_to_baseline") or {})):
            r, s = x["ratio_to_baseline"][batch], y["ratio_to_baseline"][batch]
            if "low" in r and "low" in s:
                ok = r["low"] <= s["high"] and s["low"] <= r["high"]
                same &= ok
                rows.append(f"| {name} | ratio@{batch} | {r['ratio']:.2f}x [{r['low']:.2f}, {r['high']:.2f}] | "
                            f"{s['ratio']:.2f}x [{s['low']:.2f}, {s['high']:.2f}] | "
                            f"{'overlap' if ok else 'NO overlap'} |")
    # A variant's exported ONNX carries torch.onnx's node metadata (the Python class path of each module; up to
    # c6b946a also a stack trace with the source file's path), so moving a module changes its digest while graph
    # and weights stay the same: shown, not judged. The compiled digests above are judged.
    for variant in sorted(set(before.get("variants", {})) & set(after.get("variants", {}))):
        u, v = before["variants"][variant].get("onnx_digest"), after["variants"][variant].get("onnx_digest")
        rows.append(f"| {variant} | onnx_digest (info) | {u} | {v} | {'yes' if u == v else 'differs'} |")
    return rows, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--md", type=Path, help="also write the table here")
    a = ap.parse_args()
    rows, same = compare(json.loads(a.before.read_text()), json.loads(a.after.read_text()))
    text = "\n".join(rows) + f"\n\n{'same behaviour' if same else 'BEHAVIOUR CHANGED'}\n"
    print(text)
    if a.md:
        a.md.write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
