"""Model sources: the built-in zoo, a user factory, an exported program, an ONNX file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.artifact import Artifact, InputSpec, sha256_files, sha256_json
from ..core.cache import Cache
from ..errors import InputError, RecipeError
from . import zoo
from .sources import _load_pt2, _path_of, build_from_source, classify_source, unsafe_pt2_message
from .torch_io import safe_torch_load, set_eval, write_torch


def _load_weights(model: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.exists():
        raise InputError(f"{path}: weights file not found")
    sd: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # SafetensorError, or OSError for a truncated header
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{path}: not a readable .safetensors file ({why[:200]}); is it truncated?") from e
    else:
        obj = safe_torch_load(path)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise InputError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise InputError(f"{path}: weights do not fit the model: {' '.join(first)}") from e


def load_model(spec: Any, cache: Cache) -> Artifact:
    """Turn a recipe's ``model`` table into the root artifact (torch, or onnx for .onnx files)."""
    src: str = spec.source
    kind = classify_source(src)
    if kind == "onnx":
        return _load_onnx(_path_of(src), cache)
    if kind == "hf":
        return _load_hf(spec, cache)
    if kind == "gguf":
        return _load_gguf(spec, cache)
    if kind == "zoo":
        name = src[4:]
        if name not in zoo.ZOO:
            raise RecipeError(f"model source {src!r}: unknown zoo model; choose from {', '.join(zoo.ZOO)}")
        shape = tuple(spec.input_shape or zoo.ZOO[name].input_shape)
        kwargs = {"num_classes": spec.num_classes} if spec.num_classes else {}
        source = {"kind": "zoo", "name": name, "input_shape": list(shape), "kwargs": kwargs}
    elif kind == "factory":
        if not spec.input_shape:
            raise RecipeError(f"model {src!r}: a factory model needs input_shape, e.g. input_shape = [1, 3, 224, 224]")
        shape = tuple(spec.input_shape)
        kwargs = {"num_classes": spec.num_classes} if spec.num_classes else {}
        source = {"kind": "factory", "factory": src, "kwargs": kwargs}
    else:
        path = _path_of(src)
        if not path.exists():
            raise InputError(f"{path}: exported program not found")
        # torch.export.load unpickles weights with weights_only=False: a crafted archive runs code.
        if not spec.allow_unsafe_pt2:
            raise InputError(unsafe_pt2_message(path))
        source = {"kind": "pt2", "path": str(path.resolve()), "allow_unsafe": True}  # type: ignore[dict-item]
        shape = tuple(spec.input_shape) if spec.input_shape else _pt2_shape(path)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise RecipeError(f"model input_shape {list(shape)} must be positive with a batch dimension first")
    torch.manual_seed(0)  # random-init zoo models are the same in every run
    model = build_from_source(source)
    if spec.weights:
        _load_weights(model, spec.weights)
    set_eval(model)
    # The source is referenced by digest so a changed weights file is a different model.
    return _store_loaded(cache, model, source, (InputSpec("input", shape),), f"load {src}", {"source": src},
                         {"source": source})


def _store_loaded(cache: Cache, model: Any, source: dict[str, Any], inputs: tuple[InputSpec, ...], producer: str,
                  metadata: dict[str, Any], key_facts: dict[str, Any]) -> Artifact:
    """A loaded torch model as a cache root: the cached entry when one exists, else this one put in."""
    dst = cache.new_dir("model")
    try:
        digest = write_torch(dst, model, source, [])
        art = Artifact("pytorch", dst, digest, inputs, producer=producer, metadata=metadata)
        key = Cache.key(digest, "load", 1, key_facts)
        hit = cache.get(key)
    except BaseException:  # no half-written work folder left behind (a damaged entry, a full disk, Ctrl-C)
        shutil.rmtree(dst, ignore_errors=True)
        raise
    if hit is not None:
        shutil.rmtree(dst, ignore_errors=True)
        hit.obj = model
        return hit
    art.obj = model
    return cache.put(key, art)


