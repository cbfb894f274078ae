"""The error hierarchy. Every message says what was wrong, where, and what to do.

The CLI maps these to one line and an exit code: usage errors (bad recipe, bad
arguments) exit 2, failures while running exit 1.
"""

from __future__ import annotations


class CompressError(Exception):
    """Base of every error this tool raises on purpose."""

    exit_code: int = 1


class RecipeError(CompressError):
    """The recipe, pipeline text or CLI arguments are invalid (a usage error)."""

    exit_code = 2


class PassError(CompressError):
    """A pass failed while running."""


class ExportError(CompressError):
    """Lowering to ONNX failed or did not match PyTorch numerically."""


class TargetUnavailable(CompressError):
    """A target cannot run on this machine (library missing, no device)."""


class BuildError(CompressError):
    """Compiling for a target failed."""


class AccuracyError(CompressError):
    """Accuracy or fidelity fell outside what the user allowed."""


class BudgetExceeded(CompressError):
    """A latency/size/accuracy budget was broken."""


class CacheError(CompressError):
    """The cache is unreadable or inconsistent (the user deletes the entry named, or picks another cache)."""

    exit_code = 2


class InputError(CompressError):
    """A model, data or checkpoint file is missing, unsafe or malformed."""

    exit_code = 2
