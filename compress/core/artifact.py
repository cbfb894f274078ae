"""Artifacts: what flows between passes.

An artifact is a directory of files plus metadata. Its digest is a SHA-256 over
its content (file names and bytes, or for torch models the state tensors and the
recipe for rebuilding the module), so two runs that make the same model agree
on its digest and the cache can key on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .capabilities import Facts

ArtifactKind = Literal["pytorch", "onnx", "compiled"]
PYTORCH: Literal["pytorch"] = "pytorch"
ONNX: Literal["onnx"] = "onnx"
COMPILED: Literal["compiled"] = "compiled"


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape (first dim is the batch) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    # Integer inputs: valid values are 0 .. high-1 (the vocabulary size for token ids, 2 for masks),
    # so synthetic inputs (parity, calibration without data) stay in range.
    high: int | None = None
    # Axes (besides the batch) whose length may change between calls, e.g. {1: "seq"}.
    dynamic_axes: tuple[tuple[int, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.high is not None:
            d["high"] = self.high
        if self.dynamic_axes:
            d["dynamic_axes"] = {str(k): v for k, v in self.dynamic_axes}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        return cls(name=str(d["name"]), shape=tuple(int(s) for s in d["shape"]), dtype=str(d.get("dtype", "float32")),
                   high=int(d["high"]) if d.get("high") is not None else None,
                   dynamic_axes=tuple((int(k), str(v)) for k, v in (d.get("dynamic_axes") or {}).items()))


@dataclass
class Artifact:
    """A model at one point of the pipeline.

    ``path`` is a directory owned by the artifact (inside the cache once
    finished). ``metadata`` is JSON-serialisable; passes add to it under their
    own key (free-form notes for the report); ``facts`` is the typed record consumers must honour
    (None when a pass leaves them as its input's: the manager then copies them). ``obj``
    optionally holds the live in-memory object (an ``nn.Module`` for PyTorch artifacts) so
    chained passes avoid a reload; it is never part of the digest.
    """

    kind: ArtifactKind
    path: Path
    digest: str
    inputs: tuple[InputSpec, ...]
    parent: str | None = None
    producer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    facts: Facts | None = None
    obj: Any = field(default=None, repr=False, compare=False)

    def file(self, name: str) -> Path:
        return self.path / name

    def size_bytes(self) -> int:
        """Bytes on disk of the artifact's model files (metadata excluded)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and p.name != META_FILE)

    def known_facts(self) -> Facts:
        """The artifact's facts (the defaults for one made outside the pass manager)."""
        return self.facts if self.facts is not None else Facts()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "facts": self.known_facts().to_json(),
            "digest": self.digest,
            "inputs": [s.to_json() for s in self.inputs],
            "parent": self.parent,
            "producer": self.producer,
            "metadata": self.metadata,
        }

    def save_meta(self) -> None:
        (self.path / META_FILE).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True, default=str))

    @classmethod
    def load(cls, path: Path) -> Artifact:
        d = json.loads((path / META_FILE).read_text())
        return cls(
            kind=d["kind"],
            path=path,
            digest=d["digest"],
            inputs=tuple(InputSpec.from_json(s) for s in d["inputs"]),
            parent=d.get("parent"),
            producer=d.get("producer"),
            metadata=d.get("metadata", {}),
            facts=Facts.model_validate(d.get("facts") or {}),
        )


META_FILE = "artifact.json"


def _update_from_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    """SHA-256 of one file's bytes (e.g. a native library or engine, checked before loading)."""
    h = hashlib.sha256()
    _update_from_file(h, path)
    return h.hexdigest()


def sha256_files(path: Path, exclude: tuple[str, ...] = (META_FILE,)) -> str:
    """SHA-256 over relative file names and bytes, in sorted order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in exclude)
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        h.update(b"\0")
        _update_from_file(h, p)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
