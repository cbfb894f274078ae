"""The cache verifies what it serves: an entry whose bytes changed on disk is discarded and rebuilt, never used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.api import module_artifact
from compress.core.cache import MARKER
from compress.core.config import PassConfig
from compress.core.manager import PassContext, PassManager
from compress.core.registry import get_pass
from compress.errors import CacheError
from compress.inputs.torch_io import load_torch
from compress.stages.pipeline import run


def ScaleWeights(factor: float) -> PassConfig:
    return get_pass("test.scale").config_cls(factor=factor)  # type: ignore[call-arg]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _flip_in_largest_weight(onnx_path: Path) -> None:
    """Corrupt one byte inside the largest initializer: the file still parses, the model computes garbage."""
    import onnx

    model = onnx.load(str(onnx_path))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    data = onnx_path.read_bytes()
    at = data.find(raw)
    assert at >= 0 and len(raw) > 64
    _flip(onnx_path, at + len(raw) // 2 + 3)  # a high byte of a float in the middle of the tensor
    onnx.load(str(onnx_path))  # still a well-formed model: only the digest can tell


def _outputs(path: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def test_corrupted_pass_output_is_discarded_and_rebuilt(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    chain = [ScaleWeights(factor=2.0)]
    out1, r1 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    w1 = {k: v.clone() for k, v in load_torch(out1).state_dict().items()}
    entry = cache.objects / r1[0].key
    _flip(entry / "model.pt", (entry / "model.pt").stat().st_size - 40)

    logged: list[str] = []
    cache.log = logged.append
    out2, r2 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    assert not r2[0].cache_hit  # rebuilt, not served
    assert out2.digest == out1.digest
    w2 = load_torch(out2).state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert len(cache.notes) == 1 and r1[0].key[:16] in cache.notes[0] and "rebuilt" in cache.notes[0]
    assert "no longer matches the digest" in cache.notes[0] and logged and "WARNING" in logged[0]
    # The rebuilt entry verifies again: the third run is a plain hit with no new note.
    _, r3 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    assert r3[0].cache_hit and len(cache.notes) == 1


def test_edited_metadata_and_old_markers_are_not_trusted(tiny, cache) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    chain = [ScaleWeights(factor=3.0)]
    _, r1 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    entry = cache.objects / r1[0].key
    meta = json.loads((entry / "artifact.json").read_text())
    meta["digest"] = "0" * 64  # a hit would report a digest the content does not have
    (entry / "artifact.json").write_text(json.dumps(meta))
    assert cache.get(r1[0].key) is None and not entry.exists()

    _, r2 = PassManager(chain).run(root, PassContext(cache=cache, progress=False))
    entry = cache.objects / r2[0].key
    (entry / MARKER).write_text(meta["digest"])  # format 1: the artifact digest only, nothing to verify with
    assert cache.get(r2[0].key) is None
    assert "records no content digest" in cache.notes[-1]


def test_an_entry_that_cannot_be_removed_is_refused_naming_it(tiny, cache, monkeypatch) -> None:
    root = module_artifact(tiny, (1, 1, 8, 8), cache)
    _, r1 = PassManager([ScaleWeights(factor=4.0)]).run(root, PassContext(cache=cache, progress=False))
    entry = cache.objects / r1[0].key
    _flip(entry / "model.pt", 100)

    def deny(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", deny)
    with pytest.raises(CacheError) as e:
        cache.get(r1[0].key)
    msg = str(e.value)
    assert "\n" not in msg and str(entry) in msg and "failed verification" in msg and "delete it" in msg


def test_corrupted_onnx_and_compiled_entries_are_rebuilt_in_a_run(tmp_path: Path) -> None:
    """The issue's case: weights corrupted on disk in a cached ONNX model and a compiled target artifact."""
    r = tmp_path / "r.toml"
    r.write_text('name = "c"\nmodel = { source = "zoo:digits-cnn", train_epochs = 1 }\n'
                 'data = { source = "builtin:digits" }\n'
                 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n'
                 '[[passes]]\nkind = "test.scale"\nfactor = 0.5\n[[targets]]\nkind = "onnxruntime"\n')
    cache_dir = tmp_path / "cache"
    rep1 = run(r, out_dir=tmp_path / "o1", cache_dir=cache_dir, progress=False, write=False)
    acc1 = {c.variant: c.accuracy_top1 for c in rep1.results}
    assert all(a is not None for a in acc1.values()), acc1

    entries = [(json.loads((e / "artifact.json").read_text()).get("producer") or "", e)
               for e in (cache_dir / "objects").iterdir()]
    onnx_digest = rep1.variants["c"].onnx_digest
    exported = next(e for e in (cache_dir / "objects").iterdir()
                    if json.loads((e / "artifact.json").read_text())["digest"] == onnx_digest)
    compiled = next(e for p, e in entries if p.startswith("compile onnxruntime")
                    and json.loads((e / "artifact.json").read_text())["parent"] != onnx_digest)  # the baseline's
    before = _outputs(compiled / "model.onnx")
    _flip_in_largest_weight(exported / "model.onnx")
    _flip_in_largest_weight(compiled / "model.onnx")
    assert not np.allclose(before, _outputs(compiled / "model.onnx"))  # served as is, it would compute garbage

    notes: list[str] = []
    rep2 = run(r, out_dir=tmp_path / "o2", cache_dir=cache_dir, progress=False, write=False, log=notes.append)
    acc2 = {c.variant: c.accuracy_top1 for c in rep2.results}
    assert acc2 == acc1  # the rebuilt models compute what the originals did
    assert rep2.variants["c"].onnx_digest == onnx_digest
    export_step = next(s for s in rep2.variants["c"].steps if s.pass_ == "export.onnx")
    assert not export_step.cache_hit
    base_ort = rep2.cell("baseline", "onnxruntime")
    assert base_ort is not None and not base_ort.build_cache_hit and base_ort.status == "ok"
    bad = [n for n in rep2.notes if "was not used" in n]
    assert len(bad) == 2 and any(exported.name[:16] in n for n in bad) and any(compiled.name[:16] in n for n in bad)
    assert sum("WARNING cache entry" in m for m in notes) == 2
