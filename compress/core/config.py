"""Typed configs for passes and targets (pydantic, frozen, unknown keys rejected)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from ..errors import RecipeError


class Draft(NamedTuple):
    """A target's speculative-decoding settings: the drafting variant, the tokens it proposes per verifier pass,
    and the top-token probability below which it stops proposing early (0: always ``k``)."""

    variant: str
    k: int
    threshold: float = 0.0


class PassConfig(BaseModel):
    """Base of every pass config. Subclasses set ``kind`` as a ``Literal``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Every registered subclass narrows this to a Literal with its own name as the default (the
    # registry refuses one that does not), so ``cls()`` is always a complete config.
    kind: str = ""

    def options(self) -> dict[str, Any]:
        """Settings that differ from their defaults (for the text form and reports)."""
        defaults = {k: f.get_default(call_default_factory=True) for k, f in type(self).model_fields.items()
                    if not f.is_required()}
        out = {}
        for k, v in self.model_dump(exclude={"kind"}, mode="json").items():
            d = defaults.get(k, object())
            if k in defaults:
                # Compare in JSON form: a tuple default and the list it dumps to are the same.
                d = type(self).__pydantic_serializer__.to_python(self.model_copy(update={k: d}),
                                                                 mode="json")[k]
            if k not in defaults or v != d:
                out[k] = v
        return out

    def canonical(self) -> dict[str, Any]:
        """Every setting, defaults included (what the cache key hashes)."""
        return self.model_dump(mode="json")

    def data_needed(self) -> str | None:
        """What data this pass cannot run without: None, "any" or "labelled" (checked before the run
        starts, so a missing ``data`` is a usage error in a second, not after the passes before it)."""
        return None

    def preflight(self, root: Any, text: Any) -> None:
        """Refuse settings that cannot work on this model before any pass runs (raise RecipeError in one
        line): ``root`` is the model as it entered the pipeline, ``text`` a causal LM's ``LMText`` or None.
        Nothing by default; the pass checks its actual input again when it runs."""

    def check_data(self, data: Any) -> None:
        """Refuse, in the plan, data this pass could not use (too few calibration samples, say), raising a one-line
        usage error, so the passes before it do not run first. ``data``: the run's DataBundle or None."""
        return None

    def cache_env(self) -> dict[str, Any]:
        """Facts outside the config that change this pass's output (e.g. the CPU's ISA for a
        quantization scheme); hashed into the cache key. None by default."""
        return {}


def true_advice(settings: Mapping[str, Any], options: Sequence[tuple[str, Any, str]]) -> list[str]:
    """The suggestions among ``options`` (setting, suggested value, text) that the run does not already follow.

    ``settings`` are the values in effect (a resolved "auto" included), so a message never tells a user to
    set what they already have."""
    missing = object()
    return [text for key, value, text in options if settings.get(key, missing) != value]


class TargetConfig(PassConfig):
    """Base of every target config.

    The ``parity_*`` settings bound how far the compiled model's outputs may be from its input
    model's (``compress.quality.parity``; ``None`` = the default for the precision it runs in). They judge
    a build but do not change it, so they stay out of the cache key.
    """

    parity_atol: float | None = Field(None, ge=0, description="parity: max abs diff allowed (plus rtol x max|ref|)")
    parity_rtol: float | None = Field(None, ge=0, description="parity: share of the largest reference output")
    parity_min_cosine: float | None = Field(None, ge=-1, le=1,
                                            description="parity: output cosine vs the input model (-1 = off)")
    parity_min_agreement: float | None = Field(None, ge=0, le=1,
                                               description="parity: top-1 agreement (real data only)")
    parity_samples: int = Field(128, ge=1, le=100_000, description="parity: validation (or random) samples compared")

    def canonical(self) -> dict[str, Any]:
        """Every setting that changes the build (the parity bounds do not)."""
        return {k: v for k, v in super().canonical().items() if not k.startswith("parity_")}

    def speculative_draft(self) -> Draft | None:
        """Causal LMs: the variant of this run that drafts for speculative decoding on this target, how many
        tokens it proposes per verifier pass and below which confidence it stops early
        (``compress.measuring.speculative``); None (the default): plain generation. A target that offers it
        declares the settings and returns them here."""
        return None

    def for_profile(self, profile: Any) -> TargetConfig:
        """These settings for a hardware profile's device (``compress.stages.profiles``): a target that compiles
        for a device fills in what the recipe left open from the profile; the default changes nothing.
        Raises pydantic's ValidationError when the profile's value does not fit."""
        return self

    @classmethod
    def check_profile_settings(cls, settings: dict[str, Any], arch: str) -> None:
        """Judge the settings a hardware profile gives this target (``Profile.targets[kind]``, a profile file's
        ``[targets.KIND]`` table) for a device of CPU architecture ``arch``; raise ValueError saying what is
        wrong. A target that reads none (the default) refuses any."""
        if settings:
            raise ValueError(f"takes no settings from a profile (got {', '.join(sorted(settings))})")


# ---------------------------------------------------------------- text form
# ``kind{key=value,...}``: how a step is shown in logs and reports and written on the command line
# (``compress.stages.recipe.parse_pipeline`` reads it back).


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    if v is None:
        raise RecipeError("None cannot be written in the text form")
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}={_fmt_value(x)}" for k, x in v.items()) + "}"
    raise RecipeError(f"cannot write {v!r} in the text form")


def format_step(cfg: PassConfig) -> str:
    opts = {k: v for k, v in cfg.options().items() if v is not None}
    if not opts:
        return cfg.kind
    return cfg.kind + "{" + ",".join(f"{k}={_fmt_value(v)}" for k, v in opts.items()) + "}"


def format_pipeline(passes: list[PassConfig], targets: list[TargetConfig]) -> str:
    left = ",".join(format_step(p) for p in passes)
    right = ",".join(format_step(t) for t in targets)
    if not right:
        return left
    return f"{left} -> {right}" if left else f"-> {right}"
