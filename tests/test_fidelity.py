"""Fidelity that fits the output: agreement for logits, cosine for embeddings, SNR for regression."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from compress.passes._quant_common import below, compare

from compress.cli import main
from compress.errors import InputError, RecipeError
from compress.quality.fidelity import compare_outputs, degenerate, headline, infer_kind, load_metric, run_metric

FAST = 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0'


def test_kind_from_name_shape_and_declaration() -> None:
    r2 = np.zeros((4, 10))
    assert infer_kind(r2)[0] == "logits"
    assert infer_kind(r2, "last_hidden_state")[0] == "embedding"
    assert infer_kind(r2, "sentence_embedding")[0] == "embedding"
    assert infer_kind(r2, "logits")[0] == "logits"
    assert infer_kind(np.zeros((4, 7, 16)))[0] == "embedding"
    assert infer_kind(np.zeros((4, 1)))[0] == "regression"
    assert infer_kind(r2, "logits", declared="embedding")[0] == "embedding"
    with pytest.raises(RecipeError, match="not understood"):
        infer_kind(r2, declared="ranking")


def test_embeddings_get_cosine_not_argmax_agreement() -> None:
    g = np.random.default_rng(0)
    ref = g.standard_normal((64, 32))
    # Small noise: argmax over embedding dimensions flips often, the embedding is nearly the same.
    got = ref + 0.05 * g.standard_normal(ref.shape)
    got[3] = -ref[3]  # one sample broken outright: the worst case must show it
    f = compare_outputs(ref, got, "embedding")
    assert "agreement" not in f and f["headline"] == "cosine_mean"
    assert 0.95 < f["cosine_mean"] < 0.99 and f["cosine_worst"] == pytest.approx(-1.0)
    assert headline(f).startswith("cos 0.9") and "worst -1.0000" in headline(f)
    # Hidden states (batch, tokens, features): cosine per token, averaged per sample.
    h = g.standard_normal((8, 5, 16))
    fh = compare_outputs(h, h * 2.0, "embedding")
    assert fh["cosine_worst"] == pytest.approx(1.0)
    # The parity tolerance uses the worst sample for embeddings.
    assert below(f, 0.98, 0.9) and not below(compare_outputs(ref, ref, "embedding"), 0.98, 0.9)


def test_logits_agreement_and_topk_regression_snr() -> None:
    g = np.random.default_rng(1)
    ref = g.standard_normal((100, 10))
    got = ref.copy()
    got[:10] = -got[:10]  # the first 10 predictions change
    f = compare_outputs(ref, got, "logits")
    assert f["agreement"] == pytest.approx(0.9) and 0.0 < f["top5_overlap"] < 1.0
    y = g.standard_normal((50, 1))
    r = compare_outputs(y, y * 1.01, "regression")
    assert r["rel_error"] == pytest.approx(0.01) and r["snr_db"] == pytest.approx(40.0)
    assert "agreement" not in r and headline(r) == "SNR 40.0 dB"
    assert "agreement" in compare(ref, got) and "cosine_mean" in compare(np.zeros((2, 3, 4)) + 1, np.ones((2, 3, 4)))


def test_constant_and_zero_outputs_are_flagged_not_passed() -> None:
    assert "all zero" in (degenerate(np.zeros((8, 10))) or "")
    const = np.tile(np.arange(10.0), (8, 1))
    assert "same for every input" in (degenerate(const) or "")
    assert degenerate(np.random.default_rng(0).standard_normal((8, 10))) is None
    f = compare_outputs(const, const.copy(), "logits")
    assert f["agreement"] == 1.0 and f["degenerate"] and "DEGENERATE" in headline(f)


def test_user_metric_resolution_and_errors() -> None:
    fn = load_metric("tests.user_models:recall_at_1")
    e = np.eye(6)
    assert run_metric(fn, "tests.user_models:recall_at_1", e, e, None) == {"recall@1": 1.0}
    assert run_metric(lambda r, g, y: 0.5, "m:f", e, e, None) == {"f": 0.5}
    with pytest.raises(RecipeError, match="package.module:function"):
        load_metric("recall")
    with pytest.raises(RecipeError, match="no callable 'nope'"):
        load_metric("tests.user_models:nope")
    with pytest.raises(InputError, match="returned str"):
        run_metric(lambda r, g, y: "x", "m:f", e, e, None)
    with pytest.raises(InputError, match="raised ZeroDivisionError"):
        run_metric(lambda r, g, y: 1 / 0, "m:f", e, e, None)


def _run(tmp_path: Path, capsys, body: str) -> tuple[int, dict, str]:
    p = tmp_path / "r.toml"
    p.write_text(body)
    out = tmp_path / "out"
    code = main(["run", str(p), "--out", str(out), "--cache", str(tmp_path / "c"), "-q"])
    cap = capsys.readouterr()
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return code, rep, cap.out + cap.err


def test_run_reports_cosine_and_user_metric_for_an_embedding_model(tmp_path: Path, capsys) -> None:
    code, rep, text = _run(tmp_path, capsys,
                           'model = { source = "tests.user_models:embedder", input_shape = [1, 64] }\n'
                           + FAST + ', output_kind = "embedding", metric = "tests.user_models:recall_at_1" }\n'
                           '[[passes]]\nkind = "quantize.dynamic"\n')
    assert code == 0, text
    cells = [c for c in rep["results"] if c["status"] == "ok"]
    assert cells and all("agreement" not in c["fidelity"] for c in cells)
    q = next(c for c in cells if c["variant"] != "baseline" and c["target"] == "onnxruntime")
    assert 0.9 < q["fidelity"]["cosine_mean"] <= 1.0 and q["fidelity"]["cosine_worst"] <= q["fidelity"]["cosine_mean"]
    assert 0.0 <= q["fidelity"]["metric"]["recall@1"] <= 1.0
    assert "(worst 0.9" in text and "agree " not in text
    assert any("no argmax agreement" in n for n in rep["notes"])


def test_run_flags_a_constant_output_model(tmp_path: Path, capsys) -> None:
    code, rep, text = _run(tmp_path, capsys,
                           'model = { source = "tests.user_models:constant", input_shape = [1, 64] }\n' + FAST + ' }\n')
    assert code == 0, text
    assert all(c["fidelity"]["degenerate"] for c in rep["results"] if c["status"] == "ok")
    assert any("fidelity is not meaningful" in n for n in rep["notes"]) and "DEGENERATE" in text


def test_a_bad_metric_fails_before_any_work(tmp_path: Path, capsys) -> None:
    code, rep, text = _run(tmp_path, capsys, 'model = { source = "zoo:digits-cnn" }\n' + FAST
                           + ', metric = "tests.user_models:missing" }\n')
    assert code == 2 and "no callable 'missing'" in text and not rep
