"""Content-addressed cache of pass outputs.

Each entry is keyed by the full SHA-256 of (input digest, pass kind, pass
version, canonical config, library versions[, target fingerprint]). Because the
input digest is the parent's content digest, a changed early pass changes every
key after it and nothing else. Entries are built in ``tmp/`` and renamed into
``objects/<key>`` only once complete (with a ``COMPLETE`` marker written
before the rename), so a run killed at any point leaves either a whole entry or
none, and the next run resumes from the last finished step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from .artifact import Artifact, sha256_json
from .errors import CacheError

MARKER = "COMPLETE"
# Libraries whose version can change what a pass produces; all are part of every key.
_KEY_LIBS = (
    "compress-pipeline", "torch", "onnx", "onnxruntime", "onnxscript", "numpy",
    "torch-pruning", "nncf", "apache-tvm", "apache-tvm-ffi", "tensorrt", "scikit-learn",
)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {}
    for name in _KEY_LIBS:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", ".compress-cache"))


class Cache:
    """A directory of finished artifacts keyed by SHA-256."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache at {self.root}: {e}; set COMPRESS_CACHE or --cache") from e
        self._sweep_tmp()

    def _sweep_tmp(self, older_than_s: float = 24 * 3600) -> None:
        """Remove work dirs left by runs killed more than a day ago (never a live run's)."""
        now = time.time()
        for d in self.tmp.iterdir():
            try:
                if now - d.stat().st_mtime > older_than_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                continue

    @staticmethod
    def key(parent_digest: str, step: str, version: int, config: dict[str, Any],
            extra: dict[str, Any] | None = None) -> str:
        return sha256_json({
            "parent": parent_digest,
            "step": step,
            "version": version,
            "config": config,
            "libs": library_versions(),
            "extra": extra or {},
        })

    def new_dir(self, prefix: str = "work") -> Path:
        """A fresh private directory for a step to write into."""
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.tmp))

    def get(self, key: str) -> Artifact | None:
        entry = self.objects / key
        if not (entry / MARKER).exists():
            return None
        try:
            return Artifact.load(entry)
        except (OSError, ValueError, KeyError) as e:
            raise CacheError(f"cache entry {entry} is unreadable ({e}); delete it and run again") from e

    def put(self, key: str, art: Artifact) -> Artifact:
        """Move a finished artifact's directory into the cache atomically."""
        if art.path.parent != self.tmp:
            # Artifacts made outside our tmp dir are copied in first so the rename stays atomic.
            staged = self.new_dir("stage")
            shutil.copytree(art.path, staged, dirs_exist_ok=True)
            art.path = staged
        art.save_meta()
        (art.path / MARKER).write_text(art.digest)
        dest = self.objects / key
        if dest.exists():  # a previous crashed or concurrent run left one; ours is equivalent
            if (dest / MARKER).exists():
                shutil.rmtree(art.path, ignore_errors=True)
                out = Artifact.load(dest)
                out.obj = art.obj
                return out
            shutil.rmtree(dest)
        os.replace(art.path, dest)
        art.path = dest
        return art

    def clean_tmp(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
