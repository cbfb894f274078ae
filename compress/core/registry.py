"""Registries of passes and targets.

A pass is any callable ``run(artifact, config, ctx) -> PassResult`` registered with
the config class it takes and its capabilities (``compress.core.capabilities.PassCaps``: the
artifact kinds it consumes and produces, and what the core may ask of it). There is no base
class to inherit (LLVM's lesson). A target is a class with a ``caps`` (``TargetCaps``).

Plugins are the modules of ``compress.passes`` and ``compress.targets`` plus any module named
by a ``compress.plugins`` entry point of an installed distribution (as pytest finds its
plugins), e.g. in the plugin's pyproject.toml::

    [project.entry-points."compress.plugins"]
    my_quantizer = "my_package.compress_plugin"

Every plugin is identified in cache keys by a digest of its source and of the modules of its
own package it imports (``code_identity``), so editing a pass invalidates exactly its entries.

A plugin that fails to import (any exception, ``SystemExit`` and ``KeyboardInterrupt`` included) is
one warning line naming it; the built-ins and the other plugins load as before. A plugin cannot take
a pass or target kind another distribution already provides (the built-ins first of all): that
registration is refused with a warning naming both, unless the user lists the kind in
``$COMPRESS_PLUGIN_OVERRIDE`` (comma-separated).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .capabilities import PassCaps, TargetCaps
from .config import PassConfig, TargetConfig
from .protocols import Target

ENTRY_POINT_GROUP = "compress.plugins"
OVERRIDE_ENV = "COMPRESS_PLUGIN_OVERRIDE"  # kinds a plugin may take from their provider, e.g. "quantize.int8"
BUILTIN_DIST = "compress-pipeline"


@dataclass(frozen=True)
class PassInfo:
    kind: str
    config_cls: type[PassConfig]
    caps: PassCaps
    version: int
    fn: Callable[..., Any]
    summary: str

    @property
    def consumes(self) -> str:
        return self.caps.consumes

    @property
    def produces(self) -> str:
        return self.caps.produces

    @property
    def identity(self) -> str:
        """A digest of the pass's code (its module and the modules of its package it imports)."""
        return code_identity(self.fn.__module__)


# The plugin folders (`passes/`, `targets/` in the source tree), imported as subpackages of compress.
_PLUGIN_PACKAGES = ("compress.passes", "compress.targets")
_PASSES: dict[str, PassInfo] = {}
_COMMANDS: dict[str, CommandInfo] = {}
_TARGETS: dict[str, tuple[type[TargetConfig], Any]] = {}  # kind -> (config class, target class)
_loaded = False
_IMPORTING: list[tuple[str, str]] = []  # (entry point, its distribution) while its module is imported
_PROVIDER: dict[tuple[str, str], str] = {}  # ("pass" | "target", kind) -> the plugin distribution that registered it


def plugin_warning(message: str) -> None:
    """A plugin problem as one line on stderr, once per process (``compress.core.notices``)."""
    from .notices import warn_once

    warn_once(message)


def _overridable() -> set[str]:
    return {k.strip() for k in os.environ.get(OVERRIDE_ENV, "").split(",") if k.strip()}


def _claim(section: str, kind: str, registered: dict[str, Any]) -> bool:
    """Whether the registration being made may provide ``kind``: a plugin cannot take a kind another distribution
    registered (the built-ins, or an earlier plugin), unless the user lets it ($COMPRESS_PLUGIN_OVERRIDE)."""
    if not _IMPORTING:  # this package's own plugin folders, or code of this process: theirs to (re)register
        _PROVIDER.pop((section, kind), None)
        return True
    ep, dist = _IMPORTING[-1]
    prev = _PROVIDER.get((section, kind), BUILTIN_DIST)
    if kind in registered and prev != dist and kind not in _overridable():
        plugin_warning(f"plugin '{ep}' ({dist}) registers {section} '{kind}', which {prev} already provides; "
                       f"refused (set {OVERRIDE_ENV}={kind} to let it replace that one)")
        return False
    _PROVIDER[(section, kind)] = dist
    return True


def _kind_of(config_cls: type[PassConfig]) -> str:
    kind = config_cls.model_fields["kind"].default
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{config_cls.__name__} must set kind as a Literal with its name as default")
    return kind


