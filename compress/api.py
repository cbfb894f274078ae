"""The short Python API: ``compress.run(recipe)`` and ``compress.apply(module, config)``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from .core.artifact import Artifact, InputSpec
from .core.cache import Cache
from .core.config import PassConfig
from .core.manager import PassContext, PassManager
from .inputs.data import DataBundle, load_data
from .inputs.sources import LIVE_MODULES
from .inputs.torch_io import load_torch, set_eval, torch_digest, write_torch
from .stages.recipe import DataSpec


def module_artifact(module: nn.Module, input_shape: tuple[int, ...], cache: Cache,
                    inputs: tuple[InputSpec, ...] | None = None) -> Artifact:
    """Wrap a live module as a root torch artifact.

    ``inputs`` (names, dtypes, value ranges, dynamic axes) replaces the single float input of
    ``input_shape`` for models with several or integer inputs (token ids, masks).

    A live module has no recipe for rebuilding it from disk, so a private copy is
    kept in this process and cache hits derived from it are rebuilt from that
    copy; another process gets a clear error instead.
    """
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    key = torch_digest({"kind": "live", "class": cls}, [], module.state_dict())
    source = {"kind": "live", "class": cls, "key": key}
    LIVE_MODULES[key] = set_eval(copy.deepcopy(module))
    dst = cache.new_dir("module")
    digest = write_torch(dst, module, source, [])
    specs = inputs or (InputSpec("input", tuple(input_shape)),)
    art = Artifact("pytorch", dst, digest, specs, metadata={"source": "live module"})
    art.obj = LIVE_MODULES[key]
    facts: dict[str, Any] = {"shape": list(input_shape)}
    if inputs:
        facts["inputs"] = [s.to_json() for s in inputs]
    out = cache.put(Cache.key(digest, "live", 1, facts), art)
    out.obj = LIVE_MODULES[key]
    return out


def apply(
    module: nn.Module | str | Path,
    config: PassConfig | list[PassConfig],
    input_shape: tuple[int, ...] | None = None,
    data: DataBundle | str | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Any:
    """Apply one pass (or a chain) to an ``nn.Module``, or to an ``.onnx`` file, in one call.

    Returns the new ``nn.Module`` when the chain ends on a torch model, else the
    output :class:`Artifact` (e.g. an ONNX file under ``artifact.path``). ``data``
    is a :class:`DataBundle` or a data source string such as ``"builtin:digits"``.
    The lowering to ONNX is inserted where a PyTorch model meets an ONNX pass (never for an ``.onnx``
    file, which ONNX passes take as it is). The input module is never modified.
    """
    from .inputs.models import load_model
    from .stages.plan import with_lowering
    from .stages.recipe import ModelSpec

    cache = Cache(Path(cache_dir) if cache_dir else None)
    if isinstance(module, nn.Module):
        if input_shape is None:
            raise TypeError("compress.apply(module, ...) needs input_shape, e.g. input_shape=(1, 3, 224, 224)")
        root = module_artifact(module, input_shape, cache)
    else:
        root = load_model(ModelSpec(source=str(module)), cache)
    if isinstance(data, str):
        data = load_data(DataSpec(source=data), tuple(input_shape or root.inputs[0].shape), root.inputs)
    steps, _ = with_lowering(config if isinstance(config, list) else [config], False, root.kind)
    ctx = PassContext(cache=cache, data=data, seed=seed, progress=False, original=root)
    out, _ = PassManager(steps).run(root, ctx)
    return load_torch(out) if out.kind == "pytorch" else out
