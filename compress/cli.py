"""The ``compress`` command line (each command's code is in ``compress.commands``).

Exit codes: 0 success; 1 a failure while running (export, build, pass error);
2 a usage error (bad recipe, unknown pass/target, missing or unsafe input file);
130 interrupted (finished steps are cached; run again to resume); 143 terminated by SIGTERM (the same).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Sequence

from .commands.parser import build_parser
from .errors import CompressError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _one_line(msg: str, debug: bool) -> str:
    """An error as one line without terminal colour codes; --debug keeps every line."""
    msg = _ANSI.sub("", msg).strip()
    if debug:
        return msg
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "(no message)"
    return f"{lines[0]} (more with --debug)"


# Which module and function run each built-in command (imported on use: --help stays cheap).
_COMMANDS = {"run": ("run_cmd", "cmd_run"), "check": ("gate_cmd", "cmd_check"), "history": ("gate_cmd", "cmd_history"),
             "compare": ("compare_cmd", "cmd_compare"), "search": ("search_cmd", "cmd_search"),
             "export": ("export_cmd", "cmd_export"), "profiles": ("listing_cmd", "cmd_profiles"),
             "targets": ("listing_cmd", "cmd_targets"), "passes": ("listing_cmd", "cmd_passes"),
             "generate": ("generate_cmd", "run")}


def _dispatch(a: argparse.Namespace) -> int:
    import importlib

    if getattr(a, "_plugin", None):  # a command a plugin registered
        module, function = a._plugin
        return int(getattr(importlib.import_module(module), function)(a))
    module, function = _COMMANDS[a.cmd]
    return int(getattr(importlib.import_module(f"{__package__}.commands.{module}"), function)(a))


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    if not a.cmd:
        p.print_help()
        return 2
    if a.debug:
        import logging

        # Read by parts that keep a library's own console output out of the way unless asked (TVM tuning).
        logging.getLogger("compress").setLevel(logging.DEBUG)
    from .core.interrupts import EXIT_SIGTERM, Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return _dispatch(a)
    except CompressError as e:
        if a.debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(e), a.debug)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("terminated (SIGTERM): finished steps are cached; run the same command again to resume",
                  file=sys.stderr)
            return EXIT_SIGTERM
        print("interrupted: finished steps are cached; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as e:  # an unexpected bug: still one line unless --debug
        if a.debug:
            traceback.print_exc()
        else:
            print(f"error: unexpected {type(e).__name__}: {_one_line(str(e), False)} (rerun with --debug for the "
                  "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
