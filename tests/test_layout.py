"""The tree shows the architecture, and stays readable (issue 34's limits): a folder of ``compress/`` holds at
most 15 modules, no module of the core or the plugins is over 600 lines, no function over 80, and no two
modules import each other (directly or around a loop), at module level or inside a function."""

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


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("passes", "targets"):
        parts.insert(0, "compress")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


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


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules of this repository that ``path`` imports, anywhere in it."""
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base]) if base else ".".join(pkg)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for t in targets:
            t = t.replace("compress.passes", "compress.passes").strip(".")
            if t in known and t != me:
                out.add(t)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    paths = list(_modules())
    known = {_name(p) for p in paths}
    # A package's __init__ is not an edge target when only a submodule is meant.
    return {_name(p): {t for t in _imports(p, known) if not any(k.startswith(t + ".") for k in known)}
            for p in paths}


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """It cannot pass vacuously."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
