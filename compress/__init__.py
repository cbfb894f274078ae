"""compress: make a trained PyTorch model small and fast on a device, and prove it stayed accurate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .artifact import Artifact, InputSpec
from .errors import (
    AccuracyError,
    BudgetExceeded,
    BuildError,
    CacheError,
    CompressError,
    ExportError,
    InputError,
    PassError,
    RecipeError,
    TargetUnavailable,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import apply as apply


def __getattr__(name: str) -> Any:
    # Lazy so `import compress` stays cheap for the CLI's --help.
    if name == "apply":
        from .api import apply

        return apply
    if name == "run":
        from .pipeline import run

        return run
    if name == "load_recipe":
        from .recipe import load_recipe

        return load_recipe
    raise AttributeError(name)


__all__ = [
    "AccuracyError", "Artifact", "BudgetExceeded", "BuildError", "CacheError", "CompressError", "ExportError",
    "InputError", "InputSpec", "PassError", "RecipeError", "TargetUnavailable", "apply", "load_recipe", "run",
]
