"""Lowering: torch -> ONNX, checked structurally and numerically against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from compress.core.artifact import Artifact, InputSpec, sha256_files
from compress.core.config import PassConfig
from compress.core.manager import PassContext
from compress.core.registry import register_pass
from compress.errors import ExportError
from compress.inputs.onnx_io import check_external_data, onnx_input_specs  # noqa: F401  (re-exported)
from compress.inputs.torch_io import load_torch, sample_inputs, set_eval
from compress.quality.parity import Tolerance, check, compare_outputs


class ExportOnnx(PassConfig):
    """Export with torch's ONNX exporter, then check the graph and its numerical parity."""

    kind: Literal["export.onnx"] = "export.onnx"
    opset: int = Field(20, ge=13, le=23)
    dynamic_batch: bool = True
    dynamo: bool = True
    atol: float = Field(1e-4, gt=0)
    min_cosine: float = Field(0.9999, gt=0, le=1)
    parity_samples: int = Field(4, ge=1, le=256)


def parity(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Max/mean abs diff and cosine between two lists of outputs (``compress.quality.parity.compare_outputs``)."""
    return compare_outputs(ref, got)


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, cfg: ExportOnnx,
            names: list[str], specs: tuple[InputSpec, ...] = ()) -> None:
    dyn: Any = None
    # Named dynamic axes beyond the batch (e.g. {1: "seq"}); one Dim per name, shared by every input using it.
    extra = [dict(s.dynamic_axes) for s in specs] if specs else [{} for _ in args]
    if cfg.dynamic_batch or any(extra):
        if cfg.dynamo:
            dims: dict[str, Any] = {}

            def dim(name: str) -> Any:
                if name not in dims:
                    dims[name] = torch.export.Dim(name, min=1, max=4096) if name == "batch" else torch.export.Dim(
                        name, min=2, max=8192)
                return dims[name]

            dyn = tuple({**({0: dim("batch")} if cfg.dynamic_batch else {}), **{a: dim(n) for a, n in e.items()}}
                        for e in extra)
        else:
            dyn = ({n: {**({0: "batch"} if cfg.dynamic_batch else {}), **e} for n, e in zip(names, extra, strict=True)}
                   | ({"output": {0: "batch"}} if cfg.dynamic_batch else {}))
    buf = io.StringIO()
    # The exporter is chatty on stdout, stderr, torch's loggers (ERROR-level guard tracebacks included) and
    # warnings; keep what it says for the debug log and --debug instead of spilling it on the terminal.
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                _loggers_into(buf):
            warnings.simplefilter("ignore")
            _export_quiet(module, args, path, cfg, names, dyn)
    except Exception as e:
        e.add_note(buf.getvalue())  # the exporter's output, shown with the traceback under --debug
        raise
    finally:
        if buf.getvalue().strip():
            DEBUG_LOG.debug("torch.onnx.export (dynamo=%s, dynamic_batch=%s) said:\n%s", cfg.dynamo,
                            cfg.dynamic_batch, buf.getvalue())


# Where the exporter's own output goes: the debug log (the "compress" logger at DEBUG, set by --debug).
DEBUG_LOG = logging.getLogger("compress.export")
_LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")


@contextlib.contextmanager
def _loggers_into(buf: io.StringIO) -> Any:
    """Every handler of the root logger and of torch's / ONNX Script's loggers replaced by one writing to ``buf``.

    torch installs its own stderr handler (created before any redirect, so redirecting sys.stderr misses it)
    and logs guard failures at ERROR level, which ``logging.disable(WARNING)`` let through."""
    sink = logging.StreamHandler(buf)
    sink.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    lgs = [logging.getLogger(), *(logging.getLogger(n) for n in _LIBRARY_LOGGERS)]
    lgs += [lg for n, lg in list(logging.root.manager.loggerDict.items())
            if isinstance(lg, logging.Logger) and n.split(".")[0] in _LIBRARY_LOGGERS and lg.handlers]
    saved = [(lg, lg.handlers[:]) for lg in lgs]
    try:
        for lg, _ in saved:
            lg.handlers = [sink]
        yield
    finally:
        for lg, handlers in saved:
            lg.handlers = handlers


def _export_quiet(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, cfg: ExportOnnx,
                  names: list[str], dyn: Any) -> None:
    if cfg.dynamo:
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=cfg.opset, input_names=names,
                                 output_names=["output"], dynamic_shapes=dyn, verbose=False)
        if prog is None:  # only None when given a path to write to, which is not done here
            raise ExportError(f"{cfg.kind}: the dynamo exporter returned no program")
        prog.save(str(path))
    else:
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=cfg.opset, input_names=names,
                          output_names=["output"], dynamic_axes=dyn)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


def export_cause(e: BaseException) -> str:
    """One line naming why the exporter failed: the innermost exception's first line and, when the
    exporter reports it, the user's line of code that triggered it (torch wraps the real cause in
    several layers of advice with terminal colour codes)."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    root = chain[-1]
    text = _ANSI.sub("", str(root)).strip()
    first = (text.splitlines() or [type(root).__name__])[0].strip()
    where = ""
    frames = [m for c in chain for m in _USER_FRAME.finditer(_ANSI.sub("", str(c)))
              if "site-packages" not in m.group(1)]
    if frames:
        f = frames[-1]
        where = f" at {f.group(1)}:{f.group(2)} in {f.group(3)} ({f.group(4).strip()[:120]})"
    # A constraint violation's reason is on its next line ("- Not all values of batch ... satisfy ... <= 2").
    lines = [ln.strip() for ln in text.splitlines()]
    detail = next((ln[2:] for ln in lines[1:4] if ln.startswith("- ")), "")
    if detail:
        first = f"{first} {detail[:200]}"
    return f"{type(root).__name__}: {first[:500]}{where}"


