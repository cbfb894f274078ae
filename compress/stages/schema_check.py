"""A recipe's pass and target settings checked against the JSON Schema the plugin manifest keeps of each
config class, so a typo or an out-of-range value is answered in a fraction of a second: importing the
plugins themselves imports torch (seconds).

It only ever rejects: what it finds is an error pydantic would report the same way (an unknown key, a value
outside a bound, a choice not offered). Anything it cannot judge (types, a model validator across keys) is
left to the full validation, which runs anyway before the run starts.
"""

from __future__ import annotations

from typing import Any


def _fmt_choice(values: list[Any]) -> str:
    shown = [repr(v) for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _branch(prop: dict[str, Any], value: Any) -> dict[str, Any] | None:
    """The schema a value is held to: an Optional[...] field's non-null branch (None when it is null)."""
    options = prop.get("anyOf")
    if options is None:
        return prop
    if value is None:
        return None
    real = [o for o in options if o.get("type") != "null"]
    return real[0] if len(real) == 1 else None


def _value_error(schema: dict[str, Any], value: Any) -> tuple[str, str] | None:
    """(pydantic error type, message) for a value a field's schema refuses, as far as this module judges."""
    if "enum" in schema or "const" in schema:
        allowed = schema.get("enum", [schema.get("const")])
        if value not in allowed:
            return "literal_error", f"Input should be {_fmt_choice(allowed)}"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or schema.get("type") not in ("integer", "number"):
        return None
    for key, kind, words in (("exclusiveMaximum", "less_than", "less than"),
                             ("maximum", "less_than_equal", "less than or equal to"),
                             ("exclusiveMinimum", "greater_than", "greater than"),
                             ("minimum", "greater_than_equal", "greater than or equal to")):
        bound = schema.get(key)
        if bound is None:
            continue
        bad = {"exclusiveMaximum": value >= bound, "maximum": value > bound,
               "exclusiveMinimum": value <= bound, "minimum": value < bound}[key]
        if bad:
            return kind, f"Input should be {words} {bound}"
    return None


def table_errors(schema: dict[str, Any] | None, table: dict[str, Any]) -> list[dict[str, Any]]:
    """The errors this module can judge in one settings table, shaped like pydantic's ``e.errors()``."""
    if not schema:
        return []
    props: dict[str, Any] = schema.get("properties", {})
    errors: list[dict[str, Any]] = []
    for key, value in table.items():
        if key not in props:
            if schema.get("additionalProperties") is False:
                errors.append({"type": "extra_forbidden", "loc": (key,), "msg": "Extra inputs are not permitted",
                               "input": value})
            continue
        branch = _branch(props[key], value)
        if branch is None or "$ref" in branch:
            continue
        found = _value_error(branch, value)
        if found is not None:
            errors.append({"type": found[0], "loc": (key,), "msg": found[1], "input": value})
    return errors
