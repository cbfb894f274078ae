"""The tree shows the architecture, and stays readable (issue 34's limits): a folder of ``compress/`` holds at
most 15 modules, no module of the core or the plugins is over 600 lines, no function over 80 (import cycles:
test_import_cycles.py)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("compress", "passes", "targets")
MAX_MODULES, MAX_LINES, MAX_FUNCTION = 15, 600, 80


def _modules() -> Iterator[Path]:
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "templates" not in path.parts:  # programs copied into bundles, never imported
                yield path


def test_no_folder_of_the_core_holds_more_than_15_modules() -> None:
    crowded = {}
    for folder in [ROOT / "compress", *(p for p in (ROOT / "compress").iterdir() if p.is_dir())]:
        mods = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        if len(mods) > MAX_MODULES and folder.name != "templates":
            crowded[str(folder.relative_to(ROOT))] = len(mods)
    assert crowded == {}


def test_no_module_is_over_600_lines_and_no_function_over_80() -> None:
    long_files, long_functions = [], []
    for path in _modules():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long_files == [] and long_functions == []


def test_every_subpackage_of_compress_is_installed() -> None:
    """A wheel holds exactly the packages pyproject lists: a new subfolder of compress/ left out of the list
    would work in a checkout and be missing when installed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"compress." + p.parent.relative_to(ROOT / "compress").as_posix().replace("/", ".")
             for p in (ROOT / "compress").rglob("__init__.py") if p.parent != ROOT / "compress"}
    assert found - listed == set()