def _load_gguf(spec: Any, cache: Cache) -> Artifact:
    """A GGUF file: a causal LM, dequantized to float through transformers' loader into a Hugging Face folder
    kept in the cache (once per file content), then loaded like ``hf:DIR``; the report names the GGUF."""
    from .causal_lm import CAUSAL_LM, gguf_to_dir

    if spec.task not in (None, CAUSAL_LM):
        raise RecipeError(f"model {spec.source!r}: a GGUF file is a causal language model; set task = \"causal-lm\" "
                          f"(not {spec.task!r}) or leave it out")
    path = Path(spec.source[5:] if spec.source.startswith("gguf:") else spec.source).expanduser()
    folder = gguf_to_dir(path, cache.root, say=cache.log)
    art = _load_hf(spec.model_copy(update={"source": f"hf:{folder}", "task": CAUSAL_LM}), cache)
    art.metadata = {**art.metadata, "source": spec.source, "gguf": str(path),
                    "note": "weights dequantized from GGUF to float32 by transformers"}
    return art


def hf_dir(root: Artifact) -> Path | None:
    """The Hugging Face folder a root model was loaded from (GGUF files: the folder made from them)."""
    src = root.metadata.get("source", "")
    folder = root.metadata.get("hf_dir")
    return Path(folder) if folder else (Path(src[3:]).expanduser() if src.startswith("hf:") else None)


def _load_hf(spec: Any, cache: Cache) -> Artifact:
    """A Hugging Face model directory with the user's task head; inputs named and typed from its config."""
    from .hf import check_task, input_specs, read_config

    path = Path(spec.source[3:]).expanduser()
    if not path.is_dir():
        raise InputError(f"{path}: Hugging Face model directory not found")
    task = check_task(spec.task, f"model {spec.source!r}")
    inputs = input_specs(read_config(path), task, tuple(spec.input_shape) if spec.input_shape else None)
    source = {"kind": "hf", "path": str(path.resolve()), "task": task}
    model = build_from_source(source)
    if spec.weights:
        _load_weights(model, spec.weights)
    set_eval(model)
    return _store_loaded(cache, model, source, tuple(inputs), f"load {spec.source}",
                         {"source": spec.source, "task": task, "hf_dir": str(path.resolve())},
                         {"source": source, "inputs": [s.to_json() for s in inputs]})


def _pt2_shape(path: Path) -> tuple[int, ...]:
    ep = _load_pt2(path)
    args = ep.example_inputs[0] if ep.example_inputs else ()
    if not args or not isinstance(args[0], torch.Tensor):
        raise RecipeError(f"{path}: the exported program carries no example input; set model.input_shape")
    return tuple(int(s) for s in args[0].shape)


def _load_onnx(path: Path, cache: Cache) -> Artifact:
    import onnx

    from .onnx_io import check_external_data, onnx_facts, onnx_input_specs

    if not path.exists():
        raise InputError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        raise InputError(f"{path}: not a readable ONNX model ({e})") from e
    check_external_data(model, path.parent)
    dst = cache.new_dir("onnx")
    external = any(e.key == "location" for t in model.graph.initializer for e in t.external_data)
    try:
        if not external:
            shutil.copy2(path, dst / "model.onnx")
        else:
            # Gather the external data (any layout, sub/w.bin included; check_external_data kept it inside
            # the model's folder) beside the model as one file, the layout every target expects.
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
            big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit for a single file
            onnx.save_model(model, str(dst / "model.onnx"), save_as_external_data=big,
                            all_tensors_to_one_file=True, location="model.onnx.data")
    except OSError as e:
        shutil.rmtree(dst, ignore_errors=True)
        raise InputError(f"{path}: cannot copy the model and its external data into the cache ({e})") from e
    try:
        digest = sha256_files(dst)
        art = Artifact("onnx", dst, digest, onnx_input_specs(model), producer=f"load {path}",
                       metadata={"source": str(path)}, facts=onnx_facts(model))
        key = Cache.key(digest, "load", 1, {"onnx": sha256_json(str(path.name))})
        hit = cache.get(key)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    if hit is not None:
        shutil.rmtree(dst, ignore_errors=True)
        return hit
    return cache.put(key, art)
