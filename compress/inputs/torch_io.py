"""Saving and loading torch-model artifacts without pickle.

A torch artifact on disk is ``source.json`` (how to build the base module: a zoo
name, a ``package.module:factory`` or a ``.pt2`` exported program) plus
``model.pt``, a plain container of tensors loaded with ``weights_only=True``:

* ``state_dict`` - the weights;
* ``structure``  - an ordered list of ``{"hook": name, "data": ...}`` steps that
  re-create structural edits (pruned widths, inserted fake-quant modules) on
  the freshly built base module before the weights are loaded.

Passes that change a module's structure register a restore hook with
:func:`register_structure_hook`. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.artifact import PYTORCH, Artifact, InputSpec, canonical_json
from ..core.capabilities import Facts
from ..errors import CacheError, InputError
from .sources import build_from_source

# Live modules given through the Python API, by content key (see compress.api.module_artifact).

StructureHook = Callable[[nn.Module, Any], nn.Module]
_STRUCTURE_HOOKS: dict[str, StructureHook] = {}


def register_structure_hook(name: str) -> Callable[[StructureHook], StructureHook]:
    """Register ``fn(module, data) -> module`` that replays a structural edit."""

    def deco(fn: StructureHook) -> StructureHook:
        _STRUCTURE_HOOKS[name] = fn
        return fn

    return deco


def _hash_obj(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(str(k).encode() + b":")
            _hash_obj(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _hash_obj(h, v)
        h.update(b"]")
    else:
        h.update(canonical_json(obj).encode())


def torch_digest(source: dict[str, Any], structure: list[dict[str, Any]], state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    _hash_obj(h, {"source": source, "structure": structure, "state": state_dict})
    return h.hexdigest()


def write_torch(
    dst: Path,
    module: nn.Module,
    source: dict[str, Any],
    structure: list[dict[str, Any]],
) -> str:
    """Write a torch artifact's files into ``dst``; return its digest."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    (dst / "source.json").write_text(json.dumps(source, indent=2, sort_keys=True))
    torch.save({"state_dict": sd, "structure": structure}, dst / "model.pt")
    return torch_digest(source, structure, sd)


def build_base(source: dict[str, Any]) -> nn.Module:
    """Instantiate the base module named by a source spec (no weights loaded)."""
    return build_from_source(source)


def load_torch(art: Artifact) -> nn.Module:
    """Return the artifact's module: the live one if present, else rebuilt from disk."""
    if art.obj is not None:
        return art.obj
    try:
        source = json.loads((art.path / "source.json").read_text())
        payload = safe_torch_load(art.path / "model.pt")
    except (OSError, ValueError, InputError) as e:
        # A cached model truncated by a full disk or a hand edit: a damaged cache, not a bug.
        raise CacheError(f"cache entry {art.path} is damaged ({_first_line(e)}); delete that folder and run "
                         "again") from e
    module = build_base(source)
    for step in payload.get("structure", []):
        hook = _STRUCTURE_HOOKS.get(step["hook"])
        if hook is None:
            # Hooks register when their pass module is imported; a fresh process that only
            # reads an artifact from the cache has not imported it yet.
            from compress.core import registry

            registry.passes()
            hook = _STRUCTURE_HOOKS.get(step["hook"])
        if hook is None:
            raise InputError(
                f"{art.path}: structure step '{step['hook']}' has no restore hook; "
                "the pass that made it is not installed (check extras)"
            )
        module = hook(module, step.get("data"))
    module.load_state_dict(payload["state_dict"])
    set_eval(module)
    art.obj = module
    return module


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def torch_meta(art: Artifact) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The (source, structure) of a torch artifact, for passes that derive a new one."""
    source = json.loads((art.path / "source.json").read_text())
    structure = safe_torch_load(art.path / "model.pt").get("structure", [])
    return source, list(structure)


def clone_module(art: Artifact) -> nn.Module:
    """A private deep copy of the artifact's module, safe for a pass to mutate."""
    return copy.deepcopy(load_torch(art))


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and a clear error when it refuses."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a checkpoint file")
    try:
        # torch warns (UserWarning) on some refused legacy files before raising: the refusal below says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: the real danger
        raise InputError(
            f"{path}: refused to load: the checkpoint needs pickle to load arbitrary objects, "
            "which can run code. Re-save only the weights (torch.save(model.state_dict(), path)) "
            "or convert it to .safetensors"
        ) from e
    except Exception as e:  # RuntimeError / EOFError / zip errors: a damaged file, not a hostile one
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first[:200]}); is it truncated or "
                         "another format?") from e


def sample_inputs(inputs: tuple[InputSpec, ...], batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in inputs:
        shape = list(spec.shape)
        if batch is not None:
            shape[0] = batch
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            out.append(torch.randn(*shape, generator=g, dtype=dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(*shape, dtype=torch.bool))
        elif spec.high == 2:
            # A 0/1 mask: attend to every position (a random mask can hide a whole sequence).
            out.append(torch.ones(*shape, dtype=dtype))
        else:
            # Token ids / type ids: valid values only (an out-of-range id fails inside nn.Embedding).
            out.append(torch.randint(0, spec.high or 2, shape, generator=g, dtype=dtype))
    return tuple(out)


def torch_artifact(
    module: nn.Module,
    parent: Artifact,
    ctx: Any,
    structure_step: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    facts: Facts | None = None,
) -> Artifact:
    """Package a pass's output module as a torch artifact derived from ``parent``.

    ``facts`` are the new artifact's facts when the pass changed them (None: the parent's).

    ``structure_step`` (``{"hook": name, "data": ...}``) is appended to the parent's
    structure list when the pass changed the module's shape; its hook must be
    registered with :func:`register_structure_hook` so the artifact can be rebuilt.
    """
    source, structure = torch_meta(parent)
    if structure_step is not None:
        if structure_step.get("hook") not in _STRUCTURE_HOOKS:
            raise ValueError(f"structure hook {structure_step.get('hook')!r} is not registered")
        structure.append(structure_step)
    set_eval(module)
    dst = ctx.new_dir(PYTORCH)
    digest = write_torch(dst, module, source, structure)
    art = Artifact(PYTORCH, dst, digest, parent.inputs, metadata=metadata or {}, facts=facts)
    art.obj = module
    return art


def set_eval(module: nn.Module) -> nn.Module:
    """``module.eval()``, tolerating exported-program modules, which are fixed in the mode they were exported in."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module
