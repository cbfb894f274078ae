"""Valid reports built from a few figures, for tests of what reads a report (the budget gate, the plots).

Every record goes through the same schema as a real run's (``compress.reporting.report_schema``), so a test
cannot hand a reader a shape the writer would never produce.
"""

from __future__ import annotations

from typing import Any

from compress.measuring.measure import summarize
from compress.reporting.report_schema import SCHEMA, Report


def latency(samples_ms: list[float], batch: int = 1, **extra: Any) -> dict[str, Any]:
    """One batch's latency record, summarised from the samples as a run does."""
    n = len(samples_ms)
    timing = {"order": {"method": "balanced-shuffle", "seed": batch, "candidates": ["x"], "rounds": [[0]] * n},
              "warmup": {"x": 0}, "capped": {}, "stopped": "test", "seconds": 0.0, "rounds": n}
    return {**summarize(samples_ms, batch).model_dump(), "samples_ms": samples_ms, "timing": timing, **extra}


def cell(variant: str, target: str, *, status: str = "ok", reason: str | None = None, digest: str | None = None,
         size: int | None = 1000, acc: float | None = None, lat: dict[str, dict[str, Any]] | None = None,
         **extra: Any) -> dict[str, Any]:
    return {"variant": variant, "target": target, "status": status, "reason": reason,
            "compiled_digest": digest if digest is not None else f"{variant}/{target}",
            "compiled_path": None, "target_config": {"kind": target}, "build_s": 0.0, "build_cache_hit": False,
            "size_bytes": size, "accuracy_top1": acc, "fidelity": None, "parity": None, "quant_parity": None,
            "latency": lat or {}, "notes": [], "identical_to": None, "ratio_to_baseline": {},
            "reference": variant == "recorded", **extra}


def make_report(results: list[dict[str, Any]], batch_sizes: list[int] | None = None, name: str = "t") -> Report:
    variants = {r["variant"]: {"torch_digest": None, "onnx_digest": None, "steps": [], "passes": {}, "model": {}}
                for r in results}
    return Report.model_validate({
        "schema": SCHEMA, "created": "2026-01-01T00:00:00+00:00",
        "recipe": {"name": name, "pipeline": "-> onnxruntime", "toml": ""},
        "machine": {"cpu": {"model": "test", "arch": "x86_64", "cores": 2, "affinity_cores": 2, "isa": [],
                            "isa_detected": [], "isa_forced": False},
                    "os": "test", "python": "3", "libraries": {}, "gpu": None},
        "measurement": {"batch_sizes": batch_sizes or [1], "threads": 1, "threads_setting": 1},
        "data": None, "variants": variants, "results": results, "notes": [], "contention": None, "noise": [],
        "seconds": 0.0, "cache": ".compress-cache"})
