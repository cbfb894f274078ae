"""ONNX Runtime as the reference runtime of the core: sessions (with graph optimizations off they run
the reference kernels, which for a Q/DQ model is its simulation) and batches of inputs from a data
split. Used by parity checks and by the quantization passes alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PassError


def ort_session(path: Path | str, optimize: bool = True, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise PassError(f"onnxruntime could not load {path}: {str(e).splitlines()[0][:300]}") from e


def split_inputs(data: Any, split_name: str, max_samples: int | None, batch: int) -> tuple[list[np.ndarray], Any]:
    split = getattr(data, split_name)
    n = len(split) if max_samples is None else min(len(split), max_samples)
    xs = [data.adapt(split.x[i:min(n, i + batch)]).numpy() for i in range(0, n, batch)]
    y = None if split.y is None else split.y[:n]
    return xs, y


def session_infer(sess: Any) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    return lambda feeds: sess.run(None, feeds)
