"""The pass manager: validates a chain of passes, then runs it through the cache.

torch.fx's lesson: the whole chain is checked (each pass accepts what the one
before produced) before anything runs, and a failure names the pass that failed
and the passes that ran before it, raised ``from`` the original exception.
TVM's lesson: timing and verification are instruments hooked into the manager,
not code inside passes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import CompressError, PassError, RecipeError
from .artifact import COMPILED, ONNX, PYTORCH, Artifact
from .cache import Cache
from .config import PassConfig, format_step
from .registry import PassInfo, get_pass, passes

PassResult = Artifact


@dataclass
class PassContext:
    """What a pass may use besides its input. Passed explicitly; there is no global."""

    cache: Cache
    data: Any = None  # compress.inputs.data.DataBundle or None
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: None)
    original: Artifact | None = None  # the model as it entered the pipeline (teacher, fidelity)
    text: Any = None  # compress.inputs.causal_lm.LMText: token windows of real text, for a causal LM
    _dirs: list[Path] = field(default_factory=list, repr=False)

    def new_dir(self, prefix: str = "work") -> Path:
        d = self.cache.new_dir(prefix)
        self._dirs.append(d)  # removed by the manager if the pass fails
        return d

    def discard_dirs(self) -> None:
        for d in self._dirs:
            if d.parent == self.cache.tmp:
                shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()


@dataclass
class StepRecord:
    index: int
    kind: str
    text: str
    cache_hit: bool
    seconds: float
    digest: str
    key: str
    info: dict[str, Any] = field(default_factory=dict)
    artifact: Artifact | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pass": self.kind, "text": self.text, "cache_hit": self.cache_hit,
                "seconds": round(self.seconds, 4), "digest": self.digest, "key": self.key}


class Instrument(Protocol):
    def before(self, step: int, cfg: PassConfig, art: Artifact, ctx: PassContext) -> None: ...
    def after(self, step: int, cfg: PassConfig, out: Artifact, record: StepRecord, ctx: PassContext) -> None: ...

    def for_chain(self, name: str) -> Instrument:
        """The instrument for one named chain of a run (its own copy where it keeps per-chain state)."""
        ...


class TimingInstrument:
    """Collects wall time per pass (cache hits included, shown as hits), as the manager measured it
    once for the step record: there is one clock per pass, not one per instrument."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, bool]] = []

    def for_chain(self, name: str) -> TimingInstrument:
        return self  # one list of every chain's passes, in the order they ran

    def before(self, step: int, cfg: PassConfig, art: Artifact, ctx: PassContext) -> None:
        pass

    def after(self, step: int, cfg: PassConfig, out: Artifact, record: StepRecord, ctx: PassContext) -> None:
        self.times.append((record.text, record.seconds, record.cache_hit))


class DumpInstrument:
    """Writes what each pass produced into a folder, for debugging a chain (``compress run --dump-ir``):
    ``NN-kind.onnx.txt`` (the ONNX graph in ONNX's text syntax) and ``NN-kind.onnx`` for ONNX models,
    ``NN-kind.txt`` (the module tree with parameter counts) for PyTorch ones, and ``NN-kind.json``
    (the artifact's facts, digest and the pass's metadata)."""

    def __init__(self, folder: Path, prefix: str = "") -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.written: list[Path] = []

    def for_chain(self, name: str) -> DumpInstrument:
        """The instrument for one named chain of a run: its own subfolder, so variants never collide."""
        return DumpInstrument(self.folder / name, self.prefix)

    def before(self, step: int, cfg: PassConfig, art: Artifact, ctx: PassContext) -> None:
        pass

    def after(self, step: int, cfg: PassConfig, out: Artifact, record: StepRecord, ctx: PassContext) -> None:
        import json

        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"{self.prefix}{step + 1:02d}-{cfg.kind}"
        info = {"step": record.text, "digest": out.digest, "kind": out.kind, "cache_hit": record.cache_hit,
                "facts": out.known_facts().to_json(), "metadata": out.metadata.get(cfg.kind)}
        files = {stem.with_name(stem.name + ".json"): json.dumps(info, indent=2, default=str)}
        model = out.path / "model.onnx"
        if out.kind == ONNX and model.is_file():
            import onnx

            proto = onnx.load(str(model), load_external_data=False)
            files[stem.with_name(stem.name + ".onnx.txt")] = onnx.printer.to_text(proto.graph)
            shutil.copy2(model, stem.with_name(stem.name + ".onnx"))
            self.written.append(stem.with_name(stem.name + ".onnx"))
        elif out.kind == PYTORCH:
            from ..inputs.torch_io import load_torch

            module = out.obj if out.obj is not None else load_torch(out)
            n = sum(p.numel() for p in module.parameters())
            files[stem.with_name(stem.name + ".txt")] = f"# {n:,} parameters\n{module}\n"
        for path, text in files.items():
            path.write_text(text)
            self.written.append(path)


class VerifyInstrument:
    """After each pass, checks the output is a usable model of its declared kind."""

    def for_chain(self, name: str) -> VerifyInstrument:
        return self  # keeps no state

    def before(self, step: int, cfg: PassConfig, art: Artifact, ctx: PassContext) -> None:
        pass

    def after(self, step: int, cfg: PassConfig, out: Artifact, record: StepRecord, ctx: PassContext) -> None:
        from .verify import verify_artifact

        verify_artifact(out)


