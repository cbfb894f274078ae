"""The recorded baselines of ``compress check --update-baseline``: per machine fingerprint, each cell's
latency samples and its kept compiled artifact, so a later check re-times the same build beside the
candidate (paired) and falls back to the recorded numbers only when the artifact is gone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.artifact import sha256_json
from ..errors import InputError
from .budget_spec import BudgetSpec, parse_limit

# ----------------------------------------------------------------- baselines


def fingerprint_key(machine: dict[str, Any], threads: int | str) -> str:
    """Baselines match on the CPU, libraries and the *thread setting* ("auto" for 0: the count a
    run picks under load may differ, and both sides of a re-timed comparison use the same)."""
    cpu = machine["cpu"]
    return sha256_json({"cpu": cpu["model"], "isa": cpu["isa"], "cores": cpu["affinity_cores"], "threads": threads,
                        "libs": machine["libraries"], "gpu": machine.get("gpu")})


class BaselineStore:
    """Recorded measurements keyed by model, variant, target, batch and machine fingerprint."""

    SCHEMA = "compress.baseline/v1"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        if path.exists():
            try:
                d = json.loads(path.read_text())
                if d.get("schema") != self.SCHEMA or not isinstance(d.get("entries"), dict):
                    raise ValueError(f"schema is {d.get('schema')!r}, expected {self.SCHEMA!r}")
                self.entries = d["entries"]
            except (ValueError, AttributeError) as e:
                raise InputError(f"{path}: baseline file is corrupt ({e}); refusing to use or overwrite it. "
                                 "Fix it, or move it away and run with --update-baseline") from e

    @staticmethod
    def key(model: str, variant: str, target: str, batch: int | str, fp: str) -> str:
        # batch: a batch size, or a report's latency key ("1", "1/s128")
        return f"{model}|{variant}|{target}|b{batch}|{fp}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry

    @property
    def artifact_dir(self) -> Path:
        """Baseline artifacts live beside the baseline file (commit both), one folder per digest."""
        return self.path.with_name(self.path.name.removesuffix(".json") + ".artifacts")

    def keep_artifact(self, compiled: Path) -> dict[str, str] | None:
        """Copy a compiled artifact into the baseline folder; return where and its content hash."""
        from ..core.artifact import Artifact, sha256_files

        try:
            art = Artifact.load(compiled)
        except (OSError, ValueError, KeyError):
            return None
        dest = self.artifact_dir / art.digest
        if not dest.exists():
            tmp = self.artifact_dir / f".tmp-{art.digest}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(compiled, tmp)
            tmp.replace(dest)
        return {"dir": art.digest, "files_sha256": sha256_files(dest)}

    def load_artifact(self, entry: dict[str, Any]) -> tuple[Any, str | None]:
        """The stored artifact of an entry, verified against its recorded content hash, or why not."""
        from ..core.artifact import Artifact, sha256_files

        info = entry.get("artifact")
        if not info:
            return None, "the baseline was recorded before artifacts were kept (numbers only)"
        d = self.artifact_dir / info["dir"]
        if not d.is_dir():
            return None, f"the baseline artifact {d} is gone"
        if sha256_files(d) != info["files_sha256"]:
            return None, f"the baseline artifact {d} changed on disk (content hash differs); not used"
        try:
            return Artifact.load(d), None
        except (OSError, ValueError, KeyError) as e:
            return None, f"the baseline artifact {d} is unreadable ({e})"

    def references(self, model: str, rec: Any, budgets: list[BudgetSpec], fp: str,
                   say: Callable[[str], None]) -> dict[str, Any]:
        """Stored baseline artifacts that 'x recorded' budgets need, by target, to re-time in this run."""
        out: dict[str, Any] = {}
        for b in budgets:
            if b.max is None or b.metric is None or b.target in out or \
                    parse_limit(b.max, b.metric, b.title()).ratio_to != "recorded":
                continue
            variant = b.variant or (rec.name if rec.passes else "baseline")
            entry = self.get(self.key(model, variant, b.target, b.latency_key(), fp))
            if entry is None:
                continue
            art, why = self.load_artifact(entry)
            if art is None:
                entry["artifact_missing"] = why
                say(f"recorded baseline for {model}/{variant}/{b.target}: {why}; falling back to recorded numbers")
            else:
                out[b.target] = art
        return out

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"schema": self.SCHEMA, "entries": self.entries}, indent=1, sort_keys=True))
        tmp.replace(self.path)


