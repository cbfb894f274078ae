"""Distillation of Hugging Face text models: two integer inputs (token ids, attention mask), text data,
and the loss chosen from the task's output kind. Skipped without transformers.

The encoder (a two-layer BERT with random weights) and its tokenizer are built by the test; nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from compress.cli import main
from tests.test_text_data import SEQ, WORDS, hf_dir, sentences


def _strong_bert(path: Path) -> Path:
    """A tiny BERT whose layers matter: at the usual init (std 0.02) a random encoder's output is nearly its
    embeddings, so pruning would change nothing to distil back."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    return path


def _recipe(tmp_path: Path, d: Path, task: str, passes: str, data: str = "text:s.txt") -> Path:
    r = tmp_path / "r.toml"
    r.write_text(f'name = "enc"\nmodel = {{ source = "hf:{d}", task = "{task}", input_shape = [1, {SEQ}] }}\n'
                 f'data = {{ source = "{data}", val_fraction = 0.25 }}\n'
                 'measure = { batch_sizes = [1], warmup = 0, min_runs = 3, min_time_s = 0.0 }\n' + passes)
    return r


def _run(tmp_path: Path, r: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    out = tmp_path / "out"
    code = main(["run", str(r), "--out", str(out), "--cache", str(tmp_path / "c"), "-q"])
    cap = capsys.readouterr()
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return code, rep, cap.out + cap.err


def test_pruned_text_encoder_is_distilled_back_with_the_cosine_loss(tmp_path: Path, capsys) -> None:
    """prune.channels -> distill on an hf: encoder with text data: both inputs reach the model, the auto loss
    is cosine (an embedding task), and the distilled student is closer to the teacher than the pruned one."""
    d = _strong_bert(tmp_path / "bert")
    (tmp_path / "s.txt").write_text("\n".join(sentences(160, seed=3)) + "\n")
    r = _recipe(tmp_path, d, "embedding",
                '[[passes]]\nkind = "prune.channels"\nratio = 0.5\n'
                '[[passes]]\nkind = "distill"\nepochs = 6\nbatch_size = 16\nlr = 0.003\npatience = 0\n')
    code, rep, text = _run(tmp_path, r, capsys)
    assert code == 0, text
    info = rep["variants"]["enc"]["passes"]["distill"]
    assert info["output_loss"] == "cosine" and info["metric"] == "teacher_cosine"
    assert any("task 'embedding'" in n for n in info["notes"])
    assert info["teacher_cosine_after"] > info["teacher_cosine_before"]
    assert info["steps_run"] > 0


def test_sequence_classifier_distils_with_kd_and_labels(tmp_path: Path) -> None:
    """A text classifier's logits are matched by KD, with its JSONL labels as cross-entropy."""
    from compress.passes.distill import Distill

    from compress.api import module_artifact
    from compress.core.cache import Cache
    from compress.core.manager import PassContext, PassManager
    from compress.inputs import hf
    from compress.inputs.data import load_data
    from compress.stages.recipe import DataSpec

    d = hf_dir(tmp_path / "cls", labels=2)
    lines = [json.dumps({"text": s, "label": i % 2}) for i, s in enumerate(sentences(120, seed=4))]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    task = "sequence-classification"
    specs = hf.input_specs(hf.read_config(d), task, (1, SEQ))
    data = load_data(DataSpec(source=f"jsonl:{tmp_path / 's.jsonl'}", label_field="label", val_fraction=0.25),
                     (1, SEQ), inputs=specs, model_source=f"hf:{d}")
    cache = Cache(tmp_path / "c")
    art = module_artifact(hf.load_dir(d, task), (1, SEQ), cache, inputs=specs)
    art.metadata["task"] = task
    out, _ = PassManager([Distill(epochs=1, batch_size=16)]).run(
        art, PassContext(cache=cache, data=data, original=art))
    info = out.metadata["distill"]
    assert info["output_loss"] == "kd" and info["labels_used"] is True and "ce" in info["loss_terms"]
    assert info["steps_run"] == -(-len(data.train) // 16)  # one epoch over the training sentences


def test_hidden_states_ignore_padding_in_the_loss() -> None:
    """Per-token losses on hidden states count real tokens only: a student wrong on padding alone scores 1."""
    import torch
    from compress.passes.distill import _cosine_loss, _out_loss

    t = torch.randn(2, 4, 8)
    s = t.clone()
    s[:, 2:] = -t[:, 2:]  # opposite on the padded positions only
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    assert float(_cosine_loss(s, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(_cosine_loss(s, t)) == pytest.approx(1.0, abs=1e-5)
    assert float(_out_loss("mse", s, t, 1.0, mask)) == pytest.approx(0.0, abs=1e-9)


def test_single_array_data_for_a_two_input_model_is_refused_in_one_line(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from compress.passes.distill import Distill

    from compress.api import module_artifact
    from compress.core.cache import Cache
    from compress.core.manager import PassContext, PassManager
    from compress.errors import PassError
    from compress.inputs import hf
    from compress.inputs.data import DataBundle, Split

    m = hf.load_dir(hf_dir(tmp_path / "bert"), "embedding")
    specs = hf.input_specs(hf.read_config(tmp_path / "bert"), "embedding", (1, SEQ))
    cache = Cache(tmp_path / "c")
    art = module_artifact(m, (1, SEQ), cache, inputs=specs)
    x = np.zeros((40, SEQ), np.float32)
    sp = Split(x, None)
    data = DataBundle("npz:x", sp, sp, sp, False, "d", (SEQ,), (SEQ,))
    torch.manual_seed(0)
    with pytest.raises(PassError, match=r"takes 2 input\(s\) \(input_ids, attention_mask\) but the data gives 1"):
        PassManager([Distill(epochs=1)]).run(art, PassContext(cache=cache, data=data, original=art))


def test_nncf_quantizes_a_text_encoder_on_its_named_inputs(tmp_path: Path, capsys) -> None:
    """quantize.nncf calibrates a two-input encoder on the tokenized sentences (ids and mask by name), with
    accuracy control on the same named inputs."""
    pytest.importorskip("nncf")
    d = hf_dir(tmp_path / "bert")
    (tmp_path / "s.txt").write_text("\n".join(sentences(120, seed=5)) + "\n")
    r = _recipe(tmp_path, d, "embedding", '[[passes]]\nkind = "quantize.nncf"\nsamples = 16\n'
                'max_accuracy_drop = 0.5\naccuracy_samples = 16\n')
    code, rep, text = _run(tmp_path, r, capsys)
    assert code == 0, text
    info = rep["variants"]["enc"]["passes"]["quantize.nncf"]
    assert info["quantized_nodes"] > 0 and info["accuracy_control"]["metric"] == "output cosine to the float model"
    assert any("(input_ids, attention_mask)" in n for n in info["notes"])
    cell = next(c for c in rep["results"] if c["variant"] == "enc" and c["target"] == "onnxruntime")
    assert cell["status"] == "ok" and cell["fidelity"]["cosine_mean"] > 0.9


def test_single_array_data_for_a_two_input_model_is_refused_at_plan_time(tmp_path: Path) -> None:
    """Data of one array per sample (built through the API) cannot feed ids and a mask: the plan refuses it for
    every pass that feeds data, naming both inputs, before any pass (export ...) runs."""
    import numpy as np
    from compress.passes.quantize_nncf import QuantizeNncf

    from compress.errors import RecipeError
    from compress.inputs import hf
    from compress.inputs.data import DataBundle, Split
    from compress.stages import preflight

    specs = hf.input_specs(hf.read_config(hf_dir(tmp_path / "bert")), "embedding", (1, SEQ))
    sp = Split(np.zeros((40, SEQ), np.float32), None)
    data = DataBundle("npz:x", sp, sp, sp, False, "d", (SEQ,), (SEQ,))
    with pytest.raises(RecipeError, match=r"'quantize.nncf' feeds the data to the model's 2 inputs "
                                          r"\(input_ids, attention_mask\)"):
        preflight.check_data_needed([QuantizeNncf()], data, synthetic_ok=True, inputs=specs)