def pass_text(cfg: PassConfig) -> str:
    return format_step(cfg)


_A_MODEL = {PYTORCH: "a PyTorch model", ONNX: "an ONNX model", COMPILED: "a compiled model"}


class PassManager:
    """Runs a validated chain of pass configs over an artifact."""

    def __init__(self, steps: Sequence[PassConfig], instruments: Sequence[Instrument] = ()) -> None:
        self.steps = list(steps)
        self.infos: list[PassInfo] = [get_pass(s.kind) for s in self.steps]
        self.instruments = list(instruments)

    def validate(self, start_kind: str) -> str:
        """Check every pass consumes what the previous one produced; return the final kind."""
        kind = start_kind
        for i, (cfg, info) in enumerate(zip(self.steps, self.infos, strict=True)):
            if info.consumes != kind:
                before = ", ".join(s.kind for s in self.steps[:i]) or "nothing"
                hint = ""
                lowering = next((p.kind for p in passes().values() if p.caps.lowers_to_onnx), "an ONNX export")
                if info.consumes == PYTORCH and kind == ONNX and start_kind == ONNX and not any(
                        p.caps.lowers_to_onnx for p in self.infos[:i]):
                    onnx_passes = ", ".join(sorted(k for k, p in passes().items()
                                                   if p.consumes == ONNX and not p.caps.lowers_to_onnx))
                    hint = (f"; '{cfg.kind}' runs on PyTorch models and the model is an ONNX file, which cannot "
                            f"be turned back into PyTorch: start from the PyTorch model (zoo:NAME, "
                            f"package.module:factory or .pt2) or use ONNX passes only ({onnx_passes})")
                elif info.consumes == PYTORCH and kind == ONNX:
                    hint = (f"; '{cfg.kind}' runs on PyTorch models, so put it before {lowering} "
                            "(or start from a PyTorch model, not an .onnx file)")
                elif info.consumes == ONNX and kind == PYTORCH:
                    hint = f"; add {lowering} before it"
                raise RecipeError(
                    f"pass #{i + 1} '{cfg.kind}' consumes {_A_MODEL[info.consumes]} but gets {_A_MODEL[kind]} "
                    f"(after: {before}){hint}"
                )
            kind = info.produces
        return kind

    def run(self, art: Artifact, ctx: PassContext) -> tuple[Artifact, list[StepRecord]]:
        self.validate(art.kind)
        records: list[StepRecord] = []
        for i, (cfg, info) in enumerate(zip(self.steps, self.infos, strict=True)):
            text = pass_text(cfg)
            # Seed, data and the original model change what training/calibrating passes produce.
            # The pass's code identity: editing a pass (or a helper of its package it imports)
            # invalidates exactly its entries.
            extra = {"seed": ctx.seed,
                     "data": getattr(ctx.data, "digest", None),
                     "original": ctx.original.digest if ctx.original is not None else None,
                     "env": cfg.cache_env(),
                     "code": info.identity}
            if ctx.text is not None:  # a causal LM's calibration text (GPTQ, pruning, distillation read it)
                extra["text"] = ctx.text.digest
            key = Cache.key(art.digest, cfg.kind, info.version, cfg.canonical(), extra)
            for ins in self.instruments:
                ins.before(i, cfg, art, ctx)
            t0 = time.perf_counter()
            hit = ctx.cache.get(key)
            if hit is not None:
                out = hit
                ctx.log(f"[{i + 1}/{len(self.steps)}] {text}: cache hit")
            else:
                ctx.log(f"[{i + 1}/{len(self.steps)}] {text}: running")
                ctx._dirs.clear()
                try:
                    out = info.fn(art, cfg, ctx)
                    if out.kind != info.produces:
                        raise PassError(f"pass returned a {out.kind} artifact, declared {info.produces}")
                    out.parent = art.digest
                    out.producer = text
                    merged = dict(art.metadata)
                    merged.update(out.metadata)
                    merged["history"] = [*art.metadata.get("history", []), text]
                    out.metadata = merged
                    if out.facts is None:  # the pass left the facts as they were
                        out.facts = art.known_facts()
                    out = ctx.cache.put(key, out)
                except KeyboardInterrupt:
                    ctx.discard_dirs()
                    raise
                except Exception as e:
                    ctx.discard_dirs()
                    raise _chain_error(i, cfg, self.steps[:i], e) from e
                ctx._dirs.clear()
            rec = StepRecord(i, cfg.kind, text, hit is not None, time.perf_counter() - t0, out.digest, key,
                             out.metadata.get(cfg.kind, {}) if isinstance(out.metadata.get(cfg.kind), dict) else {},
                             artifact=out)
            try:
                for ins in self.instruments:
                    ins.after(i, cfg, out, rec, ctx)
            except Exception as e:
                raise _chain_error(i, cfg, self.steps[:i], e) from e
            records.append(rec)
            art = out
        return art, records


def _chain_error(i: int, cfg: PassConfig, before: Sequence[PassConfig], e: BaseException) -> CompressError:
    ran = ", ".join(s.kind for s in before) or "none"
    msg = f"pass #{i + 1} '{cfg.kind}' failed: {e} (passes that ran before it: {ran})"
    cls = type(e) if isinstance(e, CompressError) else PassError
    try:
        return cls(msg)
    except TypeError:
        return PassError(msg)
