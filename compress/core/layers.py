"""One way to say "which layers": the ``skip`` setting every layer-selecting pass takes.

A pass that prunes or quantizes layers leaves the ones ``skip`` selects alone (kept unpruned, kept in
float). The same selector works on PyTorch modules (names as in ``model.named_modules()``, types as their
class names) and on ONNX graph nodes (node names, ``op_type``). Entries, in a recipe or the text form:

- ``"fc"``: a layer by its name;
- ``"blocks.*.attn"``: a glob pattern over names (``*``, ``?``, ``[...]``; ``fnmatch``), whole name;
- ``"re:blocks\\.\\d+\\.attn"``: a regular expression over names, whole name (what ``keep_float_patterns`` took);
- ``"type:Conv2d"`` / ``"type:Softmax"``: every layer of a module class or ONNX op type;
- ``"first"`` / ``"last"``: the pass's first / last eligible layer (its first weight layer, usually).

From Python, ``skip`` also takes a predicate ``(module_or_node, name) -> bool`` (torchao's ``filter_fn``), alone
or with entries: ``LayerSelector(("first",), predicate=fn)``.

Every entry (and the predicate) must select at least one layer: it is checked once against the model before
the pass does any work, and one that selects nothing is refused in one line naming it and the closest real
names (a usage error, exit 2). torchao's lesson: one filter for every config, instead of a key per pass.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, model_validator

from ..errors import RecipeError
from .notices import warn_once

Predicate = Callable[[Any, str], bool]
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Layer:
    """One selectable layer: its name, its kind (module class name or ONNX op type) and the object itself."""

    name: str
    kind: str
    obj: Any


def torch_layers(model: Any) -> list[Layer]:
    """Every named submodule of ``model``, in ``named_modules()`` order (the root, named "", is left out)."""
    return [Layer(n, type(m).__name__, m) for n, m in model.named_modules() if n]


def onnx_layers(model: Any) -> list[Layer]:
    """Every named node of an ONNX ``ModelProto``, in graph order (an unnamed node cannot be named back)."""
    return [Layer(n.name, n.op_type, n) for n in model.graph.node if n.name]


def _hash_code(h: Any, code: Any) -> None:
    """Bytecode, names and constants of ``code``, nested functions' code included (by content, since a code
    object's repr holds its address, which changes from process to process)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            _hash_code(h, c)
        else:
            h.update(repr(c).encode())


def _predicate_identity(fn: Predicate) -> str:
    """A stable text for a predicate, for the cache key and reports: its name and a SHA-256 of its code,
    constants, defaults and closure values, so an edited predicate makes a new key. Globals it reads are not
    hashed (their names are): a predicate that depends on a global value should take it as a default."""
    code = getattr(fn, "__code__", None)
    h = hashlib.sha256()
    if code is not None:
        _hash_code(h, code)
    h.update(repr(getattr(fn, "__defaults__", None)).encode())
    cells = getattr(fn, "__closure__", None) or ()
    h.update(repr([getattr(c, "cell_contents", None) for c in cells]).encode())
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return f"predicate:{name}@sha256:{h.hexdigest()}"


