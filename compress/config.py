"""Typed configs for passes and targets (pydantic, frozen, unknown keys rejected)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class PassConfig(BaseModel):
    """Base of every pass config. Subclasses set ``kind`` as a ``Literal``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str

    def options(self) -> dict[str, Any]:
        """Settings that differ from the defaults (for the text form and reports)."""
        return {k: v for k, v in self.model_dump(exclude={"kind"}, mode="json").items()
                if k in self.model_fields_set}

    def canonical(self) -> dict[str, Any]:
        """Every setting, defaults included (what the cache key hashes)."""
        return self.model_dump(mode="json")


class TargetConfig(PassConfig):
    """Base of every target config."""
