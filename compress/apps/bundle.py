"""``compress export``: one folder that runs a run's compiled model on the device, without this package.

The folder holds the compiled model (the file the target's ``TargetCaps.bundle`` names: ``model.onnx``
for onnxruntime, ``model.so`` for tvm), a ``manifest.json`` (SHA-256 of every file, input
names/shapes/dtypes, precision, profile, the runtime and its exact version, the versions of the
libraries that built it), ``run.py`` (a copy of ``compress/templates/bundle_run.py``: NumPy plus the
runtime, nothing from this package) and the run's report. Which targets can be exported, and how, is
what they declare; the precision, shapes and architecture are the compiled artifact's facts.

It is written to a temporary folder beside the destination and renamed into place, so a failure
leaves no half-written bundle, and a non-empty destination is only replaced with ``force``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core.artifact import META_FILE, Artifact, sha256_file, sha256_files
from ..core.cache import MARKER
from ..core.capabilities import BundleSpec
from ..errors import InputError, RecipeError

FORMAT = "compress.bundle/v1"
# A program shipped inside every bundle (never imported by this package).
RUNNER = Path(__file__).parent.parent / "templates" / "bundle_run.py"
_SKIP_VARIANTS = ("recorded", "baseline~aa")


def exportable() -> dict[str, BundleSpec]:
    """The targets whose builds travel as a bundle, with how (``TargetCaps.bundle``)."""
    from ..core.registry import targets

    return {k: cls.caps.bundle for k, (_, cls) in targets().items() if cls.caps.bundle is not None}


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found (give the --out folder of a compress run)")
    if not path.exists():
        raise InputError(f"{run_dir}: no report.json; give the folder a compress run wrote")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable report ({e}); run the recipe again") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise InputError(f"{path}: not a compress report (no results)")
    return report


def _pick_cell(report: dict[str, Any], target: str, variant: str | None, run_dir: Path) -> dict[str, Any]:
    cells = [c for c in report["results"] if c.get("target") == target and c.get("variant") not in _SKIP_VARIANTS]
    if not cells:
        have = sorted({str(c.get("target")) for c in report["results"]})
        raise RecipeError(f"--target {target}: the run in {run_dir} has no {target} result (it has: "
                          f"{', '.join(have)})")
    if variant is None:
        compressed = [c for c in cells if c["variant"] != "baseline"]
        if len(compressed) > 1:
            raise RecipeError(f"the run in {run_dir} has several variants on {target} "
                              f"({', '.join(c['variant'] for c in compressed)}); choose one with --variant")
        cell = compressed[0] if compressed else cells[0]
    else:
        found = [c for c in cells if c["variant"] == variant]
        if not found:
            raise RecipeError(f"--variant {variant}: not in the run (variants on {target}: "
                              f"{', '.join(c['variant'] for c in cells)})")
        cell = found[0]
    if not cell.get("compiled_path") or not cell.get("compiled_digest"):
        raise InputError(f"{cell['variant']}/{target} has no compiled model in the run ({cell.get('status')}: "
                         f"{cell.get('reason')}); nothing to export")
    if cell.get("status") == "failed":
        raise InputError(f"{cell['variant']}/{target} failed in the run ({cell.get('reason')}); refusing to export it")
    return cell


def _compiled(cell: dict[str, Any], target: str, spec: BundleSpec) -> Artifact:
    path = Path(cell["compiled_path"])
    if not (path / META_FILE).exists():
        raise InputError(f"{path}: the compiled model of {cell['variant']}/{target} is no longer in the cache; run "
                         "the recipe again (with the same --cache) and export then")
    if sha256_files(path, exclude=(META_FILE, MARKER)) != cell["compiled_digest"]:
        raise InputError(f"{path}: the compiled model changed since the run (SHA-256 differs from the report); "
                         "run the recipe again and export then")
    art = Artifact.load(path)
    model = spec.model
    if not (path / model).exists():
        raise InputError(f"{path}: holds no {model}; not a {target} build")
    return art


def _outputs(model: Path) -> list[dict[str, Any]]:
    if model.suffix != ".onnx":
        return []  # a TVM library returns its outputs in the ONNX graph's order, unnamed
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    out = []
    for o in g.output:
        t = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append({"name": o.name, "shape": dims, "elem_type": onnx.TensorProto.DataType.Name(t.elem_type).lower()})
    return out


def build_manifest(report: dict[str, Any], cell: dict[str, Any], art: Artifact, target: str,
                   files: dict[str, str], run_dir: Path, spec: BundleSpec) -> dict[str, Any]:
    from ..core.versions import library_versions

    libs = library_versions()
    facts = art.known_facts()
    build = art.metadata.get(target)  # what the target recorded about its build, under its own name
    machine = report.get("machine", {})
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "producer": f"compress-pipeline {libs.get('compress-pipeline', '?')}",
        "run": {"folder": str(run_dir.resolve()), "recipe": report.get("recipe", {}).get("name"),
                "report_sha256": sha256_file(run_dir / "report.json")},
        "variant": cell["variant"], "target": target, "target_config": cell.get("target_config"),
        "model": spec.model, "compiled_digest": cell["compiled_digest"],
        "precision": facts.precision,
        "inputs": [s.to_json() for s in art.inputs],
        "outputs": _outputs(art.path / spec.model),
        # A build keeps a dynamic batch only when its facts say so (TVM builds fixed shapes).
        "static_shapes": not facts.dynamic_batch,
        "preprocessing": {"data": report.get("data"), "note": "inputs are fed as the run's data source "
                          "delivered them (no transform is applied by run.py)"},
        "profile": machine.get("profile"),
        "arch": facts.arch,
        target: {k: build.get(k) for k in ("target", "tuned", "cross_compiled") if k in build}
        if isinstance(build, dict) else None,
        "runtime": {"package": spec.runtime, "version": libs.get(spec.runtime, "absent"),
                    "why_exact": spec.why_exact, **{p: libs.get(p) for p in spec.pinned}},
        "built_with": {k: v for k, v in libs.items() if v != "absent"},
        "built_on": {"cpu": machine.get("cpu", {}).get("model"), "arch": machine.get("cpu", {}).get("arch"),
                     "python": machine.get("python")},
        "files": files,
    }


def export_bundle(run_dir: str | Path, target: str, out: str | Path, variant: str | None = None,
                  force: bool = False) -> Path:
    """Write the bundle of ``variant`` (default: the run's compressed model) on ``target`` to ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    specs = exportable()
    if target not in specs:
        raise RecipeError(f"--target {target}: export supports {', '.join(specs)}")
    spec = specs[target]
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; choose another folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out}: not empty; refusing to overwrite it (choose another folder, or --force to "
                         "replace it)")
    report = _read_report(run_dir)
    cell = _pick_cell(report, target, variant, run_dir)
    art = _compiled(cell, target, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        shutil.copy2(art.path / spec.model, tmp / spec.model)
        for name in ("report.json", "report.md"):
            if (run_dir / name).exists():
                shutil.copyfile(run_dir / name, tmp / name)  # not copy2: the reports are written private (0600)
        shutil.copy2(RUNNER, tmp / "run.py")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = build_manifest(report, cell, art, target, files, run_dir, spec)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
        aside = None
        if out.exists():
            aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, aside)
        os.replace(tmp, out)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
