"""SIGTERM handled as Ctrl-C is: CI cancelling a job, ``docker stop`` and ``timeout`` send SIGTERM, and a
run stopped that way deserves what an interrupted one gets (one line, no half-written work folders, a
rerun that resumes from the cache).

The handler raises :class:`Terminated`, a ``KeyboardInterrupt``, at the point the program is at, so
every cleanup written for Ctrl-C (``except KeyboardInterrupt``/``BaseException``: work folders of the
cache, staged report and bundle folders) runs for SIGTERM too. The CLI then exits 143 (128 + 15).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised where the program was, like Ctrl-C's KeyboardInterrupt)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once, cleanup or not
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated`; the previous handler is restored on leaving.
    Signal handlers belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