def _working_fallback(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out_dir: Path, cfg: ExportOnnx,
                      names: list[str], specs: tuple[InputSpec, ...]) -> str | None:
    """The first setting under which this module does export (so the message names one that works)."""
    tries = []
    if cfg.dynamic_batch:
        tries.append(({"dynamic_batch": False}, "export.onnx{dynamic_batch=false}"))
    if cfg.dynamo:
        tries.append(({"dynamo": False}, "export.onnx{dynamo=false} (the legacy TorchScript exporter)"))
        if cfg.dynamic_batch:
            tries.append(({"dynamo": False, "dynamic_batch": False}, "export.onnx{dynamo=false, dynamic_batch=false}"))
    for change, text in tries:
        probe = out_dir / "probe.onnx"
        try:
            _export(module, args, probe, cfg.model_copy(update=change), names, specs)
            return text
        except Exception:  # this fallback does not work either; try the next
            continue
        finally:
            for f in out_dir.iterdir():
                f.unlink()
    return None


class _BatchOnly(Exception):
    """The dynamic-batch model came out, but with its batch fixed or failing at a batch above one."""


def _flat(e: BaseException) -> str:
    """An exception's whole message on one line (ONNX Runtime puts the dimension it refused on a later line)."""
    return " ".join(_ANSI.sub("", str(e)).split())[:500] or type(e).__name__


def _fixed_batch_inputs(model: Any, names: list[str]) -> list[str]:
    """Inputs whose first dimension the exporter fixed although a dynamic batch was asked for."""
    out = []
    for inp in model.graph.input:
        if inp.name not in names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            out.append(f"{inp.name} (batch {dims[0].dim_value})")
    return out


# torch.onnx writes a stack trace with each node (absolute paths of the source files): the artifact's digest
# then depends on where the code is checked out, so two checkouts of one commit would build different
# models and share no cache entry. The other metadata (module scopes, class paths) stays for debugging.
_SOURCE_PATH_KEYS = frozenset({"pkg.torch.onnx.stack_trace"})