def register_pass(
    config_cls: type[PassConfig], *, consumes: str, produces: str, version: int = 1, **caps: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a pass function with its capabilities (``PassCaps`` fields as keywords).

    Its code is part of its cache key (``code_identity``); bump ``version`` only when its output
    changes for a reason outside its own package (a library it calls behaves differently)."""
    kind = _kind_of(config_cls)
    pcaps = PassCaps(consumes=consumes, produces=produces, **caps)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = (fn.__doc__ or "").strip().splitlines()
        if _claim("pass", kind, _PASSES):
            _PASSES[kind] = PassInfo(kind, config_cls, pcaps, version, fn, doc[0] if doc else "")
        return fn

    return deco


@dataclass(frozen=True)
class CommandInfo:
    """A command a plugin adds to the CLI (``compress NAME ...``)."""

    name: str
    help: str
    # argparse arguments as (flags, options); options are JSON-able (``type`` by name: "int", "float", "str").
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    fn: Callable[[Any], int]


_ARG_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def register_command(name: str, help: str, arguments: Sequence[tuple[Sequence[str], dict[str, Any]]] = ()
                     ) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    """Register a CLI command of a plugin (e.g. a target's tool to fetch its device runtime). The function
    takes the parsed argparse namespace and returns the exit code; it raises CompressError for one-line
    errors. The manifest lists it, so ``compress --help`` shows it without importing the plugin."""
    args = tuple((tuple(flags), dict(opts)) for flags, opts in arguments)
    for _, opts in args:
        if "type" in opts and opts["type"] not in _ARG_TYPES:
            raise TypeError(f"command {name}: argument type {opts['type']!r} must be one of {', '.join(_ARG_TYPES)}")

    def deco(fn: Callable[[Any], int]) -> Callable[[Any], int]:
        _COMMANDS[name] = CommandInfo(name, help, args, fn)
        return fn

    return deco


def argparse_options(opts: dict[str, Any]) -> dict[str, Any]:
    """A registered argument's options as argparse takes them (``type`` names resolved)."""
    return {**opts, "type": _ARG_TYPES[opts["type"]]} if "type" in opts else dict(opts)


def commands() -> dict[str, CommandInfo]:
    _load_plugins()
    return dict(sorted(_COMMANDS.items()))


def register_target(config_cls: type[TargetConfig]) -> Callable[[Any], Any]:
    """Register a target class (constructed with its config); it declares ``caps: TargetCaps``."""
    kind = _kind_of(config_cls)

    def deco(cls: Any) -> Any:
        if not isinstance(getattr(cls, "caps", None), TargetCaps):
            raise TypeError(f"target {cls.__name__} must declare caps = TargetCaps(...)")
        from .protocols import OPTIONAL_TARGET_MEMBERS, TargetBase

        for name in OPTIONAL_TARGET_MEMBERS:  # the declared defaults, for a class not derived from TargetBase
            if not hasattr(cls, name):
                setattr(cls, name, getattr(TargetBase, name))
        if _claim("target", kind, _TARGETS):
            _TARGETS[kind] = (config_cls, cls)
        return cls

    return deco


def _load_plugins() -> None:
    """Import every module of the plugin packages, then every ``compress.plugins`` entry point."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _PLUGIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{mod.name}")
    for ep in entry_points():
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "distribution unknown"
        _IMPORTING.append((ep.name, dist))
        try:
            importlib.import_module(ep.value.split(":")[0])
        # A broken third-party plugin must not take the built-ins down, nor end the command: not even by
        # sys.exit() or a KeyboardInterrupt raised at import (exit 3 means "inconclusive" to compress check).
        except BaseException as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            plugin_warning(f"plugin '{ep.name}' ({dist}, {ep.value}) failed to load and is left out: "
                           f"{type(e).__name__}{': ' + first if first else ''}")
        finally:
            _IMPORTING.pop()


def entry_points() -> list[importlib_metadata.EntryPoint]:
    """The ``compress.plugins`` entry points of the installed distributions, by name."""
    return sorted(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def _module_file(name: str) -> Path | None:
    mod = sys.modules.get(name)
    f = getattr(mod, "__file__", None) if mod is not None else None
    if f is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        f = spec.origin if spec is not None else None
    return Path(f) if f and f.endswith(".py") else None


def _scope(module: str) -> tuple[str, ...]:
    """The packages whose modules count as a plugin's own code: the two built-in plugin packages for
    a built-in plugin, else the plugin's top-level package."""
    if module.rsplit(".", 1)[0] in _PLUGIN_PACKAGES:
        return _PLUGIN_PACKAGES
    return (module.split(".")[0],)


def _imports(module: str, source: str, is_pkg: bool) -> set[str]:
    """Module names ``source`` imports (relative ones resolved), function-local imports included."""
    base = module if is_pkg else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = base.split(".")
            root = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            name = ".".join(x for x in (root, node.module or "") if x)
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from . import helper` names a module
    return out


@cache
def code_identity(module: str) -> str:
    """SHA-256 over the source of ``module`` and of every module of its own package it imports,
    transitively (so a shared helper's edit reaches every plugin using it, and no other)."""
    scope = _scope(module)
    seen: dict[str, bytes] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        src = path.read_bytes()
        seen[name] = src
        for dep in _imports(name, src.decode("utf-8", "replace"), path.name == "__init__.py"):
            if dep not in seen and any(dep == p or dep.startswith(p + ".") for p in scope):
                todo.append(dep)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + seen[name] + b"\0")
    return h.hexdigest()[:24]


def passes() -> dict[str, PassInfo]:
    _load_plugins()
    return dict(sorted(_PASSES.items()))


def targets() -> dict[str, tuple[type[TargetConfig], Any]]:
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


def fast_entry(section: str, kind: str) -> dict[str, Any] | None:
    """A kind's manifest entry while the plugins are not imported yet (None once they are, or with no manifest):
    what compress.stages.schema_check judges settings from without importing them."""
    if _loaded:
        return None
    m = cached_manifest()
    return None if m is None else m[section].get(kind)


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

_MANIFEST_FORMAT = 4


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


def _json_schema(cls: type[PassConfig]) -> dict[str, Any] | None:
    """A config class's JSON Schema (compress.stages.schema_check answers recipe errors from it without importing the
    plugin); None when pydantic cannot express the class as one."""
    try:
        return cls.model_json_schema()
    except Exception:  # a field type without a JSON Schema form: the full validation judges it
        return None


def _describe(ps: dict[str, PassInfo], ts: dict[str, tuple[type[TargetConfig], Any]],
              cs: dict[str, CommandInfo]) -> dict[str, Any]:
    return {
        "commands": {k: {"help": c.help, "arguments": [[list(f), o] for f, o in c.arguments],
                         "module": c.fn.__module__, "function": c.fn.__name__} for k, c in sorted(cs.items())},
        "format": _MANIFEST_FORMAT,
        "passes": {k: {"consumes": i.caps.consumes, "produces": i.caps.produces,
                       "compare_precision": i.caps.compare_precision,
                       "doc": ((i.config_cls.__doc__ or "").strip().splitlines() or [""])[0],
                       "fields": describe_fields(i.config_cls), "schema": _json_schema(i.config_cls)}
                   for k, i in sorted(ps.items())},
        "targets": {k: {"fields": describe_fields(cfg), "schema": _json_schema(cfg),
                        "requires": list(cls.caps.requires),
                        "default": cls.caps.default, "reference": cls.caps.reference,
                        "install": cls.caps.install} for k, (cfg, cls) in sorted(ts.items())},
    }


def _is_plugin(module: str) -> bool:
    """A built-in plugin or one named by an entry point (both are listed by the manifest)."""
    return module.rsplit(".", 1)[0] in _PLUGIN_PACKAGES or module in {e.value.split(":")[0] for e in entry_points()}


def _manifest_path() -> Path | None:
    import platform

    import pydantic

    h = hashlib.sha256(f"{_MANIFEST_FORMAT}|{sys.version}|{platform.machine()}|{pydantic.VERSION}".encode())
    here = Path(__file__).resolve().parent
    files = [here / "config.py", here / "registry.py"]
    for pkg in _PLUGIN_PACKAGES:
        spec = importlib.util.find_spec(pkg)  # finds the package without importing its modules
        for loc in (spec.submodule_search_locations or []) if spec else []:
            files += sorted(Path(loc).glob("*.py"))
    h.update(f"{OVERRIDE_ENV}={sorted(_overridable())}".encode())  # which plugin provides a kind depends on it
    for ep in entry_points():  # third-party plugins: a new, removed or edited one renews the manifest
        h.update(f"{ep.name}={ep.value}".encode())
        f = _module_file(ep.value.split(":")[0])
        if f is not None:
            files.append(f)
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
                      {k: t for k, t in targets().items() if _is_plugin(t[1].__module__)},
                      {k: c for k, c in commands().items() if _is_plugin(c.fn.__module__)})
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
                      {k: t for k, t in _TARGETS.items() if k not in m["targets"]},
                      {k: c for k, c in _COMMANDS.items() if k not in m["commands"]})
    return {**m, "passes": dict(sorted({**m["passes"], **extra["passes"]}.items())),
            "targets": dict(sorted({**m["targets"], **extra["targets"]}.items())),
            "commands": dict(sorted({**m["commands"], **extra["commands"]}.items()))}


def make_target(cfg: TargetConfig) -> Target:
    target: Target = targets()[cfg.kind][1](cfg)
    return target


def lowering_pass() -> PassInfo:
    """The pass that lowers a PyTorch model to ONNX (inserted where a chain needs ONNX)."""
    found = [i for i in passes().values() if i.caps.lowers_to_onnx]
    if len(found) != 1:
        raise RecipeError(f"expected exactly one pass that lowers to ONNX, found {[i.kind for i in found]}")
    return found[0]


def default_targets() -> list[TargetConfig]:
    """The targets measured when a recipe names none: those that declare ``caps.default``."""
    return [cfg() for cfg, cls in targets().values() if cls.caps.default]


def compare_precisions() -> dict[str, PassInfo]:
    """``compress compare --precision NAME``: the passes that offer a precision, by that name."""
    return {i.caps.compare_precision: i for i in passes().values() if i.caps.compare_precision}
