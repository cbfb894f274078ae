"""Registries of passes and targets.

A pass is any callable ``run(artifact, config, ctx) -> PassResult`` registered with
the config class it takes and the artifact kinds it consumes and produces. There
is no base class to inherit (LLVM's lesson).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PassConfig, TargetConfig
from .errors import RecipeError


@dataclass(frozen=True)
class PassInfo:
    kind: str
    config_cls: type[PassConfig]
    consumes: str
    produces: str
    version: int
    fn: Callable[..., Any]
    summary: str


# The plugin folders (`passes/`, `targets/` in the source tree), imported as subpackages of compress.
_PLUGIN_PACKAGES = ("compress.passes", "compress.targets")
_PASSES: dict[str, PassInfo] = {}
_TARGETS: dict[str, tuple[type[TargetConfig], Callable[[TargetConfig], Any]]] = {}
_loaded = False


def _kind_of(config_cls: type[PassConfig]) -> str:
    kind = config_cls.model_fields["kind"].default
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{config_cls.__name__} must set kind as a Literal with its name as default")
    return kind


def register_pass(
    config_cls: type[PassConfig], *, consumes: str, produces: str, version: int = 1
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a pass function. Bump ``version`` when its output changes: it is in the cache key."""
    kind = _kind_of(config_cls)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = (fn.__doc__ or "").strip().splitlines()
        _PASSES[kind] = PassInfo(kind, config_cls, consumes, produces, version, fn, doc[0] if doc else "")
        return fn

    return deco


def register_target(config_cls: type[TargetConfig]) -> Callable[[Any], Any]:
    """Register a target class (constructed with its config)."""
    kind = _kind_of(config_cls)

    def deco(cls: Any) -> Any:
        _TARGETS[kind] = (config_cls, cls)
        return cls

    return deco


def _load_plugins() -> None:
    """Import every module of the ``passes`` and ``targets`` packages so they register."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _PLUGIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{mod.name}")


def passes() -> dict[str, PassInfo]:
    _load_plugins()
    return dict(sorted(_PASSES.items()))


def targets() -> dict[str, tuple[type[TargetConfig], Callable[[TargetConfig], Any]]]:
    _load_plugins()
    return dict(sorted(_TARGETS.items()))


def _known_without_loading(section: str, kind: str, registered: dict[str, Any]) -> list[str] | None:
    """The known kinds from a fresh manifest when ``kind`` is not among them (so an unknown name is
    reported without importing every plugin, and torch with them); None when loading is needed."""
    if _loaded or kind in registered:
        return None
    m = cached_manifest()
    if m is None or kind in m[section]:
        return None
    return sorted(set(m[section]) | set(registered))


def get_pass(kind: str) -> PassInfo:
    known = _known_without_loading("passes", kind, _PASSES)
    if known is not None:
        raise RecipeError(f"unknown pass '{kind}'; known passes: {', '.join(known)}")
    all_p = passes()
    if kind not in all_p:
        raise RecipeError(f"unknown pass '{kind}'; known passes: {', '.join(all_p)}")
    return all_p[kind]


def get_target_config(kind: str) -> type[TargetConfig]:
    known = _known_without_loading("targets", kind, _TARGETS)
    if known is not None:
        raise RecipeError(f"unknown target '{kind}'; known targets: {', '.join(known)}")
    all_t = targets()
    if kind not in all_t:
        raise RecipeError(f"unknown target '{kind}'; known targets: {', '.join(all_t)}")
    return all_t[kind][0]


# ---------------------------------------------------------------- manifest
#
# Listing the passes needs only their config classes, but importing the plugin modules imports
# torch (seconds). The listing is therefore kept as a manifest beside the package's bytecode, in
# __pycache__, keyed by a hash of the plugin sources, and rebuilt whenever one of them changes.

_MANIFEST_FORMAT = 1


def type_text(ann: object) -> str:
    """A field's type as a user reads it; Literal types list their allowed values."""
    import typing

    if typing.get_origin(ann) is typing.Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(ann))
    args = typing.get_args(ann)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " | ".join(type_text(a) for a in rest) + " | None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def describe_fields(cfg_cls: type[PassConfig]) -> list[list[str]]:
    """[name, type, default, description] of every setting but ``kind``."""
    out = []
    for name, f in cfg_cls.model_fields.items():
        if name == "kind":
            continue
        default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
        out.append([name, type_text(f.annotation), default, f.description or ""])
    return out


def _describe(ps: dict[str, PassInfo], ts: dict[str, tuple[type[TargetConfig], Any]]) -> dict[str, Any]:
    return {
        "format": _MANIFEST_FORMAT,
        "passes": {k: {"consumes": i.consumes, "produces": i.produces,
                       "doc": ((i.config_cls.__doc__ or "").strip().splitlines() or [""])[0],
                       "fields": describe_fields(i.config_cls)} for k, i in sorted(ps.items())},
        "targets": {k: {"fields": describe_fields(cfg)} for k, (cfg, _) in sorted(ts.items())},
    }


def _is_plugin(module: str) -> bool:
    return module.rsplit(".", 1)[0] in _PLUGIN_PACKAGES


def _manifest_path() -> Path | None:
    import hashlib
    import importlib.util
    import platform
    import sys

    import pydantic

    h = hashlib.sha256(f"{_MANIFEST_FORMAT}|{sys.version}|{platform.machine()}|{pydantic.VERSION}".encode())
    here = Path(__file__).resolve().parent
    files = [here / "config.py", here / "registry.py"]
    for pkg in _PLUGIN_PACKAGES:
        spec = importlib.util.find_spec(pkg)  # finds the package without importing its modules
        for loc in (spec.submodule_search_locations or []) if spec else []:
            files += sorted(Path(loc).glob("*.py"))
    try:
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    except OSError:
        return None
    return here / "__pycache__" / f"plugins-manifest.{h.hexdigest()[:24]}.json"


def cached_manifest() -> dict[str, Any] | None:
    """The manifest for the plugin sources as they are now, or None when there is none yet."""
    path = _manifest_path()
    if path is None or not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == _MANIFEST_FORMAT else None


def manifest() -> dict[str, Any]:
    """Passes and targets with their settings: from the manifest when it is current, else by importing
    every plugin (and then writing the manifest for next time). Plugins registered in this process
    outside the ``passes``/``targets`` packages are listed too, but never written to the manifest."""
    m = None if _loaded else cached_manifest()
    if m is None:
        m = _describe({k: i for k, i in passes().items() if _is_plugin(i.fn.__module__)},
                      {k: t for k, t in targets().items() if _is_plugin(t[1].__module__)})
        path = _manifest_path()
        if path is not None:
            try:  # best effort, atomically: a read-only install simply lists slowly
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass
    # Registered in this process outside the plugin packages (already imported, so cheap to describe).
    extra = _describe({k: i for k, i in _PASSES.items() if k not in m["passes"]},
                      {k: t for k, t in _TARGETS.items() if k not in m["targets"]})
    return {**m, "passes": dict(sorted({**m["passes"], **extra["passes"]}.items())),
            "targets": dict(sorted({**m["targets"], **extra["targets"]}.items()))}


def make_target(cfg: TargetConfig) -> Any:
    return targets()[cfg.kind][1](cfg)
