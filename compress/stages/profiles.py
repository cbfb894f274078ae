"""Hardware profiles: the device a model is prepared for, named in one word.

A profile says what the product would otherwise read from the build machine: the CPU's architecture
and ISA flags (which pick the INT8 scheme, through the same door as ``COMPRESS_ISA``: see
``compress.core.fingerprint.forced_by_profile``), its cores and threads, the TVM target to compile for
(TVM's own target tag where TVM 0.27 has one), the INT8 scheme the device prefers, the precisions it
runs fast and the backends installed there.

``profile = "rpi5"`` in a recipe, or ``compress run --profile rpi5``, makes that profile the defaults
of the run (:func:`profile_scope`): a ``tvm`` target without ``target`` compiles for the profile's
target, ``measure.threads = 0`` becomes the profile's threads (when the profile's CPU is this
machine's kind), every ISA-dependent choice sees the profile's ISA, and a target the device does not
have is refused before anything runs. Settings the recipe gives explicitly always win.

Profiles come from three places: the built-in ones below (versioned: a profile whose content
changes gets a new ``version``, which is in the report), ``host`` (this machine, detected), and
TOML files the user writes: a recipe may name a file (``profile = "boards/myboard.toml"``), and every
``*.toml`` in the folders of ``$COMPRESS_PROFILE_PATH`` (``os.pathsep``-separated) is a profile by
its ``name``. ``compress profiles`` lists them all and says which files are invalid and why.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.fingerprint import KNOWN_ISA_FLAGS, ProfileOverride, detected_cpu, forced_by_profile
from ..core.int8_scheme import VNNI_FLAGS, scheme_for_isa
from ..errors import RecipeError

if TYPE_CHECKING:
    from .recipe import Recipe

PATH_ENV = "COMPRESS_PROFILE_PATH"
HOST = "host"
SCHEMES = ("u8s8", "u8s8_reduce_range", "u8u8", "s8s8")
Precision = Literal["fp32", "fp16", "bf16", "int8"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Profile(BaseModel):
    """One device. What a target needs to know beyond the CPU (the tvm target: which TVM target to compile for)
    is in ``targets``, by target kind, in that target's own terms: the target judges it
    (``TargetConfig.check_profile_settings``) and reads it (``TargetConfig.for_profile``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="what recipes and --profile call it")
    version: int = Field(1, ge=1, description="bump when the content changes: reports record it")
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    isa: list[str] = Field(default_factory=list, description="ISA flags, as compress.core.fingerprint names them")
    cores: int | None = Field(None, ge=1, description="CPU cores; None = those of the machine it runs on")
    threads: int | None = Field(None, ge=1, description="threads for inference; None = cores")
    targets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="settings for a target on this device, by target kind ([targets.KIND] "
        "in a file); each target says which it takes")
    int8_scheme: Literal["u8s8", "u8s8_reduce_range", "u8u8", "s8s8"] = Field(
        description="INT8 scheme quantize.* passes use with scheme = 'auto'")
    fast_precisions: list[Precision] = Field(default_factory=lambda: list[Precision](["fp32"]))
    backends: list[str] = Field(description="targets that run on the device (torch, onnxruntime, tvm, ...)")
    notes: list[str] = Field(default_factory=list)
    source: str = Field("built-in", description="where the profile came from (set by the loader)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use lower-case letters, digits, '.', '_' and '-' (e.g. 'my-board')")
        return v

    @field_validator("isa")
    @classmethod
    def _isa_known(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in KNOWN_ISA_FLAGS]
        if bad:
            raise ValueError(f"unknown ISA flag(s) {', '.join(bad)}; known: {', '.join(sorted(KNOWN_ISA_FLAGS))}")
        return sorted(set(v))

    @field_validator("backends")
    @classmethod
    def _backends_known(cls, v: list[str]) -> list[str]:
        from ..core.registry import manifest  # the registered targets, read without importing them when listed before

        known = manifest()["targets"]
        bad = [b for b in v if b not in known]
        if bad:
            raise ValueError(f"unknown target(s) {', '.join(map(repr, bad))}; registered targets: {', '.join(known)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _legacy_target_keys(cls, data: Any) -> Any:
        """Profiles written before target settings moved under ``targets`` gave them as top-level ``KIND_KEY``
        keys (``tvm_tag``, ``tvm_target``, ``tvm_gpu_tag``): such a key of a registered target is that target's
        ``KEY``. A key of the same name under ``targets`` wins."""
        if not isinstance(data, dict):
            return data
        from ..core.registry import manifest

        kinds = sorted(manifest()["targets"], key=len, reverse=True)  # longest first: no kind shadows another
        moved: dict[str, dict[str, Any]] = {}
        out = dict(data)
        for key in [k for k in out if isinstance(k, str) and k not in cls.model_fields]:
            kind = next((k for k in kinds if key.startswith(k + "_")), None)
            if kind is not None:
                moved.setdefault(kind, {})[key[len(kind) + 1:]] = out.pop(key)
        if moved:
            given: dict[str, Any] = out["targets"] if isinstance(out.get("targets"), dict) else {}
            out["targets"] = {**given, **{k: {**v, **(given.get(k) or {})} for k, v in moved.items()}}
        return out

    @field_validator("targets")
    @classmethod
    def _targets_known(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from ..core.registry import manifest

        known = manifest()["targets"]
        bad = [k for k in v if k not in known]
        if bad:
            raise ValueError(f"settings for unknown target(s) {', '.join(map(repr, bad))}; registered targets: "
                             f"{', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.targets:
            from ..core.registry import get_target_config

            for kind, settings in self.targets.items():
                try:
                    get_target_config(kind).check_profile_settings(settings, self.arch)
                except ValueError as e:
                    raise ValueError(f"targets.{kind}: {e}") from None
        if self.arch == "x86_64" and self.int8_scheme == "u8s8" and not any(f in self.isa for f in VNNI_FLAGS):
            raise ValueError("int8_scheme 'u8s8' on an x86 CPU without VNNI saturates (VPMADDUBSW sums pairs in 16 "
                             "bits); use 'u8s8_reduce_range', or list the CPU's VNNI flag in isa")
        if self.threads is not None and self.cores is not None and self.threads > self.cores:
            raise ValueError(f"threads ({self.threads}) exceeds cores ({self.cores})")
        return self

    def runs_here(self) -> bool:
        """Whether code for this profile's CPU runs on this machine (same architecture, every ISA flag present)."""
        cpu = detected_cpu()
        return _norm_arch(str(cpu["arch"])) == self.arch and set(self.isa) <= set(cpu["isa"])

    def override(self) -> ProfileOverride | None:
        """What :func:`compress.core.fingerprint.cpu_info` reports while the profile is active (None for the host)."""
        if self.name == HOST:
            return None  # the host is what cpu_info detects; forcing it would only hide COMPRESS_ISA
        return ProfileOverride(self.name, tuple(self.isa), self.arch, self.int8_scheme, self.version, self.source)

    def summary(self) -> dict[str, Any]:
        """What a report records about the profile."""
        return {"name": self.name, "version": self.version, "source": self.source, "arch": self.arch,
                "isa": self.isa, "cores": self.cores, "threads": self.threads, "int8_scheme": self.int8_scheme,
                "targets": self.targets}


_TRIPLE_PREFIX = {"x86_64": "x86_64", "aarch64": "aarch64"}


def _norm_arch(arch: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch.lower())


# The built-in profiles are data, in the format of a user's file (one [[profile]] table each).
BUILTIN_FILE = Path(__file__).with_name("profiles.toml")


def _builtin_tables() -> list[dict[str, Any]]:
    import tomllib

    return list(tomllib.loads(BUILTIN_FILE.read_text(encoding="utf-8"))["profile"])


def host_profile() -> Profile:
    """This machine as a profile: the detected CPU (not COMPRESS_ISA), its usable cores, its TVM target."""


    cpu = detected_cpu()
    arch = _norm_arch(str(cpu["arch"]))
    if arch not in _TRIPLE_PREFIX:
        raise RecipeError(f"profile 'host': this {arch} machine has no profile support (x86_64 and aarch64 do)")
    cores = int(cpu["affinity_cores"] or cpu["cores"])
    scheme = scheme_for_isa(list(cpu["isa"]), arch)[0]
    # Every known target: whether each one is installed and can run here is `compress targets`' business
    # (a target that cannot says why in its cell).
    from ..core.registry import manifest

    backends = sorted(manifest()["targets"])
    return Profile(name=HOST, description=f"this machine: {cpu['model']}", arch=arch, isa=list(cpu["isa"]),  # type: ignore[arg-type]
                   cores=cores, threads=cores, int8_scheme=scheme,  # type: ignore[arg-type]
                   fast_precisions=["fp32", "int8"], backends=backends,
                   notes=["detected; the tvm target uses LLVM's name for this CPU"], source="detected")


def builtin_profiles() -> dict[str, Profile]:
    return {p["name"]: Profile.model_validate(p) for p in _builtin_tables()}


def load_profile_file(path: str | Path) -> Profile:
    """A user's profile TOML file, validated; one clear line on any problem."""
    from .recipe import _fmt_validation, read_toml

    p, d = read_toml(path, "profile")
    if "source" in d:
        raise RecipeError(f"{p}: profile: unknown key 'source' (set by the loader, not the file)")
    try:
        prof = Profile.model_validate({**d, "source": str(p)})
    except ValidationError as e:
        raise RecipeError(_fmt_validation(f"{p}: profile", e, Profile, hidden=("source",))) from None
    if prof.name in builtin_profiles() or prof.name == HOST:
        raise RecipeError(f"{p}: profile name '{prof.name}' is a built-in profile's; give yours another name")
    return prof


def user_profile_files() -> list[Path]:
    """Every ``*.toml`` in the folders of ``$COMPRESS_PROFILE_PATH``, in path order."""
    out: list[Path] = []
    for folder in filter(None, os.environ.get(PATH_ENV, "").split(os.pathsep)):
        d = Path(folder)
        if d.is_dir():
            out.extend(sorted(d.glob("*.toml")))
    return out


def all_profiles() -> tuple[dict[str, Profile], list[str]]:
    """Every profile by name (built-in, host, user files) and one line per user file that is invalid."""
    found = builtin_profiles()
    errors: list[str] = []
    with contextlib.suppress(RecipeError):
        found[HOST] = host_profile()
    for f in user_profile_files():
        try:
            prof = load_profile_file(f)
        except RecipeError as e:
            errors.append(str(e))
            continue
        if prof.name in found:
            errors.append(f"{f}: profile '{prof.name}' is also defined in {found[prof.name].source}; the first "
                          "one on $COMPRESS_PROFILE_PATH is used")
            continue
        found[prof.name] = prof
    return found, errors


def get_profile(name: str, base: Path | None = None) -> Profile:
    """A profile by name, or from a TOML file when ``name`` ends in ``.toml`` (relative to ``base``)."""
    if name.endswith(".toml"):
        p = Path(name)
        return load_profile_file(p if p.is_absolute() or base is None else base / p)
    if name == HOST:
        return host_profile()
    builtin = builtin_profiles()
    if name in builtin:
        return builtin[name]
    unreadable: list[str] = []
    for f in user_profile_files():
        try:
            prof = load_profile_file(f)
        except RecipeError as e:  # one broken file must not hide the profiles after it
            unreadable.append(str(e))
            continue
        if prof.name == name:
            from ..core.notices import warn_once

            for why in unreadable:
                warn_once(f"{why} (skipped: profile file on ${PATH_ENV})")
            return prof
    known = [*builtin, HOST]
    skipped = (f"; {len(unreadable)} file(s) on ${PATH_ENV} could not be read, the first: {unreadable[0]}"
               if unreadable else "")
    raise RecipeError(f"unknown profile '{name}'; known: {', '.join(known)} (compress profiles lists them, with "
                      f"yours from ${PATH_ENV}), or give a profile .toml file{skipped}")


def apply_profile(rec: Recipe, prof: Profile) -> Recipe:
    """``rec`` with the profile's defaults filled in where the recipe left them open.

    Raises RecipeError when the recipe uses a target the device does not have.
    """
    targets = []
    for cfg in rec.targets:
        if cfg.kind not in prof.backends:
            raise RecipeError(f"target '{cfg.kind}' does not run on profile '{prof.name}' (its backends: "
                              f"{', '.join(prof.backends)}); drop it from the recipe or pick another profile")
        try:  # a target that compiles for a device takes the profile's (TargetConfig.for_profile)
            cfg = cfg.for_profile(prof)
        except ValidationError as e:
            raise RecipeError(f"profile '{prof.name}' ({prof.source}): target '{cfg.kind}' refuses its settings: "
                              f"{e.errors()[0]['msg']}") from None
        targets.append(cfg)
    update: dict[str, Any] = {"targets": targets}
    if rec.measure.threads == 0 and prof.threads is not None and prof.runs_here():
        usable = int(detected_cpu()["affinity_cores"] or 1)
        update["measure"] = rec.measure.model_copy(update={"threads": min(prof.threads, usable)})
    return rec.model_copy(update=update)


@contextlib.contextmanager
def profile_scope(rec: Recipe, base: Path | None = None) -> Iterator[tuple[Recipe, Profile | None]]:
    """The recipe with its profile applied, and the profile's ISA forced while the block runs."""
    if rec.profile is None:
        yield rec, None
        return
    prof = get_profile(rec.profile, base)
    applied = apply_profile(rec, prof)
    with forced_by_profile(prof.override()):
        yield applied, prof

