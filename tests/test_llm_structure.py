"""Decoder language models made smaller by structure: whole blocks removed (prune.depth), MLP width and key/value
groups shrunk (prune.width), distilled from the original on text (distill.lm), and a compressed draft that speeds
up the original by speculative decoding without changing its greedy output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from compress.core.artifact import Artifact
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager
from compress.core.registry import get_pass
from compress.errors import InputError, PassError, RecipeError
from compress.inputs.causal_lm import BUILTIN_TEXT, lm_text
from compress.inputs.models import load_model
from compress.inputs.torch_io import load_torch
from compress.stages.pipeline import run
from compress.stages.recipe import ModelSpec, recipe_from_dict
from tests.llm_models import tiny_llama

MEASURE = {"lm_prompt": 16, "lm_new_tokens": 6, "lm_rounds": 2, "lm_window": 48, "lm_eval_tokens": 96,
           "lm_calib_tokens": 288, "threads": 1}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("lm") / "tiny4", layers=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def ctx(lm_dir: Path, cache_dir: Path) -> PassContext:
    cache = Cache(cache_dir)
    root = load_model(ModelSpec(source=f"hf:{lm_dir}", task="causal-lm"), cache)
    text = lm_text(lm_dir, BUILTIN_TEXT, 48, 96, 288)
    return PassContext(cache=cache, seed=0, progress=False, original=root, text=text)


def _run(ctx: PassContext, *steps: dict[str, Any]) -> tuple[Artifact, list[Any], list[str]]:
    logs: list[str] = []
    ctx.log = logs.append
    cfgs = [get_pass(s["kind"]).config_cls(**s) for s in steps]
    assert ctx.original is not None
    out, records = PassManager(cfgs).run(ctx.original, ctx)
    return out, records, logs


def _logits(module: torch.nn.Module, ids: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(ids[None].astype(np.int64))
    with torch.no_grad():
        return module(t, torch.ones_like(t))


def _rebuilt(art: Artifact) -> torch.nn.Module:
    """The artifact as a fresh process gets it from the cache: rebuilt from source and structure steps."""
    return load_torch(Artifact.load(art.path))


def _recipe(lm_dir: Path, passes: list[dict[str, Any]], **measure: object) -> Any:
    return recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                             "data": {"source": "builtin:pydoc-topics"}, "measure": {**MEASURE, **measure},
                             "passes": passes, "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]})


# ----------------------------------------------------------------------------------------- depth


def test_depth_pruning_removes_the_least_influential_blocks_and_rebuilds_from_the_cache(ctx: PassContext) -> None:
    out, records, logs = _run(ctx, {"kind": "prune.depth", "blocks": 2})
    info = records[0].info
    scores = info["scores"]
    assert len(scores) == 4 and info["blocks_after"] == 2
    # The two lowest Block Influence scores are the blocks removed.
    assert info["removed"] == sorted(np.argsort(scores)[:2].tolist())
    assert info["block_macs_reduction"] == pytest.approx(0.5)
    assert any("block influence" in n and "0:" in n for n in info["notes"])
    model = load_torch(out)
    hf = model.model
    assert hf.config.num_hidden_layers == 2 and len(hf.model.layers) == 2
    assert [lay.self_attn.layer_idx for lay in hf.model.layers] == [0, 1]  # KV cache slots renumbered
    # The kept blocks are the original ones, in order.
    orig = load_torch(ctx.original).model.model.layers
    kept = [i for i in range(4) if i not in info["removed"]]
    for new, old in zip(hf.model.layers, kept, strict=True):
        assert torch.equal(new.mlp.down_proj.weight, orig[old].mlp.down_proj.weight)
    ids = ctx.text.calib[0]
    assert torch.allclose(_logits(_rebuilt(out), ids), _logits(model, ids))
    assert any("removed blocks" in line for line in logs)


def test_depth_by_leave_one_out_perplexity(ctx: PassContext) -> None:
    _, records, _ = _run(ctx, {"kind": "prune.depth", "ratio": 0.25, "importance": "perplexity", "windows": 2})
    info = records[0].info
    # The block whose absence hurts calibration perplexity least is the one removed.
    assert info["removed"] == [int(np.argmin(info["scores"]))]


def test_removing_every_block_is_refused_before_any_work(lm_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(RecipeError, match=r"removing 4 of the model's 4 decoder blocks leaves none; remove at most 3"):
        run(_recipe(lm_dir, [{"kind": "prune.depth", "blocks": 4}]), out_dir=tmp_path / "o", cache_dir=cache_dir,
            progress=False, log=said.append)
    assert not any("export.onnx" in s or "running" in s for s in said)
    assert RecipeError.exit_code == 2


# ----------------------------------------------------------------------------------------- width


def test_width_pruning_keeps_the_most_active_mlp_channels_and_whole_kv_groups(ctx: PassContext) -> None:
    out, records, _ = _run(ctx, {"kind": "prune.width", "intermediate_size": 64, "kv_heads": 1})
    info = records[0].info
    hf = load_torch(out).model
    cfg = hf.config
    assert cfg.intermediate_size == 64 and cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2
    assert cfg.head_dim == 16  # written down: it no longer follows from hidden_size / heads
    lay = hf.model.layers[0]
    assert lay.mlp.gate_proj.out_features == 64 and lay.mlp.down_proj.in_features == 64
    assert lay.self_attn.k_proj.out_features == 16 and lay.self_attn.q_proj.out_features == 32
    assert lay.self_attn.o_proj.in_features == 32
    # The kept key/value group is the one with the larger score, its query heads with it.
    g = int(np.argmax(info["kv_heads"]["group_scores"][0]))
    orig = load_torch(ctx.original).model.model.layers[0].self_attn
    assert torch.equal(lay.self_attn.k_proj.weight, orig.k_proj.weight[g * 16:(g + 1) * 16])
    assert torch.equal(lay.self_attn.q_proj.weight, orig.q_proj.weight[g * 32:(g + 1) * 32])
    ids = ctx.text.calib[0]
    assert torch.allclose(_logits(_rebuilt(out), ids), _logits(load_torch(out), ids))
    assert 0.4 < info["block_macs_reduction"] < 0.6


def test_width_that_does_not_fit_is_one_line(lm_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"intermediate_size = 100 is not a multiple of 32"):
        run(_recipe(lm_dir, [{"kind": "prune.width", "intermediate_size": 100}]), out_dir=tmp_path / "o",
            cache_dir=cache_dir, progress=False)
    with pytest.raises(RecipeError, match=r"kv_heads = 2 does not shrink attention"):
        run(_recipe(lm_dir, [{"kind": "prune.width", "kv_heads": 2}]), out_dir=tmp_path / "o", cache_dir=cache_dir,
            progress=False)


# ----------------------------------------------------------------------------------------- distillation


def test_distillation_brings_the_pruned_model_closer_to_the_original(ctx: PassContext) -> None:
    _, records, logs = _run(ctx, {"kind": "prune.depth", "blocks": 1},
                            {"kind": "distill.lm", "tokens": 960, "batch": 2, "lr": 1e-3, "log_every": 5})
    info = records[1].info
    assert info["tokens"] == 960 and info["steps"] == 10
    assert info["kl_after"] < info["kl_before"]
    progress = [s for s in logs if "tokens/s" in s and "loss" in s]
    assert len(progress) == 2 and "960/960 tokens" in progress[-1]


def test_distillation_resumes_to_the_same_weights(ctx: PassContext, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.passes.distill_lm as dl

    cfg = dl.DistillLM(tokens=960, batch=2, lr=1e-3, checkpoint_every=4)
    fresh = Cache(ctx.cache.root.parent / "resume-a")
    ctx_a = PassContext(cache=fresh, seed=0, progress=False, original=ctx.original, text=ctx.text)
    whole = dl.distill_lm(ctx.original, cfg, ctx_a).obj

    class Killed(Exception):
        pass

    def kill(s: int, _info: dict[str, Any]) -> None:
        if s == 8:
            raise Killed

    ctx_b = PassContext(cache=Cache(ctx.cache.root.parent / "resume-b"), seed=0, progress=False,
                        original=ctx.original, text=ctx.text)
    monkeypatch.setattr(dl, "_step_hook", kill)
    with pytest.raises(Killed):
        dl.distill_lm(ctx.original, cfg, ctx_b)
    monkeypatch.setattr(dl, "_step_hook", lambda s, i: None)
    logs: list[str] = []
    ctx_b.log = logs.append
    again = dl.distill_lm(ctx.original, cfg, ctx_b)
    assert again.metadata["distill.lm"]["resumed_from_step"] == 8
    assert any("resuming at step 8" in s for s in logs)
    for (k, a), b in zip(whole.state_dict().items(), again.obj.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_a_token_budget_smaller_than_one_batch_is_refused_before_any_work(lm_dir: Path, cache_dir: Path,
                                                                           tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(RecipeError, match=r"tokens = 50 is smaller than one batch \(4 window\(s\) of 48 tokens"):
        run(_recipe(lm_dir, [{"kind": "distill.lm", "tokens": 50}]), out_dir=tmp_path / "o", cache_dir=cache_dir,
            progress=False, log=said.append)
    assert not any("running" in s for s in said)


def test_pass_errors_name_the_setting_when_the_input_differs_from_the_root(ctx: PassContext) -> None:
    # After one block is gone, removing three more leaves none: the pass itself refuses its actual input.
    with pytest.raises(PassError, match="removing 3 of the model's 3 decoder blocks leaves none"):
        _run(ctx, {"kind": "prune.depth", "blocks": 1}, {"kind": "prune.depth", "blocks": 3})


# ----------------------------------------------------------------------------------------- speculative


def _greedy_prompts(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, (1, 8)) for _ in range(n)]


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_decoding_gives_the_verifiers_greedy_output(ctx: PassContext, k: int) -> None:
    from compress.measuring.generation import TorchLMRunner
    from compress.measuring.speculative import SpeculativeRunner

    out, _, _ = _run(ctx, {"kind": "prune.depth", "blocks": 2})
    verifier = TorchLMRunner(load_torch(ctx.original), threads=1)
    spec = SpeculativeRunner(TorchLMRunner(load_torch(ctx.original), 1), TorchLMRunner(load_torch(out), 1), k=k)
    for p in _greedy_prompts(4):
        assert np.array_equal(spec.generate(p, 17).tokens, verifier.generate(p, 17).tokens)
    st = spec.stats
    assert st.proposed > 0 and 0 <= st.accepted <= st.proposed and st.verifier_calls > 0
    # Every round emits its accepted proposals and one token of the verifier's (the last round may overshoot).
    assert st.verifier_calls + st.accepted >= 4 * 16 and st.verifier_calls <= 4 * 16


def test_a_draft_identical_to_the_verifier_is_always_accepted(ctx: PassContext) -> None:
    from compress.measuring.generation import TorchLMRunner
    from compress.measuring.speculative import SpeculativeRunner

    m = load_torch(ctx.original)
    spec = SpeculativeRunner(TorchLMRunner(m, 1), TorchLMRunner(m, 1), k=4)
    spec.generate(_greedy_prompts(1)[0], 21)
    assert spec.stats.acceptance == 1.0 and spec.stats.verifier_calls == 4  # 20 tokens after the first, 5 per pass


def test_a_draft_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    from compress.core.capabilities import DecoderFacts, Facts
    from compress.measuring.speculative import from_artifacts

    def decoder(name: str, digest: str) -> Artifact:
        facts = Facts(decoder=DecoderFacts(layers=2, kv_heads=2, head_dim=16, vocab=512, tokenizer_digest=digest))
        return Artifact("onnx", tmp_path / name, name * 8, (), facts=facts)

    with pytest.raises(InputError, match=r"the draft '.*small' has another tokenizer than the verifier '.*big'"):
        from_artifacts(decoder("big", "a" * 64), decoder("small", "b" * 64))
    with pytest.raises(InputError, match=r"records no tokenizer digest"):
        from_artifacts(decoder("big", "a" * 64), decoder("small", ""))


@pytest.mark.slow
def test_pruned_decoders_export_and_onnx_speculative_decoding_matches(lm_dir: Path, cache_dir: Path,
                                                                      tmp_path: Path) -> None:
    from compress.measuring.generation import OrtLMRunner
    from compress.measuring.speculative import from_artifacts
    from compress.stages.execute import execute
    from compress.stages.plan import make_plan

    rec = recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": MEASURE,
                            "targets": [{"kind": "torch"}, {"kind": "onnxruntime"}]})
    variants = {"depth": [get_pass("prune.depth").config_cls(blocks=2)],
                "width": [get_pass("prune.width").config_cls(intermediate_size=64, kv_heads=1)]}
    rep = run(rec, out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False, variants=variants)
    cells = {(r.variant, r.target): r for r in rep.results}
    for v in ("depth", "width"):
        a, b = cells[(v, "torch")].generation, cells[(v, "onnxruntime")].generation
        # The same pruned model on two runtimes scores the same held-out text alike. (Greedy tokens are not
        # compared: a random tiny model's top logits tie to 1e-7, so one runtime's rounding can flip a token.)
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4) and b.kl == pytest.approx(a.kl, rel=1e-3)
        assert b.top1_agreement == a.top1_agreement
    assert any("depth: prune.depth: removed blocks" in n for n in rep.notes)
    # Cached: a second run rebuilds the pruned PyTorch models from their structure steps.
    again = run(rec, out_dir=tmp_path / "o2", cache_dir=cache_dir, progress=False, variants=variants)
    assert {(r.variant, r.target): r.generation.perplexity for r in again.results} == \
        {k: r.generation.perplexity for k, r in cells.items()}
    big = OrtLMRunner(Path(cells[("baseline", "onnxruntime")].compiled_path), 1)
    onnx_of = {v.name: v.onnx_art for v in execute(make_plan(rec, tmp_path / "o3", cache_dir, False, None, variants,
                                                              write=False))}
    spec = from_artifacts(onnx_of["baseline"], onnx_of["depth"], k=3)
    for p in _greedy_prompts(3):
        assert np.array_equal(spec.generate(p, 15).tokens, big.generate(p, 15).tokens)
    assert spec.stats.verifier_calls > 0
    # As a target setting: every other variant on onnxruntime generates with the depth-pruned draft.
    spec_rec = recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                                 "data": {"source": "builtin:pydoc-topics"}, "measure": MEASURE,
                                 "targets": [{"kind": "torch"},
                                             {"kind": "onnxruntime", "draft": "depth", "draft_k": 3}]})
    rep3 = run(spec_rec, out_dir=tmp_path / "o4", cache_dir=cache_dir, progress=False, variants=variants)
    c3 = {(r.variant, r.target): r for r in rep3.results}
    base = c3[("baseline", "onnxruntime")]
    assert base.generation.greedy_agreement == 1.0 and 0 <= base.generation.draft_acceptance <= 1
    assert base.generation.tokens_per_verifier_pass >= 1
    assert any("speculative decoding" in n and "probability is below 0.3" in n for n in base.notes)  # the default
    assert c3[("depth", "onnxruntime")].generation.draft_acceptance is None  # the draft itself runs plain


def test_a_draft_that_names_no_variant_is_refused_before_any_work(lm_dir: Path, cache_dir: Path,
                                                                   tmp_path: Path) -> None:
    rec = recipe_from_dict({"name": "lm", "model": {"source": f"hf:{lm_dir}", "task": "causal-lm"},
                            "data": {"source": "builtin:pydoc-topics"}, "measure": MEASURE,
                            "passes": [{"kind": "prune.depth", "blocks": 2}],
                            "targets": [{"kind": "onnxruntime", "draft": "smal"}]})
    said: list[str] = []
    with pytest.raises(RecipeError, match=r"draft = 'smal' names no variant of this run \(variants: lm\)"):
        run(rec, out_dir=tmp_path / "o", cache_dir=cache_dir, progress=False, log=said.append)
    assert not any("running" in s for s in said)
