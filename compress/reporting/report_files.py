"""Writing a run's report files as one set: the output folder ends up holding either the whole new
report or the old folder as it was, never a new report.md beside an old report.json.

The files are written into a staging folder beside ``--out`` (same file system, so the final step is
a rename); only when every file is complete is the staging folder renamed into place:

* ``--out`` does not exist: the staging folder is renamed to it;
* ``--out`` holds nothing but report files (an earlier run's): it is renamed aside, the staging
  folder takes its name, and the old one is deleted; interrupted between the two renames, the old
  folder is put back;
* ``--out`` also holds files this tool did not write there (a search's trial folder keeps its probe
  runs beside the report; a user may point ``--out`` at a folder of their own), or is the current
  folder: nothing of theirs is moved. The finished files are renamed in one by one (each rename is
  atomic and needs no free space) with report.json last, as the mark of completion, and report files
  the new set lacks are removed.

What goes wrong while writing (a full disk, Ctrl-C, SIGTERM) removes the staging folder and leaves
``--out`` untouched. The measured figures are kept by the caller before any of this
(``compress.stages.pipeline``), so a failure here loses no measurement.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CompressError, InputError

# Every file a run's report set may hold; a folder holding only these is an earlier report, replaced whole.
REPORT_FILES = frozenset({"report.md", "report.html", "pareto.png", "latency.png", "lineage.json", "report.json"})
# A report set of a small run is ~0.2 MiB (mostly the plot); refusing below this is knowable before measuring.
MIN_FREE_BYTES = 2 * 1024 * 1024
PLOT_BYTES = 1024 * 1024  # room kept for the plot beside the text files' known sizes


def check_free_space(out: Path, need: int = MIN_FREE_BYTES, flag: str = "--out") -> None:
    """Refuse an output folder whose file system has less than ``need`` bytes free (usage error, exit 2)."""
    probe = Path(out).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # not knowable here (the write itself will still fail cleanly)
    if free < need:
        raise InputError(f"{flag} {out}: only {free // 1024} KiB free on its disk, and the report needs about "
                         f"{-(-need // 1024)} KiB; free disk space or choose another output folder")


def write_report_set(out: Path, files: Sequence[tuple[str, Callable[[Path], Any]]],
                     known_bytes: int = 0) -> None:
    """Write ``files`` (name, writer of that path) into ``out`` as one set (see the module doc).

    ``known_bytes`` is what the text files will take; with room for the plot it is checked against the
    free space before the first byte is written."""
    out = Path(out)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        check_free_space(out, known_bytes + PLOT_BYTES)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name or 'out'}.writing-", dir=parent))
        if out.is_dir():
            shutil.copymode(out, stage)  # the folder keeps its permissions when replaced
        else:  # mkdtemp makes it private; a report folder is made as mkdir would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(stage, 0o777 & ~umask)
    except OSError as e:
        raise _disk_error(out, e) from e
    try:
        for name, write in files:
            write(stage / name)
        _install(stage, out, [name for name, _ in files])
    except OSError as e:
        raise _disk_error(out, e) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already when it was renamed into place


def _disk_error(out: Path, e: OSError) -> CompressError:
    if e.errno == errno.ENOSPC:
        return CompressError(f"--out {out}: cannot write the report: {e.strerror}; the folder was left as it was; "
                             "free disk space and run the same command again")
    return CompressError(f"--out {out}: cannot write the report: {e.strerror or e}; the folder was left as it was")


def _install(stage: Path, out: Path, names: list[str]) -> None:
    if not out.exists() and not out.is_symlink():
        os.replace(stage, out)
        return
    here = Path.cwd()
    inside = out.resolve() == here or out.resolve() in here.parents  # renaming it would strand the shell in it
    ours = (out.is_dir() and not out.is_symlink() and not inside
            and all(p.name in REPORT_FILES for p in out.iterdir()))
    if not ours:  # somebody else's files are in there too: move ours in, report.json last
        for name in sorted(names, key=lambda n: n == "report.json"):
            os.replace(stage / name, out / name)
        for stale in REPORT_FILES - set(names):
            (out / stale).unlink(missing_ok=True)
        return
    old = stage.with_name(stage.name + ".old")
    try:
        os.replace(out, old)
        os.replace(stage, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # the old report back, whole
        raise
    shutil.rmtree(old, ignore_errors=True)
