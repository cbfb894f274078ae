"""Versions of the libraries that can change what a pass or target produces: part of every cache key
and of the machine fingerprint.

The list is not kept by hand: it is this distribution's own requirements, extras included (from
its installed metadata, or from pyproject.toml in a source checkout), plus the distribution itself;
the development tools (the ``dev`` extra) cannot change a model, so they are left out.
"""

from __future__ import annotations

import re
import tomllib
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path

DISTRIBUTION = "compress-pipeline"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_TOOLS_EXTRA = "dev"


def _requirement_names() -> list[str]:
    try:
        reqs = [r for r in importlib_metadata.requires(DISTRIBUTION) or []
                if not re.search(rf"extra\s*==\s*['\"]{_TOOLS_EXTRA}['\"]", r)]
    except importlib_metadata.PackageNotFoundError:
        reqs = []
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        if pyproject.is_file():  # a source checkout that was never installed
            project = tomllib.loads(pyproject.read_text()).get("project", {})
            reqs = [*project.get("dependencies", []),
                    *(r for name, extra in project.get("optional-dependencies", {}).items()
                      if name != _TOOLS_EXTRA for r in extra)]
    names = set()
    for r in reqs:
        m = _NAME.match(r)
        if m and m.group(1).lower() != DISTRIBUTION:  # `all = ["compress-pipeline[...]"]` names itself
            names.add(m.group(1).lower().replace("_", "-"))
    return sorted(names)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """{distribution: version or "absent"} for this package and everything it may use."""
    out = {}
    for name in [DISTRIBUTION, *_requirement_names()]:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
