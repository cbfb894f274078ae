"""Pruning refusals a user can act on: the width in the message is the layer's real width, the suggested keep was
checked to go through (the tests take it), a refusal names a module, long pruning says what it is doing, and a
dependency search that does not end is cut off naming its block."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from compress.passes.prune_channels import ChannelPrune
from torch import nn

from compress.api import module_artifact
from compress.core.artifact import Artifact
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager
from compress.errors import PassError

pytest.importorskip("torch_pruning")


class GroupNormNet(nn.Module):
    """BiT's shape: a conv whose GroupNorm has one channel per group (torch-pruning thins every group evenly,
    so no channel of it can go), then convs with wider groups that can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, 8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn1(self.stem(x)))
        h = torch.relu(self.gn2(self.conv(h)))
        return self.head(h.mean(dim=(2, 3)))


def _run(art: Artifact, cfg: ChannelPrune, cache: Cache, log: list[str] | None = None) -> Artifact:
    ctx = PassContext(cache=cache, progress=False, original=art, log=(log.append if log is not None else print))
    return PassManager([cfg]).run(art, ctx)[0]


def _keep(msg: str) -> list[str]:
    m = re.search(r"skip = (\[[^\]]*\]) \(checked: pruning goes through with it\)", msg)
    assert m is not None, msg
    return list(ast.literal_eval(m.group(1)))


def test_groupnorm_width_is_real_and_the_checked_keep_goes_through(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cache = Cache(tmp_path / "c")
    art = module_artifact(GroupNormNet().eval(), (1, 3, 16, 16), cache)
    log: list[str] = []
    with pytest.raises(PassError) as e:
        _run(art, ChannelPrune(ratio=0.5), cache, log)
    msg = str(e.value)
    assert "\n" not in msg
    assert "every channel of 'stem' (8 channels, coupled in 8 groups of 1" in msg
    keep = _keep(msg)
    assert keep == ["stem"]
    assert any("dependency graph of" in ln and "built" in ln for ln in log)  # progress while it works
    assert any("checking that skip = ['stem'] goes through" in ln for ln in log)
    out = _run(art, ChannelPrune(ratio=0.5, skip=keep), cache)  # the action the message names works
    widths = out.metadata["prune.channels"]["widths_after"]
    assert widths["stem"] == [3, 8] and widths["conv"][1] < 16


@pytest.mark.slow
def test_levit_step_failure_names_its_attention_layers_with_a_keep_that_works(tmp_path: Path) -> None:
    """LeViT's fused queries_keys_values layer fails inside torch-pruning (an IndexError with no module named
    before): the refusal names the layers of the failing group, and the checked keep goes through."""
    transformers = pytest.importorskip("transformers")
    from compress.inputs.hf import from_config, input_specs

    cfg = transformers.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
                                   depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10)
    shape = (1, 3, 64, 64)
    cache = Cache(tmp_path / "c")
    art = module_artifact(from_config(cfg, "image-classification"), shape, cache,
                          inputs=input_specs(cfg, "image-classification", shape))
    with pytest.raises(PassError) as e:
        _run(art, ChannelPrune(ratio=0.5), cache, [])
    msg = str(e.value)
    assert "IndexError" in msg and "queries_keys_values" in msg
    out = _run(art, ChannelPrune(ratio=0.5, skip=_keep(msg)), cache, [])
    assert out.metadata["prune.channels"]["macs_ratio"] < 1.0


@pytest.mark.slow
def test_focalnet_search_explosion_is_cut_off_naming_the_block(tmp_path: Path) -> None:
    """FocalNet's modulation made torch-pruning's dependency search run for 11+ minutes: now it stops at a bound,
    names the block, and the checked keep (the modulation blocks) goes through."""
    transformers = pytest.importorskip("transformers")
    from compress.inputs.hf import from_config, input_specs

    cfg = transformers.FocalNetConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_labels=10)
    shape = (1, 3, 64, 64)
    cache = Cache(tmp_path / "c")
    art = module_artifact(from_config(cfg, "image-classification"), shape, cache,
                          inputs=input_specs(cfg, "image-classification", shape))
    with pytest.raises(PassError) as e:
        _run(art, ChannelPrune(ratio=0.5), cache, [])
    msg = str(e.value)
    assert "does not end" in msg and ".modulation.projection_context'" in msg
    keep = _keep(msg)
    assert all(k.endswith(".modulation") for k in keep)
    out = _run(art, ChannelPrune(ratio=0.5, skip=keep), cache, [])
    assert out.metadata["prune.channels"]["macs_ratio"] < 1.0


@pytest.mark.slow
def test_cvt_graph_failure_names_a_module_and_says_no_keep_helps(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from compress.inputs.hf import from_config, input_specs

    cfg = transformers.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=10)
    shape = (1, 3, 64, 64)
    cache = Cache(tmp_path / "c")
    art = module_artifact(from_config(cfg, "image-classification"), shape, cache,
                          inputs=input_specs(cfg, "image-classification", shape))
    with pytest.raises(PassError, match=r"could not build its dependency graph of VisionModel at 'model\.cvt\..*"
                                        r"no skip avoids this"):
        _run(art, ChannelPrune(ratio=0.5), cache, [])