def _without_source_paths(model: Any) -> Any:
    """``model`` with the node metadata that records source file paths removed (subgraphs included)."""
    import onnx

    def clean(graph: Any) -> None:
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key not in _SOURCE_PATH_KEYS]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    clean(a.g)
                for g in a.graphs:
                    clean(g)

    clean(model.graph)
    return model


def _lower(module: torch.nn.Module, art: Artifact, cfg: ExportOnnx, ctx: PassContext, out_dir: Path,
           names: list[str]) -> tuple[Any, dict[str, Any], float]:
    """Export into ``out_dir``, check the graph, and compare with PyTorch; (model, parity record, atol).

    Raises ``_BatchOnly`` when a dynamic-batch export fixed the batch or fails at a larger batch: the failures
    a fixed-batch export avoids."""
    import onnx
    import onnxruntime as ort

    path = out_dir / "model.onnx"
    _export(module, sample_inputs(art.inputs, seed=ctx.seed), path, cfg, names, art.inputs)
    model = _without_source_paths(onnx.load(str(path)))
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"exported graph failed onnx.checker: {e}") from e
    # External data files are merged so the artifact is one self-contained file.
    for f in out_dir.iterdir():
        if f != path:
            f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=False)
    if cfg.dynamic_batch and (fixed := _fixed_batch_inputs(model, names)):
        raise _BatchOnly(f"the exporter fixed the batch dimension of {', '.join(fixed)}")

    # Parity on random inputs at batch 1 and, when dynamic, at a larger batch.
    batches = [1, cfg.parity_samples] if cfg.dynamic_batch and cfg.parity_samples > 1 else [1]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    atol = cfg.atol
    guaranteed = art.known_facts().lowering_atol
    if "atol" not in cfg.model_fields_set and guaranteed is not None:
        # E.g. a fake-quantized model: ONNX may round a tie the other way, one quantization step off.
        atol = max(atol, guaranteed)
    tol = Tolerance(atol=atol, min_cosine=cfg.min_cosine)
    worst: dict[str, Any] = {}
    rec: dict[str, Any] = {}
    for b in batches:
        xs = sample_inputs(art.inputs, batch=b, seed=ctx.seed + b)
        with torch.inference_mode():
            ref = module(*xs)
        ref_l = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        try:
            got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})
        except Exception as e:  # onnxruntime's own error types: the exported graph cannot run at this batch
            if b > 1:
                raise _BatchOnly(f"ONNX Runtime cannot run it at batch {b}: {_flat(e)}") from e
            raise ExportError(f"ONNX Runtime cannot run the exported model: {_flat(e)}") from e
        rec = check(ref_l, got, tol, precision="fp32", reference="PyTorch (eager)", inputs=f"random inputs, batch {b}",
                    real_data=False)
        if not rec["ok"] and b > 1:  # right at batch 1, wrong at a larger batch: the graph baked the batch in
            raise _BatchOnly(f"the exported graph is right at batch 1 but not at batch {b} ({rec['reason'][:200]})")
        if not rec["ok"]:
            raise ExportError(f"ONNX output differs from PyTorch: {rec['reason']}; raise atol if this is expected")
        worst = {"max_abs_diff": max(worst.get("max_abs_diff", 0.0), rec["max_abs_diff"]),
                 "mean_abs_diff": max(worst.get("mean_abs_diff", 0.0), rec["mean_abs_diff"]),
                 "cosine": min(worst.get("cosine", 1.0), rec["cosine"])}
    worst["parity"] = {**rec, **{k: worst[k] for k in ("max_abs_diff", "mean_abs_diff", "cosine")},
                       "inputs": f"random inputs, batches {batches}", "samples": sum(batches)}
    return model, worst, atol


def _clear(out_dir: Path) -> None:
    for f in out_dir.iterdir():
        f.unlink()


