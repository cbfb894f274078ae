"""One-line warnings from parts that carry on (a plugin left out, a profile file skipped): ``warning: ...`` on
stderr, the CLI's one-line format, once per process, never a Python ``UserWarning`` (two lines, and filtered
or turned into errors by the caller's warning settings)."""

from __future__ import annotations

import sys

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
