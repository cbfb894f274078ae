"""Content-addressed cache of pass outputs.

Each entry is keyed by the full SHA-256 of (input digest, pass kind, pass
version, canonical config, library versions[, target fingerprint]). Because the
input digest is the parent's content digest, a changed early pass changes every
key after it and nothing else. Entries are built in ``tmp/`` and renamed into
``objects/<key>`` only once complete (with a ``COMPLETE`` marker written
before the rename), so a run killed at any point leaves either a whole entry or
none, and the next run resumes from the last finished step.

Every entry is verified before it is served: the ``COMPLETE`` marker records a
SHA-256 over the entry's files (metadata included), and ``get`` recomputes it
(one streaming pass). An entry whose bytes changed on disk, or that holds anything
but folders and regular files (a symbolic link, a FIFO), is never used: it is
discarded, a note says so, and the caller rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CacheError
from .artifact import Artifact, sha256_files, sha256_json
from .versions import library_versions

MARKER = "COMPLETE"
MARKER_FORMAT = 2  # the marker is JSON with the content digest (format 1 held only the artifact digest)
def default_cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", ".compress-cache"))


def content_digest(entry: Path) -> str:
    """SHA-256 over an entry's file names and bytes, the marker excluded (metadata included: an edited
    ``artifact.json`` changes what a hit would report, so it counts as corruption too)."""
    return sha256_files(entry, exclude=(MARKER,))


def not_plain(entry: Path) -> str | None:
    """Why an entry is not what this cache writes (folders and regular files only), or None. A symbolic link is
    never written here: one found (to a file outside, to /etc) would make a hit serve bytes the recorded digest
    does not cover, or that change after the check; a FIFO or device would hang or leak a read."""
    if entry.is_symlink():
        return f"it is a symbolic link (to {os.readlink(entry)}), not a folder this cache wrote"
    for root, dirs, files in os.walk(entry):  # does not descend into linked folders
        for name in [*dirs, *files]:
            p = Path(root) / name
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                return (f"it holds a symbolic link ({p.relative_to(entry)} -> {os.readlink(p)}), which this cache "
                        "never writes")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return f"it holds {p.relative_to(entry)}, which is not a regular file"
    return None


class Cache:
    """A directory of finished artifacts keyed by SHA-256."""

    def __init__(self, root: Path | None = None, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        # What verification found this session (discarded entries); runs copy them into their report.
        self.notes: list[str] = []
        # Evaluations this session read from or wrote to <root>/evaluations (compress.quality.eval_cache); a run
        # records them in its lineage (compress.core.lineage).
        self.evaluations: list[dict[str, Any]] = []
        self.log = log
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

    def verify_entry(self, entry: Path) -> str | None:
        """Why a finished entry cannot be trusted, or None when its content matches its recorded digest."""
        odd = not_plain(entry)
        if odd is not None:
            return odd
        try:
            marker = json.loads((entry / MARKER).read_text())
        except (OSError, ValueError):
            marker = None
        if not isinstance(marker, dict) or not isinstance(marker.get("content_sha256"), str):
            return "it records no content digest (written by an older version of this tool)"
        got = content_digest(entry)
        if got != marker["content_sha256"]:
            return (f"its content (sha256 {got[:16]}...) no longer matches the digest recorded when it was written "
                    f"({marker['content_sha256'][:16]}...)")
        return None

    def _discard(self, entry: Path, problem: str) -> None:
        """Remove an entry that failed verification, with a note; refuse (CacheError) if it cannot be removed."""
        producer = "?"
        try:
            producer = str(json.loads((entry / "artifact.json").read_text()).get("producer") or "?")
        except (OSError, ValueError, AttributeError):
            pass
        try:
            # Renamed out of objects/ first, so no other reader can pick it up half-deleted.
            grave = Path(tempfile.mkdtemp(prefix="corrupt-", dir=self.tmp))
            os.replace(entry, grave / entry.name)
            shutil.rmtree(grave, ignore_errors=True)
        except OSError as e:
            raise CacheError(f"cache entry {entry} failed verification ({problem}) and could not be removed ({e}); "
                             "delete it and run again") from e
        note = (f"cache entry {entry.name[:16]} ({producer}) was not used: {problem}; it was discarded and rebuilt")
        self.notes.append(note)
        if self.log is not None:
            self.log(f"WARNING {note}")

    def get(self, key: str) -> Artifact | None:
        """The finished entry for ``key``, verified against its recorded content digest; None to (re)build."""
        entry = self.objects / key
        if not (entry / MARKER).exists():
            return None
        problem = self.verify_entry(entry)
        if problem is not None:
            self._discard(entry, problem)
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
        marker = {"format": MARKER_FORMAT, "digest": art.digest, "content_sha256": content_digest(art.path)}
        (art.path / MARKER).write_text(json.dumps(marker, sort_keys=True))
        dest = self.objects / key
        if dest.exists():  # a previous crashed or concurrent run left one; ours is equivalent
            if (dest / MARKER).exists() and self.verify_entry(dest) is None:
                shutil.rmtree(art.path, ignore_errors=True)
                out = Artifact.load(dest)
                out.obj = art.obj
                return out
            if dest.is_symlink():
                dest.unlink()
            else:
                shutil.rmtree(dest)
        os.replace(art.path, dest)
        art.path = dest
        return art

    def clean_tmp(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
