"""Decoder language models end to end: a causal LM in (hf:DIR), lowered with its KV cache, weight-compressed,
generated with on PyTorch and ONNX Runtime, judged in perplexity, agreement and paired generation speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

from compress.core.capabilities import DecoderFacts, Facts, TargetCaps, refusal
from compress.errors import CompressError, InputError, PassError, RecipeError
from compress.inputs.causal_lm import WindowScores
from compress.reporting.report_schema import load_report
from compress.stages.pipeline import run
from compress.stages.recipe import recipe_from_dict
from tests.llm_models import tiny_llama

MEASURE = {"lm_prompt": 16, "lm_new_tokens": 6, "lm_rounds": 2, "lm_window": 48, "lm_eval_tokens": 96,
           "lm_calib_tokens": 96, "threads": 1}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("lm") / "tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _recipe(lm_dir: Path, passes: list[dict] | None = None, **measure: object) -> object:
    return recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                             "data": {"source": "builtin:pydoc-topics"}, "measure": {**MEASURE, **measure},
                             "passes": passes or [], "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]})


@pytest.fixture(scope="module")
def int4_report(lm_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("run") / "out"
    rep = run(_recipe(lm_dir, [{"kind": "quantize.weight_only", "bits": 4, "group_size": 32}]), out_dir=out,
              cache_dir=cache_dir, progress=False)
    return rep, out


def _cell(rep: object, variant: str, target: str) -> object:
    return next(r for r in rep.results if r.variant == variant and r.target == target)  # type: ignore[attr-defined]


def test_fp32_decoder_matches_pytorch_token_for_token(int4_report: tuple[object, Path]) -> None:
    rep, _ = int4_report
    torch_cell, ort_cell = _cell(rep, "baseline", "torch"), _cell(rep, "baseline", "onnxruntime")
    assert torch_cell.status == ort_cell.status == "ok"
    g_ref, g = torch_cell.generation, ort_cell.generation
    # Same model, two runtimes: the same perplexity, every next token and every greedy token agree.
    assert g.perplexity == pytest.approx(g_ref.perplexity, rel=1e-4)
    assert g.top1_agreement == 1.0 and g.greedy_agreement == 1.0
    assert g.kl < 1e-6
    # The export's own per-step parity is recorded in the variant's passes.
    parity = rep.variants["lm"].passes["quantize.weight_only"]["parity"]
    assert parity["checked"] and 0 < parity["top1_agreement"] <= 1


def test_generation_speed_is_a_paired_ratio_against_the_reference(int4_report: tuple[object, Path]) -> None:
    rep, out = int4_report
    for variant in ("baseline", "lm"):
        g = _cell(rep, variant, "onnxruntime").generation
        assert g.rounds == MEASURE["lm_rounds"] and g.prompt_tokens == MEASURE["lm_prompt"]
        assert g.ttft_ratio.low <= g.ttft_ratio.ratio <= g.ttft_ratio.high
        assert g.decode_speedup.low <= g.decode_speedup.ratio <= g.decode_speedup.high
        assert g.decode_tokens_per_s > 0 and g.ttft_ms > 0
    ref = _cell(rep, "baseline", "torch").generation
    assert ref.ttft_ratio is None and ref.decode_speedup is None  # the reference is not compared with itself
    # report.json validates against the published schema and keeps the figures.
    again = load_report(out / "report.json")
    ppl = _cell(rep, "lm", "onnxruntime").generation.perplexity
    assert _cell(again, "lm", "onnxruntime").generation.perplexity == ppl
    md = (out / "report.md").read_text()
    assert "## Generation" in md and "decode tok/s" in md


def test_int4_decoder_packs_matmuls_keeps_embedding_and_facts(int4_report: tuple[object, Path]) -> None:
    import onnx

    rep, _ = int4_report
    v = rep.variants["lm"]
    assert v.facts.precision == "int4" and v.facts.decoder is not None
    cell = _cell(rep, "lm", "onnxruntime")
    folder = Path(cell.compiled_path)
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 2 * 5 + 1  # 2 layers x (fused qkv, o, gate, up, down) and the LM head
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and "embed" in n.name]
    assert gathers, "the embedding stays a float Gather (int64 ids cannot feed MatMulNBits)"
    assert any(f.suffix == ".data" for f in folder.iterdir()), "weights in an external data file"
    assert cell.size_bytes < _cell(rep, "baseline", "onnxruntime").size_bytes
    g = cell.generation
    assert np.isfinite(g.perplexity) and g.perplexity_rise is not None and 0 < g.top1_agreement <= 1


def test_text_report_shows_the_generation_table(int4_report: tuple[object, Path]) -> None:
    from compress.reporting.report import render_text

    rep, _ = int4_report
    text = render_text(rep)
    assert text.splitlines()[1].split()[:4] == ["variant", "target", "perplexity", "rise"]
    assert "lm        onnxruntime" in text or "lm onnxruntime" in " ".join(text.split())


def test_window_scores_are_the_textbook_figures() -> None:
    v = 8
    ids = np.array([1, 2, 3, 4])
    s = WindowScores()
    s.add(np.zeros((4, v)), ids, np.zeros((4, v)))
    f = s.figures()
    assert f["perplexity"] == pytest.approx(v)  # uniform logits: perplexity = vocabulary size
    assert f["kl"] == pytest.approx(0.0) and f["top1_agreement"] == 1.0
    sharp = np.full((4, v), -20.0)
    sharp[np.arange(3), ids[1:]] = 20.0
    s2 = WindowScores()
    s2.add(sharp, ids)
    assert s2.figures()["perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_a_target_without_a_generate_loop_refuses_a_decoder() -> None:
    facts = Facts(decoder=DecoderFacts(layers=1, kv_heads=1, head_dim=8, vocab=16))
    assert refusal(TargetCaps(consumes="onnx", generates=True), facts, "onnxruntime") is None
    why = refusal(TargetCaps(consumes="onnx"), facts, "tvm")
    assert why is not None and "generate loop" in why


def test_group_size_wider_than_the_layer_is_one_line_before_any_export(lm_dir: Path, tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(RecipeError, match=r"group_size = 256 is wider than the model's hidden_size \(64\)") as e:
        run(_recipe(lm_dir, [{"kind": "quantize.weight_only", "bits": 4, "group_size": 256}]), out_dir=tmp_path / "o",
            cache_dir=tmp_path / "cache", progress=False, log=said.append)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not any("export" in line for line in said)  # refused in the plan: nothing was lowered
    assert not (tmp_path / "o" / "report.json").exists()


def test_text_shorter_than_the_windows_is_refused_before_any_export(lm_dir: Path, cache_dir: Path,
                                                                   tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("def f(): return 1\n" * 5)
    rec = recipe_from_dict({"model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                            "data": {"source": f"text:{short}"}, "measure": MEASURE})
    with pytest.raises(InputError, match=r"fewer than one calibration window"):
        run(rec, out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)


def test_image_data_cannot_feed_a_causal_lm(lm_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    rec = recipe_from_dict({"model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                            "data": {"source": "npz:x.npz"}, "measure": MEASURE})
    with pytest.raises(RecipeError, match="cannot feed a causal LM"):
        run(rec, out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)


def test_a_model_without_a_tokenizer_is_refused(lm_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(lm_dir, bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    rec = recipe_from_dict({"model": {"source": f"hf:{bare}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": MEASURE})
    with pytest.raises(InputError, match="no tokenizer"):
        run(rec, out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    rec = recipe_from_dict({"model": {"source": str(fake)}, "data": {"source": "builtin:pydoc-topics"}})
    with pytest.raises(CompressError, match="not a GGUF file"):
        run(rec, out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)


@pytest.mark.slow
def test_a_qwen2_decoder_exports_and_generates_like_pytorch(tmp_path: Path, cache_dir: Path) -> None:
    folder = tiny_llama(tmp_path / "qwen", kind="qwen2")
    rep = run(_recipe(folder), out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)
    g = _cell(rep, "baseline", "onnxruntime").generation
    assert g.greedy_agreement == 1.0 and g.top1_agreement == 1.0
    meta = json.loads((tmp_path / "o" / "report.json").read_text())
    assert meta["results"][0]["generation"]["perplexity"] > 1


def test_budgets_bound_perplexity_agreement_and_decode_speed(int4_report: tuple[object, Path]) -> None:
    from compress.apps.budget import BudgetsFile, BudgetSpec, evaluate_budget

    rep, _ = int4_report
    bf = BudgetsFile(models={"lm": "lm.toml"}, budget=[])

    def verdict(bound: str) -> object:
        return evaluate_budget(BudgetSpec(model="lm", target="onnxruntime", fidelity=bound), rep, bf, None, "fp")

    g = _cell(rep, "lm", "onnxruntime").generation
    assert verdict(f"perplexity_rise <= {100 * g.perplexity_rise + 1:.3f}%").status == "pass"
    assert verdict(f"perplexity <= {g.perplexity * 0.5:.3f}").status == "fail"
    assert verdict("top1_agreement >= 0%").status == "pass"
    fast = verdict("decode_speedup >= 1000x")  # no interval of a tiny model reaches 1000x PyTorch
    assert fast.status == "fail" and fast.low is not None and fast.low <= fast.value <= fast.high
    assert verdict(f"decode_speedup >= {g.decode_speedup.low * 0.5:.4f}x").status == "pass"


def test_a_language_model_figure_on_another_model_is_a_usage_error(tmp_path: Path) -> None:
    from compress.apps.budget import check_fidelity_budgets, load_budgets

    (tmp_path / "digits.toml").write_text('model = { source = "zoo:digits-cnn" }\n')
    (tmp_path / "b.toml").write_text('models = { d = "digits.toml" }\n[[budget]]\nmodel = "d"\ntarget = "onnxruntime"\n'
                                     'fidelity = "perplexity_rise <= 5%"\n')
    bf, recipes = load_budgets(tmp_path / "b.toml")
    with pytest.raises(RecipeError, match="perplexity_rise"):
        check_fidelity_budgets(bf, recipes, tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text('models = { d = "digits.toml" }\n[[budget]]\nmodel = "d"\ntarget = "onnxruntime"\n'
                                     'fidelity = "agreement >= 2x"\n')
    with pytest.raises(RecipeError, match="'x' applies to decode_speedup"):
        load_budgets(tmp_path / "c.toml")


@pytest.mark.parametrize("faster", [1, 2])
def test_the_thread_count_is_chosen_by_measurement(faster: int) -> None:
    from types import SimpleNamespace

    from compress.measuring.compare import CellRef
    from compress.measuring.generation import Generated
    from compress.measuring.measure_lm import choose_threads

    class Runner:
        def __init__(self, n: int) -> None:
            self.n = n

        def generate(self, prompt: np.ndarray, new: int) -> Generated:
            return Generated(np.zeros((1, new), np.int64), 0.01, 0.01 if self.n == faster else 0.03)

        def close(self) -> None:
            pass

    cell = SimpleNamespace(status="ok", variant="lm", target="onnxruntime", caps=TargetCaps(consumes="onnx"))
    text = SimpleNamespace(calib=[np.arange(64)])
    n, note = choose_threads([cell], {CellRef("lm", "onnxruntime"): Runner}, text, [1, 2], 0, lambda m: None)
    assert n == faster
    assert f"threads: {faster}, chosen by measurement on lm/onnxruntime" in note


def test_peak_memory_while_generating_is_measured_per_cell(int4_report: tuple[object, Path]) -> None:
    rep, _ = int4_report
    for variant, target in (("baseline", "torch"), ("baseline", "onnxruntime"), ("lm", "onnxruntime")):
        g = _cell(rep, variant, target).generation
        assert g.peak_rss_bytes is not None and g.peak_rss_bytes > 0


def test_dynamic_int8_on_a_decoder_packs_int8_weights_with_int8_activations(lm_dir: Path, cache_dir: Path,
                                                                            tmp_path: Path) -> None:
    import onnx

    rep = run(_recipe(lm_dir, [{"kind": "quantize.dynamic"}], lm_peak_memory=False), out_dir=tmp_path / "o",
              cache_dir=cache_dir, progress=False)
    v = rep.variants["lm"]
    assert v.facts.quantization == "dynamic" and v.facts.precision == "int8" and v.facts.decoder is not None
    cell = _cell(rep, "lm", "onnxruntime")
    m = onnx.load(str(Path(cell.compiled_path) / "model.onnx"), load_external_data=False)
    packed = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in packed[0].attribute}
    assert len(packed) == 11 and attrs["bits"] == 8 and attrs["accuracy_level"] == 4
    assert cell.generation.top1_agreement > 0.9


def test_an_architecture_the_builder_lacks_is_one_line_naming_it(tmp_path: Path, cache_dir: Path) -> None:
    import transformers as tf

    from compress.errors import ExportError
    from tests.llm_models import tiny_tokenizer

    cfg = tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=1, n_head=4, n_positions=256, bos_token_id=1,
                        eos_token_id=2)
    tf.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    tiny_tokenizer(512).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ExportError, match=r"GPT2LMHeadModel is not an architecture it supports") as e:
        run(_recipe(tmp_path / "gpt2", lm_peak_memory=False), out_dir=tmp_path / "o", cache_dir=cache_dir,
            progress=False)
    assert "\n" not in str(e.value)


def test_compress_generate_runs_a_source_and_an_exported_decoder_alike(lm_dir: Path,
                                                                       int4_report: tuple[object, Path]) -> None:
    import subprocess
    import sys

    rep, _ = int4_report
    folder = _cell(rep, "baseline", "onnxruntime").compiled_path
    outs = []
    for model in (f"hf:{lm_dir}", folder):
        r = subprocess.run([sys.executable, "-m", "compress", "generate", model, "--prompt", "The assert statement",
                            "--tokens", "8"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "time to first token" in r.stderr and "tokens/s decoding" in r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].strip()  # FP32 ONNX decoder: the same greedy text as PyTorch
    r = subprocess.run([sys.executable, "-m", "compress", "generate", folder, "--prompt", "x " * 1100],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "exceeds the model's context of 1024 tokens" in r.stderr


@pytest.mark.slow
def test_compare_ranks_precisions_of_a_language_model(lm_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    rec = tmp_path / "lm.toml"
    rec.write_text(f'name = "lm"\nmodel = {{ source = "hf:{lm_dir}", task = "causal-lm" }}\n'
                   'data = { source = "builtin:pydoc-topics" }\n'
                   "measure = { lm_prompt = 16, lm_new_tokens = 6, lm_rounds = 2, lm_window = 48, "
                   "lm_eval_tokens = 96, lm_calib_tokens = 96, threads = 1, lm_peak_memory = false }\n")
    r = subprocess.run([sys.executable, "-m", "compress", "compare", str(rec), "--targets", "torch,onnxruntime,tvm",
                        "--precision", "fp32,int8-dynamic,int4-weights", "--out", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rep = load_report(tmp_path / "o" / "report.json")
    for variant in ("int8-dynamic", "int4-weights"):
        g = _cell(rep, variant, "onnxruntime").generation
        assert g.decode_speedup is not None and g.perplexity is not None
    assert _cell(rep, "baseline", "tvm").status in ("failed", "unavailable")  # no generate loop: said, not hidden


def test_the_tied_embedding_is_untied_and_packed_to_int4(lm_dir: Path, cache_dir: Path, tmp_path: Path,
                                                         int4_report: tuple[object, Path]) -> None:
    import onnx

    rep = run(_recipe(lm_dir, [{"kind": "quantize.weight_only", "bits": 4, "group_size": 32, "embedding_bits": 4}],
                      lm_peak_memory=False), out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)
    cell = _cell(rep, "lm", "onnxruntime")
    m = onnx.load(str(Path(cell.compiled_path) / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert "GatherBlockQuantized" in ops and "Transpose" not in ops  # the tied table is its own, packed
    assert "com.microsoft:GatherBlockQuantized" in rep.variants["lm"].facts.required_ops
    float_only = _cell(int4_report[0], "lm", "onnxruntime")  # the same INT4 pass with the embedding in float
    assert cell.size_bytes < 0.8 * float_only.size_bytes
    assert cell.generation.top1_agreement > 0.9


def test_embedding_bits_on_a_model_that_is_not_a_decoder_is_refused() -> None:
    from compress.passes.quantize_weight_only import QuantizeWeightOnly, quantize_weight_only

    with pytest.raises(PassError, match="apply to decoder language models"):
        quantize_weight_only(_FakeOnnx(), QuantizeWeightOnly(embedding_bits=4), None)  # type: ignore[arg-type]


class _FakeOnnx:
    path = Path("/nonexistent")
    metadata: ClassVar[dict[str, str]] = {}

    @staticmethod
    def known_facts() -> Facts:
        return Facts()


@pytest.mark.parametrize("bits,symmetric,k,group", [(4, True, 96, 32), (4, False, 80, 32), (8, True, 80, 32),
                                                     (8, False, 64, 64)])
def test_gptq_codes_pack_into_matmulnbits_exactly(bits: int, symmetric: bool, k: int, group: int) -> None:
    """What GPTQ chose is what ONNX Runtime computes: codes, scales and zero points packed as MatMulNBits (a last
    block padded where the group does not divide K) give x @ dequantized(W)."""
    import onnx
    import onnxruntime as ort
    from compress.passes.decoder_gptq import gptq_weight, matmulnbits_node
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    n = 24
    w, x = rng.normal(size=(k, n)), rng.normal(size=(5, k)).astype(np.float32)
    codes, scales, zeros = gptq_weight(w, np.cov(rng.normal(size=(k, 4 * k))), bits, group, symmetric)
    deq = np.stack([(codes[r] - zeros[r // group]) * scales[r // group] for r in range(k)])
    node, inits = matmulnbits_node(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), codes, scales,
                                   None if symmetric else zeros, bits, group, None)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq, atol=1e-4)
    assert 0 < np.abs(deq - w).max() < (0.6 if bits == 4 else 0.05) * np.abs(w).max()


def test_gptq_compensates_rounding_error_where_the_inputs_are_correlated() -> None:
    """The point of GPTQ: on correlated inputs, its layer output error ||X (W - Q)|| is well below
    round-to-nearest's on the same grid (ONNX Runtime 1.32's GPTQ compensated nothing: no better than RTN)."""
    from compress.passes.decoder_gptq import gptq_weight

    rng = np.random.default_rng(1)
    k, n = 128, 64
    x = rng.normal(size=(2048, 16)) @ rng.normal(size=(16, k)) + 0.3 * rng.normal(size=(2048, k))  # low-rank-ish
    w = rng.normal(size=(k, n))
    h = 2 * x.T @ x / len(x)

    def err(h_used: np.ndarray, clip: bool = True) -> float:
        c, s, z = gptq_weight(w.copy(), h_used.copy(), 4, 32, True, clip=clip)
        q = np.stack([(c[r] - z[r // 32]) * s[r // 32] for r in range(k)])
        return float(np.linalg.norm(x @ (w - q)))

    rtn = err(np.eye(k), clip=False)  # an identity Hessian, no clipping: plain rounding, no error moves
    assert err(h) < 0.5 * rtn  # 0.30 here


def test_gptq_on_a_decoder_calibrates_on_text_and_keeps_the_decoder(lm_dir: Path, cache_dir: Path, tmp_path: Path,
                                                                    int4_report: tuple[object, Path]) -> None:
    import onnx

    rep = run(_recipe(lm_dir, [{"kind": "quantize.weight_only", "bits": 4, "group_size": 32, "algorithm": "gptq",
                                "calib_windows": 2}], lm_peak_memory=False),
              out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)
    v = rep.variants["lm"]
    assert v.facts.precision == "int4" and v.facts.decoder is not None
    info = v.passes["quantize.weight_only"]
    assert info["algorithm"] == "gptq" and "calibrated on 2 window(s) of 48 tokens" in info["notes"][0]
    cell = _cell(rep, "lm", "onnxruntime")
    m = onnx.load(str(Path(cell.compiled_path) / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in m.graph.node].count("MatMulNBits") == 2 * 5 + 1
    assert "MatMul" not in [n.op_type for n in m.graph.node]
    rtn = _cell(int4_report[0], "lm", "onnxruntime").generation  # RTN, same group, same held-out text
    assert cell.status == "ok" and cell.generation.kl < 0.5 * rtn.kl  # 4.6e-5 against 2.8e-4 here


def test_gptq_without_a_causal_lm_is_refused_in_the_plan(tmp_path: Path) -> None:
    from compress.passes.quantize_weight_only import QuantizeWeightOnly

    with pytest.raises(RecipeError, match="apply to decoder language models"):
        QuantizeWeightOnly(algorithm="gptq").preflight(_FakeOnnx(), None)


def test_int8_fraction_packs_the_most_sensitive_layers_at_8_bits() -> None:
    """Mixed precision: of three MatMuls, the one whose INT4 rounding moves its output most (its input is 30x
    larger than the first's; the last's is scaled down) is packed at 8 bits, the others at 4; the graph
    still runs and stays close to the float one."""
    import onnxruntime as ort
    from compress.passes.decoder_gptq import gptq_model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k = 64
    ws = [rng.normal(size=(k, k)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("Mul", ["x", "big"], ["xb"], name="scale"),
             helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
             helper.make_node("MatMul", ["xb", "w1"], ["h1"], name="mm1"),
             helper.make_node("Add", ["h0", "h1"], ["h"], name="add"),
             helper.make_node("Mul", ["h", "small"], ["hs"], name="shrink"),
             helper.make_node("MatMul", ["hs", "w2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    inits += [numpy_helper.from_array(np.array(30.0, np.float32), "big"),
              numpy_helper.from_array(np.array(0.01, np.float32), "small")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(32, k)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    wide = gptq_model(model, [{"x": x}], 4, 32, True, None, int8_fraction=0.34)
    assert wide == ["mm1"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits"}
    assert bits == {"mm0_Q4": 4, "mm1_Q8": 8, "mm2_Q4": 4}
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()


def test_compare_takes_a_causal_lm_from_the_command_line(lm_dir: Path, tmp_path: Path, capsys) -> None:
    """``compress compare hf:DIR --task causal-lm``: every precision on every generating target, judged in
    perplexity and paired generation speed against PyTorch FP32, with --rounds as the generation rounds."""
    from compress.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", f"hf:{lm_dir}", "--task", "causal-lm", "--targets", "torch,onnxruntime",
               "--precision", "fp32,int4-weights", "--rounds", "2", "--out", str(out), "--cache",
               str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    rep = load_report(out / "report.json")
    cells = {(r.variant, r.target): r for r in rep.results if r.status == "ok"}
    assert {("baseline", "torch"), ("baseline", "onnxruntime"), ("int4-weights", "onnxruntime")} <= set(cells)
    g = cells[("int4-weights", "onnxruntime")].generation
    assert g.rounds == 2 and g.perplexity > 0 and g.decode_speedup is not None
    assert "decode tok/s" in capsys.readouterr().out
    # --task belongs to a model given on the command line; a recipe carries its own.
    assert main(["compare", str(tmp_path / "r.toml"), "--task", "causal-lm"]) == 2
    assert "--task goes with a model, not a recipe" in capsys.readouterr().err


def test_a_fused_attention_decoder_keeps_its_cache_in_place(int4_report: tuple[object, Path]) -> None:
    """The exporter's GroupQueryAttention graph decodes with its cache in preallocated buffers (nothing copied
    per token); the tokens and logits are exactly those of handing the present tensors on, also when a
    speculative stepper cuts the cache back and outgrows its buffers."""
    from compress.measuring.generation import KVBuffers, OrtLMRunner
    from compress.measuring.speculative import stepper

    rep, _ = int4_report
    runner = OrtLMRunner(Path(_cell(rep, "lm", "onnxruntime").compiled_path), 1)
    assert runner.shared_cache
    prompts = np.random.default_rng(0).integers(3, 500, size=(2, 12))
    in_place = runner.generate(prompts, 8)
    seen = {}
    for shared in (True, False):
        runner.shared_cache = shared
        if not shared:
            assert np.array_equal(runner.generate(prompts, 8).tokens, in_place.tokens)
        st = stepper(runner)
        if shared:
            st.kv = KVBuffers(runner, 1, 14)  # smaller than what follows: the cache must grow, keeping its head
        got = [st.reset(prompts[0]), st.feed(np.array([5, 6, 7, 8]))]
        st.crop(13)
        got += [st.feed(np.array([9, 10, 11])), st.reset(prompts[1][:5]), st.feed(np.array([4]))]
        assert st.length == 6
        seen[shared] = got
    for a, b in zip(seen[True], seen[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
