"""Export that falls back by itself: a dynamic-batch export that fails where a fixed batch works is redone with a
fixed batch, said in one line and recorded in the facts, the metadata and the report; torch's own logs never
reach the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compress.passes.export_onnx import ExportOnnx
from torch import nn

from compress.api import module_artifact
from compress.cli import main
from compress.core.cache import Cache
from compress.core.manager import PassContext, PassManager
from compress.errors import ExportError


class BatchGuarded(nn.Module):
    """Branches in Python on the batch size (as ConvNeXtV2 and FocalNet do): torch.export cannot keep the batch
    dynamic, a fixed batch exports fine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        if x.shape[0] <= 2:  # a guard on the batch
            h = h * 2
        return self.fc(h)


def batch_guarded() -> nn.Module:
    torch.manual_seed(0)
    return BatchGuarded().eval()


def test_dynamic_batch_failure_falls_back_to_a_fixed_batch(tmp_path: Path) -> None:
    """The dynamic graph comes out silently wrong at batch 4 (the branch taken at batch 1 is baked in): parity at a
    larger batch catches it, and the fixed-batch export is used instead."""
    cache = Cache(tmp_path / "c")
    logged: list[str] = []
    art = module_artifact(batch_guarded(), (1, 1, 8, 8), cache)
    ctx = PassContext(cache=cache, seed=0, progress=False, original=art, log=logged.append)
    out, _ = PassManager([ExportOnnx()]).run(art, ctx)
    meta = out.metadata["export.onnx"]
    assert meta["dynamic_batch"] is False and out.known_facts().dynamic_batch is False
    assert "right at batch 1 but not at batch 4" in meta["static_batch_fallback"]
    assert any("fixed batch" in n for n in meta["notes"])
    line = [m for m in logged if "exported with a fixed batch" in m]
    assert len(line) == 1 and "\n" not in line[0]


def test_explicit_dynamic_batch_is_refused_with_the_setting_that_works(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    art = module_artifact(batch_guarded(), (1, 1, 8, 8), cache)
    ctx = PassContext(cache=cache, seed=0, progress=False, original=art)
    with pytest.raises(ExportError, match=r"dynamic-batch ONNX export is unusable: the exported graph is "
                                          r"right at batch 1 but not at batch 4 .*"
                                          r"export.onnx\{dynamic_batch=false\} exports it"):
        PassManager([ExportOnnx(dynamic_batch=True)]).run(art, ctx)


def test_cli_says_it_in_one_line_without_torch_logs(tmp_path: Path, capsys) -> None:
    r = tmp_path / "r.toml"
    r.write_text('name = "g"\nmodel = { source = "tests.test_export_fallback:batch_guarded", '
                 'input_shape = [1, 1, 8, 8] }\n'
                 'measure = { batch_sizes = [1], warmup = 0, min_runs = 3, min_time_s = 0.0 }\n'
                 '[[passes]]\nkind = "export.onnx"\n')
    code = main(["run", str(r), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert code == 0, text
    assert "Traceback" not in text
    assert sum("exported with a fixed batch" in ln for ln in text.splitlines()) >= 1
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert any("fixed batch" in n for n in rep["notes"])


@pytest.mark.slow
def test_torch_exporter_logs_stay_off_the_terminal(tmp_path: Path, capfd) -> None:
    """ConvNeXtV2's dynamic batch fails inside torch.export, which logs guard tracebacks at ERROR level through
    its own stderr handler: they go to the debug log, and the export falls back to a fixed batch."""
    transformers = pytest.importorskip("transformers")
    from compress.inputs.hf import from_config, input_specs

    cfg = transformers.ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    cache = Cache(tmp_path / "c")
    shape = (1, 3, 64, 64)
    art = module_artifact(from_config(cfg, "image-classification"), shape, cache,
                          inputs=input_specs(cfg, "image-classification", shape))
    out, _ = PassManager([ExportOnnx()]).run(art, PassContext(cache=cache, seed=0, progress=False, original=art))
    assert "Constraints violated (batch)" in out.metadata["export.onnx"]["static_batch_fallback"]
    cap = capfd.readouterr()
    assert "torch/_guards.py" not in cap.err + cap.out and "Traceback" not in cap.err + cap.out


_CHECKOUT_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))
'''


def test_the_same_code_in_two_checkouts_exports_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    """torch.onnx records each node's stack trace with absolute source paths; the export leaves those out, so
    the artifact (and its cache key downstream) does not depend on where the code is checked out."""
    import importlib
    import sys

    import onnx

    digests, paths = [], []
    for folder in ("checkout-a", "checkout-b"):
        src = tmp_path / folder
        src.mkdir()
        (src / "user_net.py").write_text(_CHECKOUT_MODULE)
        monkeypatch.syspath_prepend(str(src))
        sys.modules.pop("user_net", None)
        net = importlib.import_module("user_net").Net().eval()
        assert str(src) in sys.modules["user_net"].__file__
        torch.manual_seed(0)
        net.load_state_dict({k: torch.full_like(v, 0.01) for k, v in net.state_dict().items()})
        cache = Cache(tmp_path / f"cache-{folder}")
        art = module_artifact(net, (1, 3, 8, 8), cache)
        out, _ = PassManager([ExportOnnx()]).run(art, PassContext(cache=cache, seed=0, progress=False, original=art))
        digests.append(out.digest)
        paths.append((out.path / "model.onnx").read_bytes())
        model = onnx.load(str(out.path / "model.onnx"))
        assert not [p for n in model.graph.node for p in n.metadata_props if "stack_trace" in p.key]
        assert str(tmp_path) not in str(model.graph)
    sys.modules.pop("user_net", None)
    assert digests[0] == digests[1] and paths[0] == paths[1]