@dataclass(frozen=True, repr=False)
class LayerSelector:
    """Entries (names, globs, ``re:``, ``type:``, ``first``/``last``) and an optional predicate; see the module doc."""

    entries: tuple[str, ...] = ()
    predicate: Predicate | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, value: Any) -> LayerSelector:
        """A selector from what a recipe or the API gives: a selector, a string, a list of strings, a predicate."""
        if isinstance(value, LayerSelector):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls((value,))
        if callable(value):
            return cls((), value)
        if isinstance(value, (list, tuple)):
            fns = [v for v in value if callable(v) and not isinstance(v, str)]
            bad = [v for v in value if not isinstance(v, str) and not callable(v)]
            if bad or len(fns) > 1:
                raise ValueError(f"skip takes layer names, patterns, 'type:<Type>', 'first'/'last' and at most one "
                                 f"predicate; got {bad[0] if bad else fns[1]!r}")
            return cls(tuple(v for v in value if isinstance(v, str)), fns[0] if fns else None)
        raise ValueError(f"skip takes a list of layer names/patterns or a predicate, not {type(value).__name__}")

    def to_json(self) -> list[str]:
        """The entries, plus the predicate's identity: what reports show and the cache key hashes."""
        return [*self.entries, *([_predicate_identity(self.predicate)] if self.predicate else [])]

    def __repr__(self) -> str:
        return repr(self.to_json())  # as a recipe writes it (``compress passes`` shows the default this way)

    def __bool__(self) -> bool:
        return bool(self.entries) or self.predicate is not None

    def __or__(self, other: LayerSelector) -> LayerSelector:
        if self.predicate and other.predicate:
            raise ValueError("skip takes at most one predicate")
        return LayerSelector(tuple(dict.fromkeys([*self.entries, *other.entries])), self.predicate or other.predicate)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.to_json()))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "array", "items": {"type": "string"},
                "description": "layers the pass leaves alone: names, globs, 're:<regex>', 'type:<Type>', "
                               "'first', 'last' (docs/passes.md, Choosing layers)"}

    # ------------------------------------------------------------------ resolution
    def select(self, layers: Sequence[Layer], pass_name: str, *, eligible: Sequence[str] | None = None,
               setting: str = "skip", what: str = "layer") -> list[str]:
        """Names of the layers selected, in model order, after checking every entry selects one.

        ``eligible``: the layers ``first`` / ``last`` count among (default: every layer). Raises RecipeError
        naming the first entry that selects nothing and the closest real names."""
        names = [ly.name for ly in layers]
        out: list[str] = []
        for entry in self.entries:
            hit = self._match(entry, layers, eligible if eligible is not None else names, pass_name, setting)
            if not hit:
                raise RecipeError(_nothing(entry, layers, pass_name, setting, what))
            out += hit
        if self.predicate is not None:
            hit = [ly.name for ly in layers if self.predicate(ly.obj, ly.name)]
            if not hit:
                name = getattr(self.predicate, "__qualname__", type(self.predicate).__name__)
                raise RecipeError(f"{pass_name}: the {setting} predicate {name}"
                                  f" selects no {what} of the model ({len(layers)} {what}s offered to it)")
            out += hit
        chosen = set(out)
        return [n for n in names if n in chosen]

    @staticmethod
    def _match(entry: str, layers: Sequence[Layer], eligible: Sequence[str], pass_name: str,
               setting: str) -> list[str]:
        if entry in ("first", "last"):
            if not eligible:
                return []
            return [eligible[0] if entry == "first" else eligible[-1]]
        if entry.startswith("type:"):
            return [ly.name for ly in layers if ly.kind == entry[5:]]
        if entry.startswith("re:"):
            try:
                rx = re.compile(entry[3:])
            except re.error as e:
                raise RecipeError(f"{pass_name}: {setting} entry {entry!r} is not a regular expression: {e}") from e
            return [ly.name for ly in layers if rx.fullmatch(ly.name)]
        if _GLOB.search(entry):
            return [ly.name for ly in layers if fnmatch.fnmatchcase(ly.name, entry)]
        return [ly.name for ly in layers if ly.name == entry]


def _nothing(entry: str, layers: Sequence[Layer], pass_name: str, setting: str, what: str) -> str:
    """One line: the entry that selects nothing, and the closest real names (or types)."""
    names = [ly.name for ly in layers]
    if entry in ("first", "last"):
        return f"{pass_name}: {setting} entry {entry!r}, but the model has no {what} this pass acts on"
    if entry.startswith("type:"):
        kinds = sorted({ly.kind for ly in layers})
        close = difflib.get_close_matches(entry[5:], kinds, n=3, cutoff=0.5)
        near = f"closest: {', '.join('type:' + c for c in close)}; " if close else ""
        return (f"{pass_name}: {setting} entry {entry!r} selects no {what}: the model has no {entry[5:]}; {near}"
                f"its types: {', '.join(kinds[:30])}")
    probe = entry[3:] if entry.startswith("re:") else entry
    close = difflib.get_close_matches(probe, names, n=3, cutoff=0.5) or names[:3]
    where = "the ONNX graph's node names" if "node" in what else "names as in model.named_modules()"
    return (f"{pass_name}: {setting} entry {entry!r} selects no {what} of the model; closest names: "
            f"{', '.join(map(repr, close))} ({where}; globs and re: match the whole name)")


