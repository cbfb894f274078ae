"""Model sources: what ``model.source`` (and a distillation teacher) may name, and how the base module
of a source record is built. Shared by ``compress.inputs.models`` (loading) and ``compress.inputs.torch_io``
(rebuilding a cached model), so neither imports the other."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, RecipeError
from . import zoo

# Modules handed to ``compress.apply`` as live objects, by key: rebuilt by copying, never from disk.
LIVE_MODULES: dict[str, nn.Module] = {}


def classify_source(src: str) -> str:
    """One of ``zoo``, ``factory``, ``pt2``, ``onnx``, ``hf``."""
    if src.startswith("zoo:"):
        return "zoo"
    if src.startswith("hf:"):
        return "hf"
    if src.startswith("gguf:") or src.endswith(".gguf"):
        return "gguf"
    if src.startswith("onnx:") or src.endswith(".onnx"):
        return "onnx"
    if src.startswith("pt2:") or src.endswith(".pt2"):
        return "pt2"
    if ":" in src and not src.startswith(("/", ".")):
        return "factory"
    raise RecipeError(
        f"model source {src!r} not understood; use zoo:NAME ({', '.join(zoo.ZOO)}), "
        "package.module:factory, a .pt2 exported program, an .onnx file, hf:DIR (a Hugging Face model directory) "
        "or a .gguf file (a causal LM, dequantized to float)"
    )


def _path_of(src: str) -> Path:
    return Path(src.split(":", 1)[1] if src.startswith(("onnx:", "pt2:")) else src)


def build_from_source(source: dict[str, Any]) -> nn.Module:
    """Build the base module described by a source record (see :func:`load_model`)."""
    kind = source["kind"]
    if kind == "zoo":
        return zoo.build(source["name"], tuple(source["input_shape"]), **source.get("kwargs", {}))
    if kind == "factory":
        mod_name, _, fn_name = source["factory"].partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise InputError(f"model factory {source['factory']!r}: cannot import {mod_name!r} ({e}); "
                             "is the package on PYTHONPATH?") from e
        fn = getattr(mod, fn_name, None)
        if fn is None or not callable(fn):
            raise InputError(f"model factory {source['factory']!r}: {mod_name} has no callable {fn_name!r}")
        kwargs = source.get("kwargs", {})
        _check_factory(source["factory"], fn, kwargs)
        try:
            model = fn(**kwargs)
        except (TypeError, ValueError) as e:
            raise InputError(f"model factory {source['factory']!r} failed when called with {kwargs or 'no arguments'}:"
                             f" {type(e).__name__}: {e}; a factory takes keyword arguments and returns an "
                             "nn.Module") from e
        if not isinstance(model, nn.Module):
            raise InputError(f"model factory {source['factory']!r} returned {type(model).__name__}, not an nn.Module")
        return model
    if kind == "hf":
        from .hf import load_dir

        return load_dir(Path(source["path"]), source["task"])
    if kind == "pt2":
        path = Path(source["path"])
        if not source.get("allow_unsafe"):
            raise InputError(unsafe_pt2_message(path))
        return _load_pt2(path).module()
    if kind == "live":
        if source.get("key") in LIVE_MODULES:
            return copy.deepcopy(LIVE_MODULES[source["key"]])
        raise InputError(
            f"this model was given as a live {source.get('class')} object and cannot be rebuilt from disk; "
            "give it as package.module:factory to cache it across runs"
        )
    raise InputError(f"cannot build a torch module from a {kind} source")


def _check_factory(name: str, fn: Any, kwargs: dict[str, Any]) -> None:
    """Refuse, before calling it, a callable that cannot be a model factory: a class that is not an
    nn.Module, a built-in, or a function whose signature does not take the arguments given."""
    if isinstance(fn, type):
        if not issubclass(fn, nn.Module):
            raise InputError(f"model factory {name!r} is the class {fn.__name__}, not an nn.Module subclass; "
                             "name a function or class that builds the model")
    elif not (inspect.isfunction(fn) or inspect.ismethod(fn) or isinstance(fn, functools.partial)):
        raise InputError(f"model factory {name!r} is a {type(fn).__name__}, not a Python function or nn.Module "
                         "class; name the function that builds the model")
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise InputError(f"model factory {name!r} cannot be called with {kwargs or 'no arguments'} ({e}); a "
                         "factory takes keyword arguments (num_classes when set) and returns an nn.Module") from None
    except ValueError:  # no signature to inspect: let the call decide
        pass


PT2_OPT_IN = "model.allow_unsafe_pt2 = true (--allow-unsafe-pt2)"


def unsafe_pt2_message(path: Path, opt_in: str = PT2_OPT_IN) -> str:
    return (f"{path}: refused: a .pt2 exported program is loaded with pickle, which can run code; set {opt_in} "
            "only for a file you trust, or give the model as .onnx or package.module:factory with weights")


def _load_pt2(path: Path) -> Any:
    """``torch.export.load``: only ever called once the user opted in (it unpickles with weights_only=False)."""
    try:
        return torch.export.load(str(path))
    except Exception as e:  # torch raises several types for a bad archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a loadable exported program ({first[:200]})") from e
