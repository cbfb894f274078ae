"""compress search over a causal language model: blocks removed, widths and INT4 settings searched, objectives read
from the run's generation record (decode time, time to first token, perplexity rise), the front written and
plotted; a space its model cannot take, or an objective its runs do not measure, refused before any trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

from compress.apps.search import load_space, run_search, search_target
from compress.cli import main
from compress.errors import RecipeError
from compress.stages.recipe import load_recipe
from tests.llm_models import tiny_llama


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("lm") / "tiny4", layers=4)


def head(lm_dir: Path) -> str:
    return (f'name = "lm-search"\nmodel = {{ source = "hf:{lm_dir}", task = "causal-lm" }}\n'
            'data = { source = "builtin:pydoc-topics" }\n'
            "measure = { lm_prompt = 16, lm_new_tokens = 6, lm_rounds = 2, lm_window = 48, lm_eval_tokens = 96, "
            "lm_calib_tokens = 288, threads = 1, lm_peak_memory = false }\n")


DEPTH = '[[passes]]\nkind = "prune.depth"\noptional = true\nblocks = [1, 2]\nwindows = 2\n'
INT4 = '[[passes]]\nkind = "quantize.weight_only"\nbits = 4\ngroup_size = { choices = [16, 32] }\n'
TARGETS = '[[targets]]\nkind = "torch"\n\n[[targets]]\nkind = "onnxruntime"\n'


def space(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "space.toml"
    p.write_text(body)
    return p


def test_llm_search_writes_a_front_of_decode_speed_and_perplexity(lm_dir: Path, tmp_path: Path) -> None:
    body = (head(lm_dir) + '[search]\ntrials = 3\nsampler = "random"\nseed = 1\n'
            'objectives = ["decode_time_ratio", "perplexity_rise", "ttft_ratio"]\n' + DEPTH + INT4 + TARGETS)
    out = tmp_path / "out"
    res = run_search(space(tmp_path, body), out, cache_dir=tmp_path / "cache")
    # The reference (PyTorch eager) is what the ratios are taken against; the ONNX build is what is searched.
    assert res["target"] == "onnxruntime"
    assert len(res["trials"]) == 3 and all(t["state"] == "COMPLETE" for t in res["trials"]), res["trials"]
    for t in res["trials"]:
        m = t["metrics"]
        # Decode speed as time per token against the original (1 / decode_speedup), with its interval turned over.
        assert m["decode_time_ratio"] == pytest.approx(1 / m["decode_speedup"])
        lo, hi = m["decode_time_ratio_ci"]
        assert lo <= m["decode_time_ratio"] <= hi
        assert m["ttft_ratio_ci"][0] <= m["ttft_ratio"] <= m["ttft_ratio_ci"][1]
        assert m["perplexity"] > 0 and m["perplexity_rise"] > -1 and 0 <= m["top1_agreement"] <= 1
        assert t["values"] == [m["decode_time_ratio"], m["perplexity_rise"], m["ttft_ratio"]]
        # Blocks removed show in the decoder's MACs: 1 or 2 of 4 blocks, or none with the pass off.
        pruned = t["params"]["passes[1].enabled"]
        assert m["macs_ratio"] == (pytest.approx(1 - t["params"]["passes[1].blocks"] / 4) if pruned else 1.0)
    assert res["front"] and res["best"] in res["front"]
    saved = json.loads((out / "search.json").read_text())
    assert saved["objectives"] == ["decode_time_ratio", "perplexity_rise", "ttft_ratio"]
    assert saved["front"] == res["front"]
    md = (out / "front.md").read_text()
    assert "| trial | decode_time_ratio | perplexity_rise | ttft_ratio | decode time ratio 95% CI" in md
    svg = (out / "front.svg").read_text()
    assert svg.startswith("<svg") and ('class="front"' in svg or len(res["front"]) == 1)
    assert "decode_time_ratio (lower is better)" in svg and "perplexity_rise (lower is better)" in svg
    assert (out / "front.png").stat().st_size > 0
    best = load_recipe(res["best_recipe"])  # a plain recipe that `compress run` takes
    assert best.model.task == "causal-lm" and any(p.kind == "quantize.weight_only" for p in best.passes)


def test_an_llm_space_defaults_to_decode_speed_and_perplexity(lm_dir: Path, tmp_path: Path) -> None:
    sp = load_space(space(tmp_path, head(lm_dir) + DEPTH + INT4 + TARGETS))
    assert sp.search.objectives == ["decode_time_ratio", "perplexity_rise"]
    assert search_target(sp) == "onnxruntime"  # not the reference the ratios are taken against
    names = {p.name for p in sp.params}
    assert names == {"passes[1].enabled", "passes[1].blocks", "passes[2].group_size"}
    # A draft search's text is the original's: it weighs speed against the draft's size.
    drafts = load_space(space(tmp_path, head(lm_dir) + "[search]\ndraft = true\n" + DEPTH + INT4 + TARGETS))
    assert drafts.search.objectives == ["decode_time_ratio", "size_mb"]


DIGITS = ('name = "s"\nmodel = { source = "zoo:digits-cnn" }\ndata = { source = "builtin:digits" }\n@SEARCH@'
          '[[passes]]\nkind = "prune.channels"\nratio = [0.2, 0.5]\n[[targets]]\nkind = "onnxruntime"\n')


@pytest.mark.parametrize("objectives, on_lm, match", [
    ('["latency_ratio", "perplexity_rise"]', True, r"latency_ratio: not measured by a causal language model's run"),
    ('["decode_time_ratio", "accuracy_drop"]', True, r"accuracy_drop: not measured by a causal language model"),
    ('["latency_ratio", "perplexity_rise"]', False, r"perplexity_rise: not measured by this model's run \(it is not "
                                                    r"a causal language model\)"),
])
def test_an_objective_the_runs_do_not_measure_is_refused(lm_dir: Path, tmp_path: Path, objectives: str,
                                                         on_lm: bool, match: str) -> None:
    body = (head(lm_dir) + f"[search]\nobjectives = {objectives}\n" + DEPTH + INT4 + TARGETS if on_lm
            else DIGITS.replace("@SEARCH@", f"[search]\nobjectives = {objectives}\n"))
    with pytest.raises(RecipeError, match=match):
        load_space(space(tmp_path, body))


@pytest.mark.parametrize("passes, match", [
    (DEPTH.replace("[1, 2]", "[1, 4]") + INT4,
     r"point passes\[1\].enabled = True, passes\[1\].blocks = 4, .* prune.depth: removing 4 of the model's 4 "
     r"decoder blocks leaves none"),
    ('[[passes]]\nkind = "prune.width"\nintermediate_size = { choices = [64, 160] }\n' + INT4,
     r"intermediate_size = 160 does not shrink the MLP \(its width is 128\)"),
    (DEPTH + INT4.replace("[16, 32]", "[32, 128]"), r"group_size = 128 .*cannot run: .*128"),
])
def test_a_point_the_model_cannot_take_is_refused_before_any_trial(lm_dir: Path, tmp_path: Path, capsys,
                                                                   passes: str, match: str) -> None:
    path = space(tmp_path, head(lm_dir) + "[search]\ntrials = 2\n" + passes + TARGETS)
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=match):
        run_search(path, out, cache_dir=tmp_path / "cache")
    assert not (out / "search.db").exists() and not (out / "trials").exists()  # no trial started
    # The command line: one line, exit 2; a dry run checks the same.
    for extra in (["--out", str(out)], ["--dry-run"]):
        assert main(["search", str(path), *extra, "--cache", str(tmp_path / "cache"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot run" in err[0]


def test_a_draft_search_times_the_original_drafted_by_each_trial(lm_dir: Path, tmp_path: Path) -> None:
    body = (head(lm_dir) + '[search]\ntrials = 2\nsampler = "random"\ndraft = true\n'
            'objectives = ["decode_time_ratio", "size_mb"]\n'
            '[[passes]]\nkind = "prune.depth"\nblocks = { choices = [2, 3] }\nwindows = 2\n' + TARGETS
            + "draft_k = [2, 3]\n")
    out = tmp_path / "out"
    res = run_search(space(tmp_path, body), out, cache_dir=tmp_path / "cache")
    assert all(t["state"] == "COMPLETE" for t in res["trials"]), res["trials"]
    for t in res["trials"]:
        m = t["metrics"]
        # The figures are the original's, generating with the trial's model as its draft: the draft's acceptance
        # is measured and the output stays the original's; size and MACs are the draft's.
        assert 0 <= m["draft_acceptance"] <= 1 and m["tokens_per_verifier_pass"] >= 1
        assert m["greedy_agreement"] == 1.0
        assert "perplexity_rise" not in m
        assert m["macs_ratio"] == pytest.approx(1 - t["params"]["passes[1].blocks"] / 4)
        run_report = json.loads((out / "trials" / f"trial{t['number']}" / "report.json").read_text())
        base = next(c for c in run_report["results"] if c["variant"] == "baseline" and c["target"] == "onnxruntime")
        assert base["target_config"]["draft"] == f"trial{t['number']}"
        assert base["target_config"]["draft_k"] == t["params"]["targets[2].draft_k"]
    best = load_recipe(res["best_recipe"])
    ort = next(tc for tc in best.targets if tc.kind == "onnxruntime")
    assert ort.draft == best.name  # type: ignore[attr-defined]


@pytest.mark.parametrize("search, targets, match", [
    ('draft = true\nobjectives = ["decode_time_ratio", "perplexity_rise"]\n', TARGETS,
     "perplexity_rise with draft = true: speculative decoding keeps the original's output"),
    ("draft = true\n", '[[targets]]\nkind = "torch"\n', "none of the targets \\(torch\\) generates speculatively"),
    ("draft = true\n", TARGETS + 'draft = "other"\n', "target onnxruntime already names one"),
])
def test_bad_draft_searches_are_refused(lm_dir: Path, tmp_path: Path, search: str, targets: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        load_space(space(tmp_path, head(lm_dir) + "[search]\n" + search + DEPTH + targets))


def test_a_repeated_point_reuses_its_figures_and_the_original_is_a_point(lm_dir: Path, tmp_path: Path) -> None:
    # Three recipes (INT4 at group 16 or 32, or off, whatever group is drawn) and four trials: samplers draw a discrete
    # point again, or a point that differs only in a switched-off pass's setting (this seed: off/16, off/32, on/16,
    # off/32). Only onnxruntime, so the point with the pass off is the run's reference itself.
    body = (head(lm_dir) + '[search]\ntrials = 4\nsampler = "random"\nseed = 0\nretime_front = false\n'
            + INT4 + 'optional = true\n[[targets]]\nkind = "onnxruntime"\n')
    out = tmp_path / "out"
    res = run_search(space(tmp_path, body), out, cache_dir=tmp_path / "cache")
    trials = {t["number"]: t for t in res["trials"]}
    assert len(trials) == 4 and all(t["state"] == "COMPLETE" for t in trials.values())
    repeats = [t for t in trials.values() if t["repeat_of"] is not None]
    firsts = [t for t in trials.values() if t["repeat_of"] is None]
    assert len(firsts) == 2 and len(repeats) == 2  # both points measured once each
    for t in repeats:
        assert t["recipe"] == trials[t["repeat_of"]]["recipe"] and t["values"] == trials[t["repeat_of"]]["values"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(f"trial{t['number']}" for t in firsts)
    off = next(t for t in firsts if not t["params"]["passes[1].enabled"])
    assert off["metrics"]["decode_time_ratio"] == 1.0 and off["metrics"]["perplexity_rise"] == 0.0
    assert set(res["front"]) <= {t["number"] for t in firsts}  # a repeat never stands on the front twice
