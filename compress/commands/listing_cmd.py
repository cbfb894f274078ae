"""``compress passes``, ``targets`` and ``profiles``: what is installed and what it accepts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import CompressError


def cmd_passes(a: argparse.Namespace) -> int:
    from ..core.registry import manifest

    # From the plugin manifest when it is current: listing needs no torch import (see registry).
    listed = manifest()["passes"]
    if a.json:
        print(json.dumps({"passes": {k: {"consumes": i["consumes"], "produces": i["produces"], "doc": i["doc"],
                                         "compare_precision": i.get("compare_precision"),
                                         "settings": [dict(zip(("name", "type", "default", "help"), f, strict=True))
                                                      for f in i["fields"]]}
                                     for k, i in listed.items()}}, indent=2))
        return 0
    for kind, info in listed.items():
        precision = info.get("compare_precision")
        offered = f"  [compress compare --precision {precision}]" if precision else ""
        print(f"{kind}  ({info['consumes']} -> {info['produces']})  {info['doc']}{offered}")
        _print_fields(info["fields"])
    return 0


def _print_fields(fields: list[list[str]]) -> None:
    for name, ann, default, desc in fields:
        print(f"    {name}: {ann}, {default}{'  ' + desc if desc else ''}")


def _module_missing(name: str) -> bool:
    """Whether an import name is absent, found without importing it. A folder with no module (type stubs
    alone install a 'tensorrt' folder of .pyi files) is absent too."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return True
    return spec is None or spec.origin in (None, "namespace")


def quick_unavailable(info: dict[str, Any]) -> str | None:
    """Why a target cannot run here, as far as its declared modules tell (``TargetCaps.requires``), without
    importing its runtime; None when they are installed (``unavailable_reason()`` is the full check)."""
    missing = [m for m in info.get("requires", []) if _module_missing(m)]
    if missing:
        nor = f" (nor {', '.join(missing[1:])})" if missing[1:] else ""
        return f"{missing[0]} is not installed{nor}; {info.get('install') or 'install it'}"
    return None


def cmd_targets(a: argparse.Namespace) -> int:
    from ..core.fingerprint import ARCH_ENV, ISA_ENV, cpu_info
    from ..core.int8_scheme import choose_scheme
    from ..core.registry import manifest

    cpu = cpu_info()
    listed = manifest()["targets"]  # settings and required modules, without importing any runtime
    states: dict[str, dict[str, Any]] = {}
    for kind, info in listed.items():
        reason = quick_unavailable(info)
        if reason is None and a.check:  # the full check: imports the runtime, asks for its devices
            from ..core.registry import get_target_config, make_target

            reason = make_target(get_target_config(kind)()).unavailable_reason()
        states[kind] = {"available": reason is None, "reason": reason, "checked": "full" if a.check else "modules",
                        "settings": [dict(zip(("name", "type", "default", "help"), f, strict=True))
                                     for f in info["fields"]]}
    if a.json:
        print(json.dumps({"host": {"cpu": cpu["model"], "arch": cpu["arch"], "cores": cpu["affinity_cores"],
                                   "isa": cpu["isa"], "isa_forced": cpu["isa_forced"]},
                          "int8": choose_scheme("auto")[1], "targets": states}, indent=2))
        return 0
    forced = (f" (forced by {ISA_ENV}/{ARCH_ENV}; detected: {', '.join(cpu['isa_detected']) or 'none'})"
              if cpu["isa_forced"] else "")
    print(f"host: {cpu['model']} ({cpu['arch']}, {cpu['affinity_cores']} cores usable)")
    print(f"ISA:  {', '.join(cpu['isa']) or 'no optional extensions'}{forced}")
    print(f"INT8: {choose_scheme('auto')[1]}")
    print()
    for kind, st in states.items():
        state = ("available" if a.check else "installed") if st["available"] else f"unavailable: {st['reason']}"
        print(f"{kind:12s} {state}")
        _print_fields(listed[kind]["fields"])
    if not a.check:
        print("\n(installed: its modules are present; compress targets --check imports each runtime and asks "
              "for its devices)")
    return 0


def cmd_profiles(a: argparse.Namespace) -> int:
    from ..stages.profiles import all_profiles

    found, errors = all_profiles()
    checks: dict[str, dict[str, str]] = {}
    if a.check:
        checks = {name: _check_profile_targets(p) for name, p in found.items()}
    if a.json:
        print(json.dumps({"profiles": {n: {**p.model_dump(mode="json"), **({"checks": checks[n]} if checks else {})}
                                       for n, p in found.items()}, "errors": errors}, indent=2))
    else:
        for name, p in found.items():
            print(f"{name}  v{p.version}  ({p.source})  {p.description}")
            print(f"    arch {p.arch}; ISA {', '.join(p.isa) or 'none'}; cores {p.cores or 'as found'}, threads "
                  f"{p.threads or 'as found'}; INT8 {p.int8_scheme}; fast {', '.join(p.fast_precisions)}")
            # Each target's settings in its own terms (a target with none builds for the machine it runs on).
            print(f"    backends {', '.join(p.backends)}"
                  + "".join(f"; {kind} {json.dumps(settings, sort_keys=True)}" for kind, settings in p.targets.items())
                  + "".join(f"; {kind}: {why}" for kind, why in checks.get(name, {}).items()))
            for note in p.notes:
                print(f"    note: {note}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 2
    return 1 if any(why != "ok" and not why.startswith("not checked") for c in checks.values()
                    for why in c.values()) else 0


def _check_profile_targets(p: Any) -> dict[str, str]:
    """Per target that takes settings from the profile (``TargetConfig.for_profile``): 'ok', 'not checked: why'
    (the target cannot run here), or its refusal of the profile's settings as one line."""
    from pydantic import ValidationError

    from ..core.registry import make_target, targets

    out: dict[str, str] = {}
    for kind, (cfg_cls, _) in targets().items():
        base = cfg_cls()
        try:
            cfg = base.for_profile(p)
        except ValidationError as e:
            out[kind] = f"refused: {e.errors()[0]['msg']}"
            continue
        if cfg == base:
            continue  # nothing of the profile's for this target
        try:
            t = make_target(cfg)
            reason = t.unavailable_reason()
            if reason is not None:
                out[kind] = f"not checked: {reason}"
                continue
            t.check_config()  # the target's library judges the settings (TVM: the target JSON)
        except CompressError as e:
            out[kind] = str(e)
        else:
            out[kind] = "ok"
    return out
