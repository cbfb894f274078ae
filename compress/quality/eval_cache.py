"""Evaluations cached by artifact digest and evaluation settings (Olive's evaluations by model id, keyed
as strictly as the artifact cache).

A cell's accuracy and fidelity are a function of its compiled model (the content digest), the target that
runs it (name, settings, fingerprint, the target's code identity), the evaluation data (its digest, or the
synthetic inputs' recipe when there is none), the batch the evaluation runs at, the output kind and user
metric, the code that evaluates (``code_identity`` of the scoring module) and the library versions; its
fidelity also of the reference it is compared with (that reference's own key). The record of an evaluation
is kept under the SHA-256 of all of these: a second run, or a search trial whose model another trial already
made, reads the record instead of running the model over the evaluation data again. The reference's outputs
are kept beside its record (up to ``MAX_OUTPUTS_BYTES``) so that a new candidate's fidelity does not run the
reference again either.

Records live in ``<cache>/evaluations/<key[:2]>/<key>.json``, each with the SHA-256 of its content: it is
written to a private temporary file and renamed into place (concurrent writers of one key each rename a
whole, equivalent file), and verified on read; a record whose content does not match its digest, or whose
outputs file changed, is discarded with a note (as the artifact cache does) and the evaluation runs again.
Every evaluation a run served or made is listed in ``Cache.evaluations``, from which the run's lineage
(``compress.core.lineage``) records it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.artifact import sha256_json
from ..core.versions import library_versions

if TYPE_CHECKING:
    from ..core.cache import Cache
    from ..measuring.measurement import Cell
    from ..stages.execute import Variant
    from ..stages.plan import Plan

FORMAT = 1
MAX_OUTPUTS_BYTES = 256 * 2**20  # a reference's outputs above this are not kept (it runs again when needed)
EVAL_BATCH = 64  # the batch accuracy and fidelity run at when the model takes any batch (else 1)
SCORED = "accuracy+fidelity"
PARITY = "parity"

# compute(cells, variants, data, root, say, output_kind, metric, ref_outputs) -> the reference's outputs
Compute = Callable[..., "np.ndarray | None"]


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EvalStore:
    """The evaluation records of one cache folder (``<cache>/evaluations``), verified on read."""

    def __init__(self, cache: Cache) -> None:
        self.dir = cache.root / "evaluations"
        self.cache = cache

    def _path(self, key: str, suffix: str = ".json") -> Path:
        return self.dir / key[:2] / f"{key}{suffix}"

    def _discard(self, key: str, problem: str) -> None:
        for p in (self._path(key), self._path(key, ".npy")):
            p.unlink(missing_ok=True)
        note = f"cached evaluation {key[:16]} was not used: {problem}; it was discarded and evaluated again"
        self.cache.notes.append(note)
        if self.cache.log is not None:
            self.cache.log(f"WARNING {note}")

    def get(self, key: str) -> dict[str, Any] | None:
        """The record kept under ``key``, verified against its recorded digest; None to evaluate."""
        p = self._path(key)
        try:
            text = p.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._discard(key, f"it cannot be read ({e})")
            return None
        try:
            d = json.loads(text)
            ok = (isinstance(d, dict) and d.get("format") == FORMAT and d.get("key") == key
                  and isinstance(d.get("record"), dict) and d.get("sha256") == sha256_json(d["record"]))
        except ValueError:
            ok = False
        if not ok:
            self._discard(key, "its content no longer matches the digest recorded when it was written")
            return None
        record: dict[str, Any] = d["record"]
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Keep ``record`` under ``key``: written whole to a temporary file, then renamed into place."""
        record = json.loads(json.dumps(record, default=_plain))  # what a reader will get back, exactly
        self._write(self._path(key), json.dumps({"format": FORMAT, "key": key, "record": record,
                                                 "sha256": sha256_json(record)}, sort_keys=True).encode())

    def _write(self, dest: Path, data: bytes) -> None:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except OSError as e:  # a cache that cannot be written costs the next run an evaluation, not this run
            if self.cache.log is not None:
                self.cache.log(f"WARNING evaluation not cached ({dest}: {e})")

    def outputs(self, key: str) -> np.ndarray | None:
        """The outputs kept with the record under ``key`` (the reference's), verified; None when not kept."""
        rec = self.get(key)
        digest = rec.get("outputs_sha256") if rec is not None else None
        p = self._path(key, ".npy")
        if not isinstance(digest, str) or not p.is_file():
            return None
        if _digest_file(p) != digest:
            self._discard(key, "its outputs file changed on disk")
            return None
        return np.load(p, allow_pickle=False)

    def put_outputs(self, key: str, record: dict[str, Any], out: np.ndarray) -> None:
        """Keep the reference's outputs (when small enough), then its record naming their digest."""
        if out.nbytes <= MAX_OUTPUTS_BYTES:
            import io

            buf = io.BytesIO()
            np.save(buf, out, allow_pickle=False)
            data = buf.getvalue()
            self._write(self._path(key, ".npy"), data)
            record = {**record, "outputs_sha256": hashlib.sha256(data).hexdigest()}
        self.put(key, record)


