"""Peak memory of one compiled model, measured in a fresh process.

Peak RSS cannot be attributed to one model inside a process that holds several,
so the gate runs this module in a child process: it imports the target's
libraries, notes the resident set, loads the model, runs it, and prints the
peak resident set and the part of it the model added.

    python -m compress.measuring.memprobe TARGET_CONFIG_JSON COMPILED_DIR BATCH THREADS RUNS
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset this process's peak resident set (Linux: ``5`` to /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(cfg_json: str, compiled_dir: str, batch: int, threads: int, runs: int) -> dict[str, int]:
    from ..core.artifact import Artifact
    from ..core.protocols import GeneratingTarget
    from ..core.registry import get_target_config, make_target

    cfg_d = json.loads(cfg_json)
    target = make_target(get_target_config(cfg_d["kind"]).model_validate(cfg_d))
    art = Artifact.load(Path(compiled_dir))
    before = _rss_bytes()
    if target.caps.generates and (art.known_facts().decoder is not None or art.metadata.get("task") == "causal-lm"):
        # A causal LM: peak while generating (prompt of 128 tokens, 32 new, KV cache kept), its deployed use.
        # The runtimes are imported before the baseline reading, so the figure is the model's, not the imports'.
        import importlib

        # compress.measuring.generation brings PyTorch; the target's availability check imports its own runtime.
        for lib in ("transformers", "compress.measuring.generation"):
            try:
                importlib.import_module(lib)
            except ImportError:
                pass
        target.unavailable_reason()
        hwm = _reset_peak()  # imports peak transiently above what stays resident: start the peak afresh
        before = _rss_bytes()
        lm = cast(GeneratingTarget, target).lm_runner(art, threads)  # caps.generates: it has the loop
        prompt = np.ones((batch, 128), np.int64)
        for _ in range(runs):
            lm.generate(prompt, 32)
        peak = _hwm_bytes() if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_rss_bytes": peak, "rss_before_load_bytes": before, "model_peak_bytes": max(0, peak - before)}
    runner = target.runner(art, threads=threads)
    g = np.random.default_rng(0)
    feeds = {n: g.standard_normal((batch, *s.shape[1:])).astype(s.dtype)
             for n, s in zip(runner.input_names, art.inputs, strict=False)}
    for _ in range(runs):
        runner.infer(feeds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss_bytes": peak, "rss_before_load_bytes": before, "model_peak_bytes": max(0, peak - before)}


def measure_peak_memory(target_cfg: Any, compiled: Any, batch: int, threads: int, runs: int = 5,
                        timeout_s: float = 300) -> dict[str, int]:
    """Run :func:`probe` in a child process and return what it measured."""
    cmd = [sys.executable, "-m", "compress.measuring.memprobe", json.dumps(target_cfg.canonical()), str(compiled.path),
           str(batch), str(threads), str(runs)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(probe(a[0], a[1], int(a[2]), int(a[3]), int(a[4]))))
