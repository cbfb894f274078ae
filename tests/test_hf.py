"""Hugging Face model directories (hf:DIR), loaded offline from config + safetensors. Skipped without transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from compress.cli import main  # noqa: E402


def _tiny_bert(path: Path, pickled: bool = False) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    if pickled:
        cfg.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, safe_serialization=True)
    return path


def _run(tmp_path: Path, capsys, model: str, passes: str = "") -> tuple[int, dict, str]:  # type: ignore[type-arg]
    r = tmp_path / "r.toml"
    r.write_text(f'name = "hf"\nmodel = {{ {model} }}\n'
                 'measure = { batch_sizes = [1], warmup = 1, min_runs = 3, min_time_s = 0.0 }\n' + passes)
    out = tmp_path / "out"
    code = main(["run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q"])
    cap = capsys.readouterr()
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return code, rep, cap.out + cap.err


def test_hf_encoder_prunes_heads_quantizes_and_reports_cosine(tmp_path: Path, capsys) -> None:
    d = _tiny_bert(tmp_path / "bert")
    code, rep, text = _run(tmp_path, capsys, f'source = "hf:{d}", task = "embedding", input_shape = [1, 16]',
                           '[[passes]]\nkind = "prune.channels"\nratio = 0.5\n[[passes]]\nkind = "quantize.dynamic"\n')
    assert code == 0, text
    cells = {(c["variant"], c["target"]): c for c in rep["results"]}
    assert all(c["status"] in ("ok", "skipped") for c in cells.values()), text
    q = cells[("hf", "onnxruntime")]
    assert q["fidelity"]["kind"] == "embedding" and "agreement" not in q["fidelity"]
    assert -1.0 <= q["fidelity"]["cosine_worst"] <= q["fidelity"]["cosine_mean"] <= 1.0
    meta = rep["variants"]["hf"]["passes"]["prune.channels"]
    assert set(meta["heads_after"].values()) == {2}  # whole heads (num_attention_heads), not head widths
    assert rep["variants"]["hf"]["passes"]["quantize.dynamic"]["per_channel"] is True


def test_hf_directory_errors_are_one_line(tmp_path: Path, capsys) -> None:
    d = _tiny_bert(tmp_path / "bert")
    code, _, text = _run(tmp_path, capsys, f'source = "hf:{d}"')
    assert code == 2 and "model.task" in text and "embedding" in text
    p = _tiny_bert(tmp_path / "pickled", pickled=True)
    code, _, text = _run(tmp_path, capsys, f'source = "hf:{p}", task = "embedding"')
    assert code == 2 and "no .safetensors weights" in text
    code, _, text = _run(tmp_path, capsys, f'source = "hf:{tmp_path / "nope"}", task = "embedding"')
    assert code == 2 and "not found" in text


def test_tvm_builds_a_transformer_with_token_and_mask_inputs(tmp_path: Path, capsys) -> None:
    """Two integer inputs with symbolic batch and sequence axes: TVM builds the static shapes after the shape
    arithmetic is folded, and the build matches its input model (parity) and the original (fidelity)."""
    pytest.importorskip("tvm")
    d = _tiny_bert(tmp_path / "bert")
    code, rep, text = _run(tmp_path, capsys, f'source = "hf:{d}", task = "embedding", input_shape = [1, 16]',
                           '[[targets]]\nkind = "tvm"\ntuning_trials = 0\nemulate = "off"\n')
    assert code == 0, text
    cell = next(c for c in rep["results"] if c["target"] == "tvm")
    assert cell["status"] == "ok", cell["reason"]
    assert cell["parity"]["ok"] and cell["parity"]["cosine"] > 0.9999
    assert cell["fidelity"]["kind"] == "embedding" and cell["fidelity"]["cosine_worst"] > 0.9999
