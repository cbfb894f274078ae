"""Registries of passes and targets.

A pass is any callable ``run(artifact, config, ctx) -> PassResult`` registered with
the config class it takes and the artifact kinds it consumes and produces. There
is no base class to inherit (LLVM's lesson).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
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
    for pkg_name in ("passes", "targets"):
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


def get_pass(kind: str) -> PassInfo:
    all_p = passes()
    if kind not in all_p:
        raise RecipeError(f"unknown pass '{kind}'; known passes: {', '.join(all_p)}")
    return all_p[kind]


def get_target_config(kind: str) -> type[TargetConfig]:
    all_t = targets()
    if kind not in all_t:
        raise RecipeError(f"unknown target '{kind}'; known targets: {', '.join(all_t)}")
    return all_t[kind][0]


def make_target(cfg: TargetConfig) -> Any:
    return targets()[cfg.kind][1](cfg)
