"""compress: make a trained PyTorch model small and fast on a device, and prove it stayed accurate."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.artifact import Artifact, InputSpec
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


class _PluginFolders(importlib.abc.MetaPathFinder):
    """Imports the source tree's ``passes/`` and ``targets/`` folders as ``compress.passes`` and
    ``compress.targets``.

    The folders sit beside this package (the project's fixed layout); an installed wheel puts them
    inside it (pyproject's package-dir), where the normal import finds them and this finder is not
    installed. In a source checkout or an editable install the finder maps exactly these two names
    to the folders beside *this* package, so a second checkout on the path never mixes with this one.
    """

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _mount_plugin_folders() -> None:
    here = Path(__file__).resolve().parent
    folders = {f"{__name__}.{n}": here.parent / n for n in ("passes", "targets")
               if not (here / n).is_dir() and (here.parent / n / "__init__.py").is_file()}
    if folders:
        sys.meta_path.insert(0, _PluginFolders(folders))


_mount_plugin_folders()

if TYPE_CHECKING:
    from .api import apply as apply


def __getattr__(name: str) -> Any:
    # Lazy so `import compress` stays cheap for the CLI's --help.
    if name == "apply":
        from .api import apply

        return apply
    if name == "run":
        from .stages.pipeline import run

        return run
    if name == "assert_budgets":  # the CI gate from pytest (docs/budgets.md)
        from .apps.budget import assert_budgets

        return assert_budgets
    if name == "load_recipe":
        from .stages.recipe import load_recipe

        return load_recipe
    raise AttributeError(name)


__all__ = [
    "AccuracyError", "Artifact", "BudgetExceeded", "BuildError", "CacheError", "CompressError", "ExportError",
    "InputError", "InputSpec", "PassError", "RecipeError", "TargetUnavailable", "apply", "assert_budgets",
    "load_recipe", "run",
]
