"""W8A8 for decoder language models: quantize.int8 on a causal LM quantizes its MatMuls' inputs statically,
calibrated on the run's text as prefills with the KV cache, optionally after SmoothQuant (exact in float)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

from compress.errors import CompressError, RecipeError
from compress.stages.pipeline import run
from compress.stages.recipe import recipe_from_dict
from tests.llm_models import tiny_llama

MEASURE = {"lm_prompt": 16, "lm_new_tokens": 6, "lm_rounds": 2, "lm_window": 48, "lm_eval_tokens": 96,
           "lm_calib_tokens": 144, "threads": 1, "lm_peak_memory": False}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("lm") / "tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _recipe(lm_dir: Path, passes: list[dict]) -> object:
    return recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                             "data": {"source": "builtin:pydoc-topics"}, "measure": MEASURE, "passes": passes,
                             "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]})


@pytest.fixture(scope="module")
def sq_report(lm_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("run") / "out"
    rep = run(_recipe(lm_dir, [{"kind": "quantize.int8", "smoothquant": True, "smoothquant_alpha": "auto"}]),
              out_dir=out, cache_dir=cache_dir, progress=False)
    return rep, out


def test_w8a8_quantizes_every_matmul_input_keeps_outputs_float_and_decoder_facts(sq_report: tuple[object, Path]
                                                                                 ) -> None:
    import onnx

    rep, _ = sq_report
    v = rep.variants["lm"]  # type: ignore[attr-defined]
    assert v.facts.precision == "int8" and v.facts.quantization == "qdq" and v.facts.decoder is not None
    cell = next(r for r in rep.results if r.variant == "lm" and r.target == "onnxruntime")  # type: ignore[attr-defined]
    assert cell.status == "ok", cell.reason
    m = onnx.load(str(Path(cell.compiled_path) / "model.onnx"), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    mats = [n for n in m.graph.node if n.op_type == "MatMul"]
    # 2 blocks x (packed qkv, o, gate, up, down) + the LM head: each reads a dequantized activation and weight.
    assert len(mats) == 11
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" and producer[n.input[1]].op_type ==
               "DequantizeLinear" for n in mats)
    mm_out = {n.output[0] for n in mats}
    assert not [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in mm_out]
    # The tied embedding got its own float table: the token Gather reads no Transpose of the (quantized) head.
    gather = next(n for n in m.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert gather.input[0] in {i.name for i in m.graph.initializer}
    info = v.passes["quantize.int8"]
    sq = info["smoothquant"]
    assert sq["alpha"] == "auto" and info["parity"]["checked"]
    # One alpha (or none) per smoothed activation: 2 x (attention input, MLP input, down_proj input) + the head's.
    assert len(sq["alphas"]) == len(sq["simulated_error"]) == 7
    # gate and up read the MLP's norm; every other smoothed activation feeds one MatMul (qkv is packed).
    assert sq["smoothed_matmuls"] == sum({"post_attention_layernorm": 2}.get(k.split("/")[3], 1)
                                         for k, a in sq["alphas"].items() if a is not None)
    assert any("alpha chosen per activation" in n for n in info["notes"])
    assert info["calibration_windows"] == 3 and info["window"] == 48
    assert cell.generation.top1_agreement > 0.9 and cell.generation.perplexity_rise < 0.05


def test_w8a8_without_smoothquant_runs_and_says_so(lm_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    rep = run(_recipe(lm_dir, [{"kind": "quantize.int8", "skip": ["*down_proj*", "last"]}]),
              out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False)
    info = rep.variants["lm"].passes["quantize.int8"]  # type: ignore[attr-defined]
    assert "smoothquant" not in info
    assert info["kept_float"] == ["/model/layers.0/mlp/down_proj/MatMul", "/model/layers.1/mlp/down_proj/MatMul",
                                  "/lm_head/MatMul"]
    assert info["quantized_matmuls"] == info["matmul_layers"] - 3
    assert any("no SmoothQuant" in n for n in info["notes"])


def test_a_skip_pattern_that_matches_no_matmul_is_one_line(lm_dir: Path, cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=r"skip entry '\*gate\*proj\*x' selects no MatMul node"):
        run(_recipe(lm_dir, [{"kind": "quantize.int8", "skip": ["*gate*proj*x"]}]), out_dir=tmp_path / "o",
            cache_dir=cache_dir, progress=False)


def test_accuracy_control_on_a_decoder_is_one_line_before_any_export(lm_dir: Path, cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(RecipeError, match=r"max_accuracy_drop .* does not apply to a decoder language model") as e:
        run(_recipe(lm_dir, [{"kind": "quantize.int8", "max_accuracy_drop": 0.01}]), out_dir=tmp_path / "o",
            cache_dir=cache_dir, progress=False, log=said.append)
    assert "\n" not in str(e.value) and not any("export.onnx" in s for s in said)


def test_auto_alpha_on_a_model_that_is_not_a_language_model_is_one_line(tmp_path: Path) -> None:
    rec = recipe_from_dict({"name": "cnn", "model": {"source": "zoo:digits-cnn"}, "data": {"source": "random"},
                            "passes": [{"kind": "quantize.int8", "smoothquant": True, "smoothquant_alpha": "auto"}],
                            "targets": [{"kind": "onnxruntime"}]})
    with pytest.raises(RecipeError, match=r"smoothquant_alpha = \"auto\" is chosen on a decoder language model"):
        run(rec, out_dir=tmp_path / "o", progress=False)


def _rms_mlp_graph(hidden: int = 8, inner: int = 16) -> object:
    """x -> SkipSimplifiedLayerNormalization -> q (MatMul) and a gated MLP (gate, up, Mul(SiLU(gate), up), down)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> object:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "g"], ["n", "", "", "res"],
                         domain="com.microsoft", epsilon=1e-6, name="norm"),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n", "wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["n", "wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sg"], name="sig"),
        helper.make_node("Mul", ["gate", "sg"], ["act"], name="silu"),
        helper.make_node("Mul", ["act", "up"], ["h"], name="mul"),
        helper.make_node("MatMul", ["h", "wd"], ["down"], name="down_proj"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, hidden])
                                       for n in ("x", "skip")],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "down", "res")],
                          [numpy_helper.from_array((1 + rng.random(hidden)).astype(np.float32), "g"),
                           w("wq", hidden, hidden), w("wg", hidden, inner), w("wu", hidden, inner),
                           w("wd", inner, hidden)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_smoothquant_is_exact_in_float_and_flattens_the_outliers() -> None:
    import onnxruntime as ort
    from compress.passes.smoothquant_decoder import activation_absmax, smooth_decoder

    model = _rms_mlp_graph()
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (32, 8)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel, as LLM activations have after their norms
    feeds = [{"x": x, "skip": np.zeros_like(x)}]

    def run_model(m: object) -> list[np.ndarray]:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
        return s.run(None, feeds[0])

    def spread(m: object) -> float:  # largest channel max over the median channel max, over the smoothed inputs
        a = activation_absmax(m, ["n", "h"], feeds)
        return float(max(v.max() / np.median(v) for v in a.values()))

    before, spread_before = run_model(model), spread(model)
    info = smooth_decoder(model, feeds, alpha=0.5)
    assert info["norms"] == 1 and info["gated_mlps"] == 1 and info["smoothed_matmuls"] == 4
    for a, b in zip(before, run_model(model), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert spread(model) < 0.6 * spread_before


def test_auto_alpha_picks_the_lowest_simulated_int8_error() -> None:
    from compress.passes.smoothquant_decoder import AUTO_ALPHAS, _activation_stats, _fake_quant_error, smooth_decoder

    model = _rms_mlp_graph()
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (64, 8)).astype(np.float32)
    x[:, 3] *= 40
    feeds = [{"x": x, "skip": np.zeros_like(x)}]
    st = _activation_stats(model, ["n"], feeds, 64)["n"]
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}  # type: ignore[attr-defined]
    plain = _fake_quant_error(st["rows"], st["min"], st["max"], [w["wq"], w["wg"], w["wu"]], np.ones(8, np.float32))
    info = smooth_decoder(model, feeds, alpha=None, rows=64)
    assert info["alphas"]["n"] in AUTO_ALPHAS  # the outlier channel: smoothing beats leaving it
    assert info["simulated_error"]["n"] < plain


def test_an_activation_read_only_by_float_matmuls_is_not_smoothed() -> None:
    from compress.passes.smoothquant_decoder import smooth_decoder

    model = _rms_mlp_graph()
    x = np.random.default_rng(1).normal(0, 1, (16, 8)).astype(np.float32)
    info = smooth_decoder(model, [{"x": x, "skip": np.zeros_like(x)}], alpha=0.5, skip=frozenset({"down_proj"}))
    assert info["gated_mlps"] == 0 and info["norms"] == 1 and info["smoothed_matmuls"] == 3
