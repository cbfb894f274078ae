"""Decoder language models on OpenVINO (its generate loop over the same ONNX decoder ONNX Runtime runs), decode
speed at a second batch size, and greedy agreement over several held-out prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")
pytest.importorskip("openvino")

from compress.core.artifact import Artifact
from compress.core.capabilities import DecoderFacts, Facts, refusal
from compress.core.manager import PassContext
from compress.errors import BuildError, RecipeError, TargetUnavailable
from compress.stages.pipeline import run
from compress.stages.recipe import recipe_from_dict
from tests.llm_models import tiny_llama

MEASURE = {"lm_prompt": 16, "lm_new_tokens": 6, "lm_rounds": 2, "lm_window": 48, "lm_eval_tokens": 96,
           "lm_calib_tokens": 96, "threads": 1, "lm_greedy_prompts": 3}
TARGETS = [{"kind": "torch"}, {"kind": "onnxruntime"}, {"kind": "openvino"}]


def _recipe(lm_dir: Path, passes: list[dict] | None = None, **measure: object) -> object:
    return recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                             "data": {"source": "builtin:pydoc-topics"}, "measure": {**MEASURE, **measure},
                             "passes": passes or [], "targets": TARGETS})


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("lm") / "tiny")


@pytest.fixture(scope="module")
def report(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    """FP32 and INT4 (MatMulNBits) decoders on PyTorch, ONNX Runtime and OpenVINO, timed at batch 1 and 2."""
    root = tmp_path_factory.mktemp("run")
    return run(_recipe(lm_dir, [{"kind": "quantize.weight_only", "bits": 4, "group_size": 32}], lm_batch=2),
               out_dir=root / "out", cache_dir=root / "cache", progress=False)


def _cell(rep: object, variant: str, target: str) -> object:
    return next(r for r in rep.results if r.variant == variant and r.target == target)  # type: ignore[attr-defined]


def test_openvino_fp32_decoder_generates_what_pytorch_does(report: object) -> None:
    ov, ref = _cell(report, "baseline", "openvino"), _cell(report, "baseline", "torch")
    assert ov.status == "ok", ov.reason
    g = ov.generation
    assert g.perplexity == pytest.approx(ref.generation.perplexity, rel=1e-4)
    assert g.top1_agreement == 1.0 and g.kl < 1e-6
    # Greedy tokens identical to PyTorch on every held-out prompt, and the report says over how many.
    assert g.greedy_agreement == 1.0 and g.greedy_prompts == 3 and g.greedy_identical_prompts == 3
    # Timed like every target: paired ratios against the reference, and peak memory while generating.
    assert g.decode_tokens_per_s > 0 and g.ttft_ms > 0
    assert g.decode_speedup.low <= g.decode_speedup.ratio <= g.decode_speedup.high
    assert g.peak_rss_bytes is not None and g.peak_rss_bytes > 0


def test_openvino_runs_the_int4_decoder(report: object) -> None:
    cell = _cell(report, "lm", "openvino")
    assert cell.status == "ok", cell.reason
    ort = _cell(report, "lm", "onnxruntime").generation
    assert cell.generation.perplexity == pytest.approx(ort.perplexity, rel=0.02)
    assert cell.generation.top1_agreement > 0.9


def test_decode_at_a_second_batch_is_its_own_paired_figure(report: object) -> None:
    from compress.reporting.report import render_text

    for variant, target in (("baseline", "onnxruntime"), ("lm", "onnxruntime")):
        bd = _cell(report, variant, target).generation.batch_decode
        assert bd.batch == 2 and bd.decode_tokens_per_s > 0 and bd.unavailable is None
        assert bd.decode_speedup.low <= bd.decode_speedup.ratio <= bd.decode_speedup.high
        assert _cell(report, variant, target).generation.batch == 1  # the batch-1 figures stay what they were
    ref = _cell(report, "baseline", "torch").generation.batch_decode
    assert ref.decode_tokens_per_s > 0 and ref.decode_speedup is None
    # OpenVINO's fused attention runs batch 1 only: said in one line, not a crash and not a number.
    ov = _cell(report, "baseline", "openvino").generation.batch_decode
    assert ov.decode_tokens_per_s is None and "batch 1 only" in ov.unavailable and "\n" not in ov.unavailable
    text = render_text(report)
    assert "decode at batch 2" in text and "not timed at batch 2" in text


def test_openvino_runner_keeps_its_cache_and_steps_for_speculative_decoding(report: object) -> None:
    from compress.targets.openvino_runtime import OpenVinoConfig, OpenVinoTarget

    from compress.measuring.speculative import SpeculativeRunner

    comp = Artifact.load(Path(_cell(report, "baseline", "openvino").compiled_path))
    target = OpenVinoTarget(OpenVinoConfig())
    runner = target.lm_runner(comp, 1)
    prompt = np.arange(3, 19, dtype=np.int64)[None]
    plain = runner.generate(prompt, 10).tokens
    # The whole generation again from the prefill's logits step by step: the cache carried the context.
    logits = runner.logits(np.concatenate([prompt[0], plain[0, :-1]]))
    assert (logits[prompt.shape[1] - 1:].argmax(-1) == plain[0]).all()
    spec = SpeculativeRunner(runner, target.lm_runner(comp, 1), k=3)
    assert (spec.generate(prompt, 10).tokens == plain).all() and spec.stats.accepted > 0
    with pytest.raises(TargetUnavailable, match="batch 1 only"):
        runner.generate(np.repeat(prompt, 2, 0), 4)


def test_compress_generate_runs_an_exported_decoder_on_openvino(report: object, lm_dir: Path) -> None:
    import subprocess
    import sys

    folder = _cell(report, "baseline", "onnxruntime").compiled_path
    outs = []
    for extra in ([], ["--target", "openvino"]):
        r = subprocess.run([sys.executable, "-m", "compress", "generate", folder, "--prompt", "The assert statement",
                            "--tokens", "8", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].strip()  # FP32: the same greedy text on both runtimes
    assert "openvino: prompt" in r.stderr
    r = subprocess.run([sys.executable, "-m", "compress", "generate", f"hf:{lm_dir}", "--prompt", "x",
                        "--target", "openvino"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "runs an exported ONNX decoder folder" in r.stderr
    r = subprocess.run([sys.executable, "-m", "compress", "generate", folder, "--prompt", "x", "--target", "tvm"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot generate from an exported decoder folder" in r.stderr
    assert "targets that can: openvino" in r.stderr


def test_openvino_refuses_an_operator_it_lacks_by_name(report: object, tmp_path: Path) -> None:
    import onnx
    from compress.targets.openvino_runtime import OpenVinoConfig, OpenVinoTarget
    from onnx import TensorProto, helper

    from compress.core.cache import Cache

    target = OpenVinoTarget(OpenVinoConfig())
    dec = DecoderFacts(layers=1, kv_heads=1, head_dim=4, vocab=8)
    # Plan time: the ops it converts pass, any other is named.
    known = ("com.microsoft:MatMulNBits", "com.microsoft:GroupQueryAttention")
    assert refusal(target.caps, Facts(decoder=dec, required_ops=known), "openvino") is None
    why = refusal(target.caps, Facts(decoder=dec, required_ops=("com.microsoft:QGemm",)), "openvino")
    assert why is not None and "com.microsoft:QGemm" in why
    # Build time: a graph its ONNX frontend cannot convert is one line naming the operator.
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (tmp_path / "m").mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              str(tmp_path / "m" / "model.onnx"))
    art = Artifact("onnx", tmp_path / "m", "x", [], facts=Facts(decoder=dec))
    with pytest.raises(BuildError, match=r"No conversion rule found for operations: com\.microsoft\.NoSuchOp") as e:
        target.compile(art, PassContext(cache=Cache(tmp_path / "c"), progress=False))
    assert "\n" not in str(e.value)


def test_a_batch_the_text_cannot_fill_is_refused_before_any_export(lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"measure.lm_prompt = 16 x measure.lm_batch = 200 needs 3200 tokens"):
        run(_recipe(lm_dir, lm_batch=200), out_dir=tmp_path / "o", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(RecipeError, match="lm_batch"):
        _recipe(lm_dir, lm_batch=0)
