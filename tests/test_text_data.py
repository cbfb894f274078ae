"""Text and JSONL data, tokenized offline with a Hugging Face model directory's own tokenizer.

The model (a two-layer BERT) and its WordPiece tokenizer (a vocabulary written here) are built by the
test; nothing is downloaded. Skipped without transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from compress.cli import main  # noqa: E402
from compress.errors import InputError, RecipeError  # noqa: E402
from compress.inputs.data import load_data  # noqa: E402
from compress.stages.recipe import DataSpec  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat on mat quick brown fox jumps over "
         "lazy bird sang in tree red blue green".split(), "##s", "##ed"]
ID = {w: i for i, w in enumerate(WORDS)}
SEQ = 12


def hf_dir(path: Path, tokenizer: bool = True, vocab_size: int = 64, labels: int = 0) -> Path:
    """A tiny BERT directory (config + safetensors) with, optionally, its tokenizer saved beside it."""
    import torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64,
                                  **({"num_labels": labels, "id2label": {0: "neg", 1: "pos"}} if labels else {}))
    model = (transformers.BertForSequenceClassification(cfg) if labels
             else transformers.BertModel(cfg, add_pooling_layer=False))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
        transformers.BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    return path


def sentences(n: int = 40, seed: int = 0) -> list[str]:
    g = np.random.default_rng(seed)
    pool = WORDS[5:-2]
    return [" ".join(g.choice(pool, size=int(g.integers(3, 9)))) for _ in range(n)]


def _inputs(path: Path) -> tuple:  # type: ignore[type-arg]
    from compress.inputs import hf

    return hf.input_specs(hf.read_config(path), "embedding", (1, SEQ))


def test_text_file_is_tokenized_into_the_model_inputs_and_split(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "bert")
    lines = ["the cat sat", "", *sentences(38), "the quick brown fox jumps over the lazy dog on the mat in a tree"]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    data = load_data(DataSpec(source=f"text:{tmp_path / 's.txt'}"), (1, SEQ), _inputs(d), model_source=f"hf:{d}")
    assert data is not None and data.input_names == ("input_ids", "attention_mask") and not data.labelled
    n = len(data.train) + len(data.calib) + len(data.val)
    assert n == 40  # the blank line is skipped
    assert data.train.x.dtype == np.int64 and data.train.x.shape[1:] == (SEQ,)
    everything = np.concatenate([data.train.x, data.calib.x, data.val.x])
    # "the cat sat" as WordPiece ids from the vocabulary written above, padded to the model's length.
    want = [ID["[CLS]"], ID["the"], ID["cat"], ID["sat"], ID["[SEP]"]] + [ID["[PAD]"]] * (SEQ - 5)
    assert any(list(row) == want for row in everything)
    masks = np.concatenate([s.extra["attention_mask"] for s in (data.train, data.calib, data.val)])  # type: ignore[index]
    assert set(np.unique(masks)) <= {0, 1} and ((everything != ID["[PAD]"]) == (masks == 1)).all()
    assert "40 texts tokenized with the model's tokenizer to 12 tokens (1 truncated)" in data.note
    feeds = data.feeds(data.val)
    assert set(feeds) == {"input_ids", "attention_mask"} and feeds["input_ids"].dtype == np.int64


def test_jsonl_with_text_and_label_fields(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "bert", labels=2)
    rows = [{"sentence": s, "y": ("pos" if i % 3 else 0)} for i, s in enumerate(sentences(30))]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = DataSpec(source=f"jsonl:{tmp_path / 'd.jsonl'}", text_field="sentence", label_field="y")
    data = load_data(spec, (1, SEQ), _inputs(d), model_source=f"hf:{d}")
    assert data is not None and data.labelled
    y = np.concatenate([s.y for s in (data.train, data.calib, data.val)])  # type: ignore[misc]
    assert sorted(y.tolist()) == sorted(1 if i % 3 else 0 for i in range(30))  # "pos" through label2id
    unlabelled = load_data(DataSpec(source=f"jsonl:{tmp_path / 'd.jsonl'}", text_field="sentence"), (1, SEQ),
                           _inputs(d), model_source=f"hf:{d}")
    assert unlabelled is not None and not unlabelled.labelled


@pytest.mark.parametrize(("case", "exc", "msg"), [
    ("missing", InputError, "text data file not found"),
    ("empty", InputError, "no text in it (empty, or only blank lines)"),
    ("no-tokenizer", InputError, "no tokenizer in the model directory"),
    ("not-hf", RecipeError, "needs a Hugging Face model directory"),
    ("bad-field", InputError, "line 2: no field 'text' (fields: sentence); set data.text_field"),
    ("bad-json", InputError, "line 1: not valid JSON"),
    ("not-object", InputError, "line 1: expected a JSON object"),
    ("bad-label", InputError, "label 'meh' is not a class of the model"),
    ("missing-label", InputError, "no label field 'y'"),
    ("label-on-text", RecipeError, "data.label_field applies to jsonl:FILE data"),
    ("wrong-vocab", InputError, "outside the model's range 0..9; is it the model's own tokenizer?"),
])
def test_text_data_errors_are_one_clear_line(tmp_path: Path, case: str, exc: type, msg: str) -> None:
    d = hf_dir(tmp_path / "bert", tokenizer=case != "no-tokenizer", vocab_size=10 if case == "wrong-vocab" else 64)
    txt, jl = tmp_path / "s.txt", tmp_path / "d.jsonl"
    txt.write_text("\n \n" if case == "empty" else "\n".join(sentences(20)) + "\n")
    body = {"bad-field": '{"text": "the cat"}\n{"sentence": "a dog"}\n', "bad-json": "{text: 1}\n",
            "not-object": '["the cat"]\n', "bad-label": '{"text": "the cat", "y": "meh"}\n',
            "missing-label": '{"text": "the cat", "y": 1}\n{"text": "a dog"}\n'}.get(case, "")
    jl.write_text(body)
    source = {"missing": f"text:{tmp_path / 'nope.txt'}"}.get(case, f"jsonl:{jl}" if body else f"text:{txt}")
    spec = DataSpec(source=source, label_field="y" if case in ("bad-label", "missing-label", "label-on-text")
                    else None)
    model = "zoo:digits-cnn" if case == "not-hf" else f"hf:{d}"
    with pytest.raises(exc, match=re.escape(msg)) as e:
        load_data(spec, (1, SEQ), _inputs(d), model_source=model)
    assert "\n" not in str(e.value)


def test_run_and_check_on_text_data_end_to_end(tmp_path: Path, capsys) -> None:
    """A recipe with text data: the run calibrates and scores on the tokenized sentences, and a fidelity
    budget is decided on the validation split; a logits-only figure on this embedding model is refused."""
    d = hf_dir(tmp_path / "bert")
    (tmp_path / "s.txt").write_text("\n".join(sentences(60, seed=1)) + "\n")
    (tmp_path / "r.toml").write_text(
        f'name = "enc"\nmodel = {{ source = "hf:{d}", task = "embedding", input_shape = [1, {SEQ}] }}\n'
        'data = { source = "text:s.txt", val_fraction = 0.25 }\n'
        'measure = { batch_sizes = [1], warmup = 0, min_runs = 3, min_time_s = 0.0 }\n'
        '[[passes]]\nkind = "quantize.dynamic"\n')
    b = tmp_path / "b.toml"
    b.write_text('models = { enc = "r.toml" }\nresamples = 200\n'
                 '[[budget]]\nmodel = "enc"\nfidelity = "cosine_worst >= 0.5"\n')
    code = main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0, out
    rep = json.loads((tmp_path / "o" / "enc" / "report.json").read_text())
    assert rep["data"]["source"].startswith("text:") and rep["data"]["val"] == 15
    assert "60 texts tokenized" in rep["data"]["note"]
    v = json.loads((tmp_path / "o" / "check.json").read_text())["verdicts"][0]
    assert v["status"] == "pass" and 0.5 <= v["value"] <= 1.0
    assert "embedding fidelity to the original model on the validation split (15 samples of text:" in v["detail"]
    b.write_text('models = { enc = "r.toml" }\n[[budget]]\nmodel = "enc"\nfidelity = "agreement >= 0.9"\n')
    assert main(["check", str(b), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o2")]) == 2
    assert "gives embedding output" in capsys.readouterr().err


def test_latency_at_several_sequence_lengths(tmp_path: Path, capsys) -> None:
    """measure.seq_lens: each (batch, sequence length) timed interleaved, keyed "B" at the model's own length
    and "B/sS" at the others, with a paired ratio to the baseline at the same shape; a budget can name one."""
    from compress.reporting.report_schema import load_report

    d = hf_dir(tmp_path / "bert")
    (tmp_path / "r.toml").write_text(
        f'name = "enc"\nmodel = {{ source = "hf:{d}", task = "embedding", input_shape = [1, {SEQ}] }}\n'
        f'measure = {{ batch_sizes = [1, 2], seq_lens = [4, {SEQ}], warmup = 0, min_runs = 4, min_time_s = 0.0 }}\n'
        '[[passes]]\nkind = "quantize.dynamic"\n')
    code = main(["run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "-q"])
    text = capsys.readouterr()
    assert code == 0, text.out + text.err
    rep = load_report(tmp_path / "o" / "report.json")  # the schema accepts the new keys
    assert rep.measurement.seq_own == SEQ and rep.measurement.seq_lens == [4, SEQ]
    q = rep.cell("enc", "onnxruntime")
    assert q is not None and set(q.latency) == {"1", "2", "1/s4", "2/s4"}
    assert q.latency["1/s4"].runs >= 4 and q.latency["2/s4"].batch == 2
    assert set(q.ratio_to_baseline) == {"1", "2", "1/s4", "2/s4"}
    # The rounds of each shape were interleaved across every candidate, as batches are.
    assert q.latency["1/s4"].timing.order.candidates == q.latency["1"].timing.order.candidates
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Latency at other sequence lengths" in md and "enc/onnxruntime b2 seq 4: p50" in md
    assert any(n.seq == 4 for n in rep.noise)
    # A budget at a sequence length reads that key; at the model's own length, the plain batch key.
    from compress.apps.budget import BudgetsFile, BudgetSpec, evaluate_budget

    bf = BudgetsFile(models={"enc": "r.toml"}, budget=[], resamples=200)
    v4 = evaluate_budget(BudgetSpec(model="enc", target="onnxruntime", metric="p50", max="10 s", seq=4), rep, bf,
                         None, "fp")
    own = evaluate_budget(BudgetSpec(model="enc", target="onnxruntime", metric="p50", max="10 s", seq=SEQ), rep, bf,
                          None, "fp")
    assert v4.status == own.status == "pass"
    assert v4.value == pytest.approx(q.latency["1/s4"].p50_ms, rel=0.5) and own.value is not None
    gone = evaluate_budget(BudgetSpec(model="enc", target="onnxruntime", metric="p50", max="10 s", seq=7), rep, bf,
                           None, "fp")
    assert gone.status == "fail" and "sequence length 7 was not measured" in gone.detail


def test_seq_lens_on_a_model_without_a_sequence_axis_is_a_usage_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "r.toml").write_text('model = { source = "zoo:digits-cnn" }\nmeasure = { seq_lens = [8] }\n')
    code = main(["run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "measure.seq_lens = [8]: the model has no dynamic sequence axis" in err
