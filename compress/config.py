"""Typed configs for passes and targets (pydantic, frozen, unknown keys rejected)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


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

    def cache_env(self) -> dict[str, Any]:
        """Facts outside the config that change this pass's output (e.g. the CPU's ISA for a
        quantization scheme); hashed into the cache key. None by default."""
        return {}


class TargetConfig(PassConfig):
    """Base of every target config."""
