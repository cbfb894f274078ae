"""Recipes: one TOML file read top to bottom, validated into typed configs.

A one-line text form round-trips with the TOML form::

    prune.channels{ratio=0.5},distill{epochs=3},quantize.int8 -> onnxruntime,tvm{tuning_trials=512}
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.config import PassConfig, TargetConfig, _fmt_value, format_pipeline
from ..core.registry import fast_entry, get_pass, get_target_config
from ..errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Strict):
    """Where the model comes from. ``source``: ``zoo:NAME``, ``package.module:factory``,
    a ``.pt2`` exported program or an ``.onnx`` file."""

    source: str
    input_shape: list[int] | None = None
    weights: str | None = None
    num_classes: int | None = None
    train_epochs: int = Field(0, ge=0, le=1000)
    # torch.export.load unpickles .pt2 weights with weights_only=False, so a crafted file runs code.
    allow_unsafe_pt2: bool = Field(False, description="load a .pt2 exported program (pickle: only files you trust)")
    # Hugging Face model directories (hf:PATH): the head to use, e.g. "embedding" (see compress.inputs.hf.TASKS).
    task: str | None = None


class DataSpec(_Strict):
    """Where the data comes from: ``builtin:digits``, an image folder, an ``.npz``, text (``text:FILE``, one
    sentence per line, or ``jsonl:FILE``) tokenized with a Hugging Face model's tokenizer, or ``random``."""

    source: str = "random"
    # jsonl:FILE: the field holding each sample's text, and the one holding its label (optional).
    text_field: str = Field("text", min_length=1)
    label_field: str | None = Field(None, min_length=1)
    # text:/jsonl: data is read line by line; a longer line is refused (a file without newlines, say) instead
    # of being read whole and tokenized (the tokenizer keeps only the model's sequence length anyway).
    max_line_bytes: int = Field(1 << 20, ge=16, le=1 << 30)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    calib_fraction: float = Field(0.1, gt=0, lt=1)
    max_val_samples: int | None = Field(None, ge=1)
    seed: int = 0


class MeasureSpec(_Strict):
    """How latency is measured."""

    batch_sizes: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(default_factory=lambda: [1], min_length=1)
    # Models with a dynamic sequence axis (token inputs): also time these sequence lengths, beside each
    # batch size. Latency keys: "B" at the model's own input shape, "B/sS" at sequence length S.
    seq_lens: list[Annotated[int, Field(ge=1, le=1 << 16)]] | None = Field(None, min_length=1)
    warmup: int = Field(5, ge=0)
    min_runs: int = Field(20, ge=1)
    min_time_s: float = Field(1.0, ge=0)
    max_time_s: float = Field(30.0, gt=0)
    threads: int = Field(0, ge=0, description="0 = all cores")
    accuracy: bool = True
    # Fidelity to the original model: what the output is (auto: from its name and shape) and an
    # optional task metric ``package.module:function`` called as fn(ref, got, labels).
    output_kind: Literal["auto", "logits", "embedding", "regression"] = "auto"
    metric: str | None = None
    # Causal language models (model.task = "causal-lm"): generation is timed with a prompt of lm_prompt
    # tokens and lm_new_tokens greedy tokens, lm_rounds interleaved rounds; perplexity over the text's
    # last lm_eval_tokens tokens (held out) in windows of lm_window; calibration from the text's start.
    lm_prompt: int = Field(128, ge=1, le=1 << 16)
    lm_new_tokens: int = Field(32, ge=2, le=1 << 16)
    lm_rounds: int = Field(5, ge=2, le=1000)
    lm_window: int = Field(512, ge=2, le=1 << 16)
    lm_eval_tokens: int = Field(4096, ge=2)
    lm_calib_tokens: int = Field(4096, ge=2)
    # Peak resident memory while generating, per cell, each in a fresh process (compress.measuring.memprobe).
    lm_peak_memory: bool = True
    # A second batch size at which decode tokens/s is also timed (same-length prompts, the same interleaved,
    # paired rounds), reported as its own figures; 1 = batch 1 only.
    lm_batch: int = Field(1, ge=1, le=256)
    # Greedy-token agreement with the reference over this many prompts cut from the held-out text.
    lm_greedy_prompts: int = Field(10, ge=1, le=1000)
    # The accuracy guard (compress.quality.accuracy_guard): a variant more than this many points of top-1 (or of
    # agreement / cosine x 100 without labels) below the original is marked ACCURACY, not ok.
    max_accuracy_drop: float = Field(1.0, ge=0)


class Recipe(_Strict):
    name: str = "pipeline"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    passes: list[PassConfig] = Field(default_factory=list)
    targets: list[TargetConfig] = Field(default_factory=list)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    seed: int = 0
    # A hardware profile's name (compress.stages.profiles) or a profile .toml file: the device's defaults.
    profile: str | None = None

    def pipeline_text(self) -> str:
        return format_pipeline(self.passes, self.targets)


_TOP_KEYS = ("name", "model", "data", "passes", "targets", "measure", "seed", "profile")