@register_pass(ExportOnnx, consumes="pytorch", produces="onnx", lowers_to_onnx=True)
def export_onnx(art: Artifact, cfg: ExportOnnx, ctx: PassContext) -> Artifact:
    """Export to ONNX; check the graph; compare outputs with PyTorch.

    A dynamic batch is the default, not a promise: when that export fails in a way a fixed batch avoids
    (a shape guard on the batch, a batch the exporter fixed, a graph that cannot run at a larger batch), the
    model is exported with a fixed batch instead, which the facts, the metadata and one line of the log say.
    Set ``dynamic_batch = true`` explicitly to refuse that instead."""
    module = set_eval(load_torch(art))
    from compress.inputs.causal_lm import is_causal_lm

    if is_causal_lm(module):  # a decoder LM is lowered with its KV cache, by the exporter made for it
        from .export_decoder import export_decoder

        return export_decoder(art, module, ctx)
    names = [s.name for s in art.inputs]
    out_dir = ctx.new_dir("onnx")
    path = out_dir / "model.onnx"
    static_because: str | None = None
    try:
        model, worst, atol = _lower(module, art, cfg, ctx, out_dir, names)
    except OSError as e:  # a full disk or a vanished cache folder is not the model's fault
        raise ExportError(f"export.onnx: cannot write {path}: {e.strerror or e}; free disk space or set "
                          "--cache / COMPRESS_CACHE to another folder") from e
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many types; name the cause and the user's line it reports
        cause = str(e) if isinstance(e, _BatchOnly) else export_cause(e)
        _clear(out_dir)
        static_error: Exception | None = None
        if cfg.dynamic_batch and "dynamic_batch" not in cfg.model_fields_set:
            static = cfg.model_copy(update={"dynamic_batch": False})
            try:
                model, worst, atol = _lower(module, art, static, ctx, out_dir, names)
                cfg, static_because = static, cause
            except Exception as e2:  # a fixed batch does not help either: the error below says why
                static_error = e2
                _clear(out_dir)
        if static_because is None:
            if isinstance(e, _BatchOnly) and static_error is not None:
                why = str(static_error) if isinstance(static_error, ExportError) else export_cause(static_error)
                raise ExportError(f"{type(module).__name__}: the dynamic-batch ONNX export is unusable: {cause}; "
                                  f"with a fixed batch: {why}") from e
            if isinstance(e, _BatchOnly):
                raise ExportError(f"{type(module).__name__}: the dynamic-batch ONNX export is unusable: {cause}; "
                                  "export.onnx{dynamic_batch=false} exports it with a fixed batch") from e
            args = sample_inputs(art.inputs, seed=ctx.seed)
            fallback = _working_fallback(module, args, out_dir, cfg, names, art.inputs)
            raise ExportError(
                f"{type(module).__name__} cannot be exported to ONNX: {cause}. "
                + (f"{fallback} exports it" if fallback else
                   "Make that code traceable (no Python branching on tensor values); no fallback exported it either "
                   "(tried export.onnx{dynamo=false} and dynamic_batch=false)")
            ) from e
    notes: list[str] = []
    if static_because is not None:
        shape = "x".join(str(d) for d in art.inputs[0].shape)
        line = (f"export.onnx: exported with a fixed batch ({names[0]} {shape}) because the dynamic-batch export "
                f"failed: {static_because[:300]}")
        ctx.log(line)
        notes.append(f"fixed batch: the dynamic-batch export failed ({static_because[:300]}); every batch size "
                     "other than the one exported is refused by the runtime. Set dynamic_batch = false to skip the "
                     "attempt, or dynamic_batch = true to refuse instead")
    meta = {"export.onnx": {**worst, "atol": atol, "opset": cfg.opset, "nodes": len(model.graph.node),
                            "dynamic_batch": cfg.dynamic_batch,
                            **({"static_batch_fallback": static_because, "notes": notes} if notes else {})}}
    return Artifact("onnx", out_dir, sha256_files(out_dir), art.inputs, metadata=meta,
                    facts=art.known_facts().evolve(dynamic_batch=cfg.dynamic_batch))
