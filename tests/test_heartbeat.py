"""Long work says it is alive when stderr is not a terminal (a CI log has no progress bar)."""

from __future__ import annotations

from compress.inputs.data import load_data
from compress.inputs.training import fit
from compress.inputs.zoo import build
from compress.stages.recipe import DataSpec


def test_training_without_a_progress_bar_prints_a_heartbeat_per_epoch() -> None:
    data = load_data(DataSpec(source="builtin:digits"), (1, 1, 8, 8))
    assert data is not None
    lines: list[str] = []
    fit(build("digits-cnn"), data, 2, progress=False, heartbeat=lines.append, every_s=0.0)
    assert [ln.split(",")[0] for ln in lines] == ["train: epoch 1/2", "train: epoch 2/2"]
    assert "val top-1" in lines[-1]
    quiet: list[str] = []  # throttled: only the last epoch when epochs are quicker than every_s
    fit(build("digits-cnn"), data, 2, progress=False, heartbeat=quiet.append, every_s=3600.0)
    assert len(quiet) == 1 and quiet[0].startswith("train: epoch 2/2")
    bar: list[str] = []  # a progress bar on a terminal says it already
    fit(build("digits-cnn"), data, 1, progress=True, heartbeat=bar.append, every_s=0.0)
    assert bar == []