def _fmt_validation(where: str, e: ValidationError, cls: type[BaseModel], hidden: tuple[str, ...] = ("kind",)) -> str:
    """pydantic's errors as one line for a TOML table: unknown and missing keys (naming the allowed ones, but
    not ``hidden`` fields the user does not write), bad values with what was given, and checks of the whole
    table (a model validator) as their message alone."""
    return _fmt_errors(where, e.errors(), [k for k in cls.model_fields if k not in hidden])


def _fmt_errors(where: str, errors: Any, allowed: list[str]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'; allowed keys: {', '.join(allowed) or 'none'}")
        elif err["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        elif not loc:
            parts.append(msg)
        else:
            parts.append(f"key '{loc}': {msg} (got {err.get('input')!r})")
    return f"{where}: " + "; ".join(parts)


def _target_step(where: str, table: Any) -> TargetConfig:
    cfg = _validate_step(where, table, target=True)
    assert isinstance(cfg, TargetConfig)  # get_target_config only returns TargetConfig subclasses
    return cfg


def _validate_step(where: str, table: Any, target: bool) -> PassConfig:
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: expected a table with a 'kind' key, got {table!r}")
    kind = table.get("kind")
    if not isinstance(kind, str):
        raise RecipeError(f"{where}: missing 'kind'")
    entry = fast_entry("targets" if target else "passes", kind)
    if entry is not None and entry.get("schema"):
        from .schema_check import table_errors

        errors = table_errors(entry["schema"], table)
        if errors:  # answered from the manifest: no plugin (and no torch) imported for a typo
            allowed = [f[0] for f in entry.get("fields", []) if f[0] != "kind"]  # in the class's own order
            raise RecipeError(_fmt_errors(f"{where} ({kind})", errors, allowed))
    try:
        cls: type[PassConfig] = get_target_config(kind) if target else get_pass(kind).config_cls
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    try:
        return cls.model_validate(table)
    except ValidationError as e:
        raise RecipeError(_fmt_validation(f"{where} ({kind})", e, cls)) from None


def _sub(where: str, cls: type[_Strict], value: Any) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a table, got {value!r}")
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise RecipeError(_fmt_validation(where, e, cls)) from None


def revalidate(spec: _Strict, update: dict[str, Any], where: str, flags: dict[str, str] | None = None) -> Any:
    """``spec`` with ``update`` applied, validated as a recipe's table is (``model_copy`` would skip that).

    ``flags`` names the command-line option each key came from, so the message names what the user typed.
    """
    cls = type(spec)
    try:
        return cls.model_validate({**spec.model_dump(), **update})
    except ValidationError as e:
        flags = flags or {}
        parts = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            rest = ".".join(str(x) for x in err["loc"][1:])
            name = flags.get(key, f"{where}: key '{key}'")
            parts.append(f"{name}{'[' + rest + ']' if rest else ''}: {err['msg']} (got {err.get('input')!r})")
        raise RecipeError("; ".join(parts)) from None


def recipe_from_dict(d: dict[str, Any], where: str = "recipe") -> Recipe:
    unknown = sorted(set(d) - set(_TOP_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key '{unknown[0]}'; allowed top-level keys: {', '.join(_TOP_KEYS)}")
    if "model" not in d:
        raise RecipeError(f"{where}: missing required key 'model' (e.g. model = {{ source = \"zoo:digits-cnn\" }})")
    for key in ("passes", "targets"):
        if key in d and not isinstance(d[key], list):
            raise RecipeError(f"{where}: '{key}' must be an array of tables ([[{key}]])")
    try:
        name = str(d.get("name", "pipeline"))
        seed = int(d.get("seed", 0))
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from None
    profile = d.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise RecipeError(f"{where}: 'profile' must be a profile name (e.g. \"rpi5\") or a profile .toml file, "
                          f"got {profile!r}")
    # The plain tables first: checking them needs no plugin (nor torch) imported.
    model = _sub(f"{where}: model", ModelSpec, d.get("model"))
    data = _sub(f"{where}: data", DataSpec, d.get("data"))
    measure = _sub(f"{where}: measure", MeasureSpec, d.get("measure"))
    passes = [_validate_step(f"{where}: passes[{i + 1}]", t, target=False) for i, t in enumerate(d.get("passes", []))]
    targets = [_validate_step(f"{where}: targets[{i + 1}]", t, target=True) for i, t in enumerate(d.get("targets", []))]
    return Recipe(name=name, model=model, data=data, measure=measure, passes=passes, targets=targets, seed=seed,
                  profile=profile)


def read_toml(path: str | Path, what: str) -> tuple[Path, dict[str, Any]]:
    """A TOML file the user named (a recipe, a budgets file, a search space) as a dict, or one clear line."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: {what} file not found")
    if not p.is_file():
        raise RecipeError(f"{p}: is not a file; give a {what} .toml file")
    try:
        return p, tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not a text file (byte {e.start} is not UTF-8); a {what} is TOML text") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the {what} ({e.strerror or e})") from None


def load_recipe(path: str | Path) -> Recipe:
    p, d = read_toml(path, "recipe")
    rec = recipe_from_dict(d, where=str(p))
    # Relative file paths in a recipe are relative to the recipe's folder.
    return _resolve_paths(rec, p.parent)


def _resolve_paths(rec: Recipe, base: Path) -> Recipe:
    def fix(s: str | None) -> str | None:
        return s if s is None or Path(s).is_absolute() else str(base / s)

    model = rec.model.model_copy(update={"weights": fix(rec.model.weights),
                                         "source": _fix_source(rec.model.source, base)})
    data = rec.data.model_copy(update={"source": _fix_source(rec.data.source, base)})
    passes = []
    for p in rec.passes:
        # Pass settings that name files or model sources (a distillation teacher) are relative to the
        # recipe too: each pass declares which they are (PassCaps.path_fields / source_fields).
        caps = get_pass(p.kind).caps
        update: dict[str, Any] = {}
        for name in caps.path_fields:
            if isinstance(getattr(p, name, None), str):
                update[name] = fix(getattr(p, name))
        for name in caps.source_fields:
            if isinstance(getattr(p, name, None), str):
                update[name] = _fix_source(getattr(p, name), base)
        passes.append(p.model_copy(update=update) if update else p)
    profile = rec.profile
    if profile is not None and profile.endswith(".toml"):  # a profile file beside the recipe
        profile = fix(profile)
    return rec.model_copy(update={"model": model, "data": data, "passes": passes, "profile": profile})


def _fix_source(src: str, base: Path) -> str:
    """Make file-like sources (``x.onnx``, ``folder:imgs``, ``npz:a.npz``) relative to the recipe."""
    for prefix in ("folder:", "npz:", "pt2:", "onnx:", "text:", "jsonl:"):
        if src.startswith(prefix):
            rest = src[len(prefix):]
            return prefix + (rest if Path(rest).is_absolute() else str(base / rest))
    if src.endswith((".onnx", ".pt2", ".npz")) and not Path(src).is_absolute():
        return str(base / src)
    return src


# ---------------------------------------------------------------- text form


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes."""
    out, depth, cur, quote = [], 0, [], False
    i = 0
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur.append(c)
        elif c in "[{":
            depth += 1
            cur.append(c)
        elif c in "]}":
            depth -= 1
            cur.append(c)
        elif c == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if depth != 0 or quote:
        raise RecipeError(f"pipeline text: unbalanced brackets or quotes in {s!r}")
    out.append("".join(cur))
    return [x.strip() for x in out if x.strip()]


def _parse_step_text(text: str) -> dict[str, Any]:
    text = text.strip()
    if "{" not in text:
        return {"kind": text}
    if not text.endswith("}"):
        raise RecipeError(f"pipeline text: step {text!r} must look like kind{{key=value,...}}")
    kind, body = text.split("{", 1)
    table: dict[str, Any] = {"kind": kind.strip()}
    for item in _split_top(body[:-1], ","):
        if "=" not in item:
            raise RecipeError(f"pipeline text: in {text!r}, {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            table[k.strip()] = tomllib.loads(f"v = {v.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise RecipeError(f"pipeline text: in {text!r}, value {v.strip()!r} is not a TOML literal "
                              "(strings need double quotes)") from None
    return table


def parse_pipeline(text: str) -> tuple[list[PassConfig], list[TargetConfig]]:
    """Parse ``passes -> targets`` into validated configs."""
    parts = text.split("->")
    if len(parts) > 2:
        raise RecipeError(f"pipeline text: more than one '->' in {text!r}")
    pass_tables = [_parse_step_text(t) for t in _split_top(parts[0], ",")]
    target_tables = [_parse_step_text(t) for t in _split_top(parts[1], ",")] if len(parts) == 2 else []
    passes = [_validate_step(f"pipeline text: pass {i + 1}", t, target=False) for i, t in enumerate(pass_tables)]
    targets = [_target_step(f"pipeline text: target {i + 1}", t) for i, t in enumerate(target_tables)]
    return passes, targets


def recipe_to_toml(rec: Recipe) -> str:
    """Write a recipe back as TOML (one level of nesting, as users write it)."""
    lines = [f"name = {_fmt_value(rec.name)}", f"seed = {rec.seed}"]
    if rec.profile is not None:
        lines.append(f"profile = {_fmt_value(rec.profile)}")

    def inline(m: BaseModel) -> str:
        d = {k: v for k, v in m.model_dump(mode="json").items() if v is not None}
        return "{ " + ", ".join(f"{k} = {_fmt_value(v)}" for k, v in d.items()) + " }"

    lines += [f"model = {inline(rec.model)}", f"data = {inline(rec.data)}", f"measure = {inline(rec.measure)}"]
    for section, items in (("passes", rec.passes), ("targets", rec.targets)):
        for cfg in items:
            lines += ["", f"[[{section}]]", f"kind = {_fmt_value(cfg.kind)}"]
            lines += [f"{k} = {_fmt_value(v)}" for k, v in cfg.options().items() if v is not None]
    return "\n".join(lines) + "\n"
