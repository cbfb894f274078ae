"""The produced model files of each variant and target, reachable from the run folder: ``artifacts/VARIANT/
TARGET`` links to the compiled artifact in the content-addressed cache (a copy where links cannot be made),
so ``runs/NAME/artifacts/digits/onnxruntime/model.onnx`` is the file a user looks for; report.json names
each folder (``results[].artifact_dir``, relative to the run folder). ``artifacts/VARIANT/onnx`` is the
portable ONNX model every target compiled from (a target's build may hold layout-specific operators)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FOLDER = "artifacts"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in name) or "_"


def assign_artifact_dirs(cells: list[Any]) -> None:
    """Set each measured cell's ``artifact_dir`` (``artifacts/VARIANT/TARGET``, relative to the run folder) for
    the report; the links are made by :func:`link_artifacts` once the report is in place."""
    for c in cells:
        if c.compiled is not None and not c.reference:
            c.artifact_dir = str(Path(FOLDER) / _safe(c.variant) / _safe(c.target))


def link_artifacts(cells: list[Any], out: Path, variants: Sequence[Any] = ()) -> None:
    """Link each measured cell's compiled artifact into ``out/artifacts/VARIANT/TARGET`` (its ``artifact_dir``);
    each variant's ONNX model goes to ``out/artifacts/VARIANT/onnx``. A link left by an earlier run is
    replaced. Called after the report set is written, so a failed report write leaves ``out`` as it was."""
    for v in variants:
        if v.onnx_art is not None:
            _link(Path(v.onnx_art.path), out / FOLDER / _safe(v.name) / "onnx")
    for c in cells:
        if c.compiled is None or c.reference:
            continue
        if not c.artifact_dir:
            assign_artifact_dirs([c])
        _link(Path(c.compiled.path), out / c.artifact_dir)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        tmp.symlink_to(src.resolve(), target_is_directory=True)
    except OSError:  # no symlinks on this filesystem: a copy
        shutil.copytree(src, tmp)
    _remove(dst)
    os.replace(tmp, dst)


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)