def _plain(o: Any) -> Any:
    """JSON for numpy scalars and arrays in a figure (anything else as its text)."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ------------------------------------------------------------------------------------------- keys


def metric_identity(metric: str | None) -> dict[str, Any] | None:
    """A user metric's name and the digest of the file that defines it (its edit evaluates again)."""
    if not metric:
        return None
    source = None
    try:
        spec = importlib.util.find_spec(metric.partition(":")[0])
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            source = _digest_file(Path(spec.origin))
    except (ImportError, ValueError, OSError):  # load_metric refuses it with its own line when it runs
        pass
    return {"spec": metric, "source": source}


def eval_batch(cell: Cell) -> int:
    """The batch a cell is evaluated at: ``EVAL_BATCH`` when the model takes any batch, else 1."""
    dynamic = cell.compiled is None or bool(cell.compiled.known_facts().dynamic_batch)
    return EVAL_BATCH if (cell.caps.any_batch or dynamic) else 1


def settings(plan: Plan, cell: Cell, targets: dict[str, dict[str, Any]], code: str) -> dict[str, Any]:
    """Everything besides the model that decides a cell's evaluation (see the module's docstring)."""
    from .fidelity import SYNTHETIC_SAMPLES

    data = plan.data
    inputs: dict[str, Any] = ({"data": data.digest, "split": "val", "labelled": data.labelled} if data is not None
                              else {"synthetic": SYNTHETIC_SAMPLES, "seed": 1234,
                                    "inputs": [s.to_json() for s in plan.root.inputs]})
    return {**inputs, "batch": eval_batch(cell), "target": {"name": cell.target, "config": cell.config,
                                                            **targets.get(cell.target, {})},
            "code": code, "libs": library_versions()}


def evaluation_key(artifact: str, what: str, setting: dict[str, Any], reference: str | None = None,
                   scoring: dict[str, Any] | None = None) -> str:
    """The key of one evaluation: the artifact's digest, what is evaluated, the settings, and (fidelity) the
    reference's own key with the output kind and metric it is judged by."""
    return sha256_json({"artifact": artifact, "what": what, "settings": setting, "reference": reference,
                        "scoring": scoring or {}})


# ------------------------------------------------------------------------------------------ scoring


def _reference(cells: list[Cell]) -> Cell | None:
    """The cell every other cell's fidelity is judged against, picked as the scorer picks it: the baseline on the
    reference target, else the baseline on the first target that measured it."""
    from ..stages.plan import BASELINE

    return next((c for c in cells if c.variant == BASELINE and c.status == "ok" and c.caps.reference), None) or next(
        (c for c in cells if c.variant == BASELINE and c.status == "ok"), None)


def _note(cache: Cache, cell: Cell, what: str, key: str, setting: dict[str, Any], cached: bool,
          results: dict[str, Any]) -> None:
    cache.evaluations.append({"variant": cell.variant, "target": cell.target, "what": what,
                              "artifact": cell.compiled.digest if cell.compiled is not None else None,
                              "key": key, "settings": sha256_json(setting), "cached": cached, "results": results})


def _results(cell: Cell) -> dict[str, Any]:
    return {"accuracy_top1": cell.accuracy, "fidelity": cell.fidelity}


