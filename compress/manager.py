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

from .artifact import Artifact
from .cache import Cache
from .config import PassConfig
from .errors import CompressError, PassError, RecipeError
from .registry import PassInfo, get_pass

PassResult = Artifact


@dataclass
class PassContext:
    """What a pass may use besides its input. Passed explicitly; there is no global."""

    cache: Cache
    data: Any = None  # compress.data.DataBundle or None
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: None)
    original: Artifact | None = None  # the model as it entered the pipeline (teacher, fidelity)
    history: list[str] = field(default_factory=list)  # text of the passes run so far
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


class TimingInstrument:
    """Collects wall time per pass (cache hits included, shown as hits)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, bool]] = []
        self._t0 = 0.0

    def before(self, step: int, cfg: PassConfig, art: Artifact, ctx: PassContext) -> None:
        self._t0 = time.perf_counter()

    def after(self, step: int, cfg: PassConfig, out: Artifact, record: StepRecord, ctx: PassContext) -> None:
        self.times.append((record.text, time.perf_counter() - self._t0, record.cache_hit))


class VerifyInstrument:
    """After each pass, checks the output is a usable model of its declared kind."""

    def before(self, step: int, cfg: PassConfig, art: Artifact, ctx: PassContext) -> None:
        pass

    def after(self, step: int, cfg: PassConfig, out: Artifact, record: StepRecord, ctx: PassContext) -> None:
        from .verify import verify_artifact

        verify_artifact(out)


def pass_text(cfg: PassConfig) -> str:
    from .recipe import format_step

    return format_step(cfg)


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
                if info.consumes == "torch" and kind == "onnx":
                    hint = (f"; '{cfg.kind}' runs on PyTorch models, so put it before export.onnx "
                            "(or start from a PyTorch model, not an .onnx file)")
                elif info.consumes == "onnx" and kind == "torch":
                    hint = "; add export.onnx before it"
                raise RecipeError(
                    f"pass #{i + 1} '{cfg.kind}' consumes a {info.consumes} model but gets a {kind} model "
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
            extra = {"seed": ctx.seed,
                     "data": getattr(ctx.data, "digest", None),
                     "original": ctx.original.digest if ctx.original is not None else None,
                     "env": cfg.cache_env()}
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
            ctx.history.append(text)
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
