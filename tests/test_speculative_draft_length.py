"""Speculative decoding with a dynamic draft length: the draft stops proposing once its own top-token probability
falls below ``threshold`` (``draft_threshold`` on the onnxruntime target); the output stays the verifier's greedy
output, and a threshold outside (0, 1) or without a draft is refused in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from compress.errors import InputError, RecipeError
from compress.stages.recipe import recipe_from_dict
from tests.llm_models import tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny random Llama and a draft that partly agrees with it: the same weights with noise added. The final
    norm is scaled up so the top-token probabilities spread over (0.2, 1) instead of all near 1/vocab."""
    import transformers as tf

    folder = tiny_llama(tmp_path_factory.mktemp("lm") / "tiny", layers=3)
    verifier = tf.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        verifier.model.norm.weight.mul_(12)
    draft = copy.deepcopy(verifier)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    return verifier, draft


def _prompts(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 500, (1, 8)) for _ in range(n)]


def _spec(models: tuple[torch.nn.Module, torch.nn.Module], k: int, threshold: float | None, same: bool = False):
    from compress.measuring.generation import TorchLMRunner
    from compress.measuring.speculative import SpeculativeRunner

    v, d = models
    return SpeculativeRunner(TorchLMRunner(v, 1), TorchLMRunner(v if same else d, 1), k=k, threshold=threshold)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_a_confidence_threshold_keeps_the_verifiers_greedy_output(models, threshold: float) -> None:
    from compress.measuring.generation import TorchLMRunner

    plain = TorchLMRunner(models[0], 1)
    spec = _spec(models, 5, threshold)
    for p in _prompts(4):
        assert np.array_equal(spec.generate(p, 20).tokens, plain.generate(p, 20).tokens)
    st = spec.stats
    assert 0 < st.accepted < st.proposed and st.verifier_calls > 0  # some proposals rejected, some accepted


def test_the_threshold_shortens_the_draft_only_where_it_is_unsure(models) -> None:
    # The draft is the verifier itself: every proposal is accepted, so passes count how far the draft went.
    full = _spec(models, 4, None, same=True)
    full.generate(_prompts(4)[3], 21)
    assert full.stats.proposed == 4 * full.stats.verifier_calls == 16  # 20 tokens after the first, 5 per pass
    # On this prompt the model is never as sure as 0.99 of its top token: one proposal per pass.
    unsure = _spec(models, 4, 0.99, same=True)
    unsure.generate(_prompts(4)[3], 21)
    assert unsure.stats.proposed == unsure.stats.verifier_calls == 10 and unsure.stats.acceptance == 1.0
    # A threshold between its confidences: some passes stop early, others run to k.
    mid = _spec(models, 4, 0.6, same=True)
    mid.generate(_prompts(4)[3], 21)
    assert 1 < mid.stats.proposed / mid.stats.verifier_calls < 4


@pytest.mark.parametrize("bad", [1.0, -0.2, 1.5])
def test_a_threshold_outside_zero_one_is_refused(models, bad: float) -> None:
    with pytest.raises(InputError, match=r"draft threshold = .* a number in \[0, 1\) \(0: always k tokens\)"):
        _spec(models, 3, bad)


def test_threshold_zero_always_drafts_k(models) -> None:
    zero = _spec(models, 4, 0.0, same=True)
    zero.generate(_prompts(4)[3], 21)
    assert zero.stats.proposed == 4 * zero.stats.verifier_calls == 16


def _recipe(target: dict) -> None:
    recipe_from_dict({"name": "lm", "model": {"source": "hf:/nowhere", "task": "causal-lm"},
                      "targets": [target]}, "r.toml")


def test_draft_threshold_is_checked_at_the_recipe_boundary() -> None:
    with pytest.raises(RecipeError, match=r"draft_threshold applies to speculative decoding: also name the drafting"):
        _recipe({"kind": "onnxruntime", "draft_threshold": 0.5})
    with pytest.raises(RecipeError, match=r"key 'draft_threshold': Input should be less than 1"):
        _recipe({"kind": "onnxruntime", "draft": "small", "draft_threshold": 1.5})
    _recipe({"kind": "onnxruntime", "draft": "small", "draft_k": 6, "draft_threshold": 0.4})


def test_the_threshold_defaults_to_the_measured_value_and_leaves_plain_builds_keyed_as_before() -> None:
    from compress.targets.onnx_runtime import OnnxRuntimeConfig

    cfg = OnnxRuntimeConfig(draft="small", draft_k=6)
    assert cfg.speculative_draft() == ("small", 6, 0.3) and cfg.draft_threshold == 0.3
    assert cfg.canonical()["draft_threshold"] == 0.3
    # Without a draft the setting does nothing, so it is not part of the build's cache key.
    assert "draft_threshold" not in OnnxRuntimeConfig().canonical()