def expand(selected: Iterable[str], names: Iterable[str]) -> list[str]:
    """Names among ``names`` equal to or under a selected name (a selected block covers its submodules)."""
    sel = set(selected)
    return [n for n in names if any(".".join(n.split(".")[:i]) in sel for i in range(1, n.count(".") + 2))]


def renamed_keys(data: Any, pass_name: str, old: Mapping[str, str]) -> Any:
    """Fold a config's deprecated "which layers" keys into ``skip``, with one warning line each.

    ``old`` maps each old key to the prefix its entries take in ``skip`` ("" names, "type:" op types, "re:"
    regular expressions). Accepted for one release; the line names the new spelling with the user's values."""
    if not isinstance(data, dict) or not any(k in data for k in old):
        return data
    data = dict(data)
    sel = LayerSelector.parse(data.pop("skip", None))
    for key, prefix in old.items():
        if key not in data:
            continue
        value = data.pop(key)
        if callable(value) and not isinstance(value, str):
            warn_once(f"{pass_name}: '{key}' is deprecated and goes in the next release; pass the predicate as skip")
            sel = sel | LayerSelector.parse(value)
            continue
        vals = [value] if isinstance(value, str) else list(value or ())
        new = [f"{prefix}{v}" for v in vals]
        spelled = "[" + ", ".join(f'"{v}"' for v in new) + "]"
        warn_once(f"{pass_name}: '{key}' is deprecated and goes in the next release; write skip = {spelled} "
                  "(docs/passes.md, Choosing layers)")
        sel = sel | LayerSelector(tuple(new))
    data["skip"] = sel
    return data


def skip_field(leaves: str) -> Any:
    """The ``skip`` field of a pass config; ``leaves`` says what the pass does with the layers it skips."""
    from pydantic import Field

    return Field(default_factory=LayerSelector,
                 description=f"layers {leaves}: names, globs, 're:<regex>', 'type:<Type>', 'first', 'last', or a "
                             "predicate (module_or_node, name) -> bool from Python (docs/passes.md, Choosing layers)")


def outermost(names: Sequence[str]) -> list[str]:
    """``names`` less those under another of them (a block selected with its submodules is named once)."""
    chosen = set(names)
    # A name is under another when one of its dotted prefixes is chosen too (linear in names x depth).
    return [n for n in names if not any(".".join(n.split(".")[:i]) in chosen for i in range(1, n.count(".") + 1))]


class LayerSelecting(BaseModel):
    """Base (a mixin before the config's own base) of a pass config that had per-pass "which layers" keys before
    ``skip``: it sets ``renamed_layer_keys`` (old key -> the prefix its entries take in ``skip``: "" names,
    "type:" op types, "re:" regular expressions) and the old keys keep working for one release, folded into
    ``skip`` with one warning each. Lives here, not in ``PassConfig``, so the core config never imports the
    selector (that made a cycle through ``torch_io`` and the registry)."""

    renamed_layer_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _fold_renamed_layer_keys(cls, data: Any) -> Any:
        return renamed_keys(data, str(cls.model_fields["kind"].default), cls.renamed_layer_keys)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # The old keys as (deprecated) properties, so the recipe's fast schema check
        # (compress.stages.schema_check) lets them through to the validator above for their warning.
        schema = handler(core_schema)
        props = handler.resolve_ref_schema(schema).setdefault("properties", {})
        for key in cls.renamed_layer_keys:
            props[key] = {"type": "array", "items": {"type": "string"}, "deprecated": True,
                          "description": "deprecated: write skip (docs/passes.md, Choosing layers)"}
        return dict(schema)


def check_on_root(selector: LayerSelector, root: Any, pass_name: str) -> None:
    """In the plan, before any pass runs: a torch pass's ``skip`` checked against the model as it enters the
    pipeline (the torch passes before it keep module names), so a typo in a pass placed after a long one is
    refused in a second. ``first`` / ``last`` are left to the pass (they count among the layers it acts on)."""
    named = LayerSelector(tuple(e for e in selector.entries if e not in ("first", "last")), selector.predicate)
    if not named or getattr(root, "kind", None) != "pytorch":
        return
    from ..inputs.torch_io import load_torch

    named.select(torch_layers(load_torch(root)), pass_name)