def score(plan: Plan, cells: list[Cell], variants: list[Variant], output_kind: str, compute: Compute) -> None:
    """Accuracy and fidelity of every cell, each read from the evaluation cache when an identical evaluation
    is kept there, else computed by ``compute`` (the scorer) and kept. Only the cells not kept are run over
    the evaluation data, with the reference's kept outputs when it is itself kept."""
    from ..core.registry import code_identity

    say, metric, store = plan.say, plan.recipe.measure.metric, EvalStore(plan.cache)
    ref = _reference(cells)
    todo = [c for c in cells if c.status == "ok" and not c.reference]
    if ref is None or any(c.compiled is None for c in todo):  # no reference, or a model without a digest to key
        compute(cells, variants, plan.data, plan.root, say, output_kind, metric)
        return
    measured = {c.target for c in todo}  # an unavailable target's fingerprint is not asked for
    targets = {t.name: {**t.fingerprint(), "code": code_identity(type(t).__module__),
                        "settings": t.config.model_dump(mode="json")} for t in plan.targets if t.name in measured}
    code = code_identity(getattr(compute, "__module__", __name__))
    scoring = {"output_kind": output_kind, "metric": metric_identity(metric)}
    setting = {id(c): settings(plan, c, targets, code) for c in todo}
    digest = {id(c): c.compiled.digest for c in todo if c.compiled is not None}  # every one (checked above)
    own = {id(c): evaluation_key(digest[id(c)], "outputs", setting[id(c)]) for c in todo}
    keys = {id(c): evaluation_key(digest[id(c)], SCORED, setting[id(c)], own[id(ref)], scoring) for c in todo}
    missed: list[Cell] = []
    for c in todo:
        kept = store.get(keys[id(c)])
        if kept is None:
            missed.append(c)
            continue
        c.accuracy, c.fidelity = kept.get("accuracy_top1"), kept.get("fidelity")
        _note(plan.cache, c, SCORED, keys[id(c)], setting[id(c)], True, kept)
        say(f"score {c.variant}/{c.target}: cached evaluation (same model digest {digest[id(c)][:12]} and "
            "evaluation settings)")
    if not missed:
        say(f"fidelity reference: baseline on {ref.target} (cached evaluation)")
        return
    ref_kept = all(c is not ref for c in missed)
    ref_out = store.outputs(own[id(ref)]) if ref_kept else None
    if ref_out is None and ref_kept:
        missed.insert(0, ref)  # its outputs were not kept (too large, or discarded): it runs again
        plan.cache.evaluations[:] = [e for e in plan.cache.evaluations if e["key"] != keys[id(ref)]]
    run_now = {id(c) for c in missed} | {id(ref)}
    out = compute([c for c in cells if id(c) in run_now], variants, plan.data, plan.root, say, output_kind,
                  metric, ref_out)
    if out is not None and ref_out is None and ref.status == "ok":
        store.put_outputs(own[id(ref)], {"variant": ref.variant, "target": ref.target}, out)
    for c in missed:
        if c.status == "ok":  # a failed inference is not kept: the next run tries it again
            store.put(keys[id(c)], _results(c))
            _note(plan.cache, c, SCORED, keys[id(c)], setting[id(c)], False, _results(c))


def parity(cache: Cache, cell: Cell, target: Any, src_digest: str, precision: str, batch: int, data: Any,
           seed: int, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A build's parity check against its input model (``quality.parity.target_parity``, run by ``check``), read
    from the evaluation cache when the same build was checked against the same input model alike: the same
    precision, batch, calibration data, seed, target (settings, fingerprint, code) and parity code."""
    from ..core.registry import code_identity

    assert cell.compiled is not None  # a parity check runs on a build
    setting = {"input": src_digest, "precision": precision, "batch": batch, "seed": seed,
               "data": getattr(data, "digest", None), "libs": library_versions(), "code": code_identity(__name__),
               "parity_code": code_identity("compress.quality.parity"),
               # Every setting, the parity bounds included (the build's key leaves them out: they do not change it).
               "target": {"name": cell.target, "config": target.config.model_dump(mode="json"), **target.fingerprint(),
                          "code": code_identity(type(target).__module__)}}
    key = evaluation_key(cell.compiled.digest, PARITY, setting)
    store = EvalStore(cache)
    kept = store.get(key)
    if kept is not None:
        _note(cache, cell, PARITY, key, setting, True, kept)
        return kept
    rec = check()
    store.put(key, rec)
    _note(cache, cell, PARITY, key, setting, False, rec)
    return store.get(key) or rec  # as a later run reads it (JSON figures), so both runs report alike
