"""OpenVINO's generate loop for an ONNX decoder with its KV cache (the same graph ONNX Runtime runs).

The build kept the decoder's ONNX files; the runner reads them with OpenVINO's ONNX frontend and compiles them for
the CPU plugin with the target's properties (``INFERENCE_NUM_THREADS`` among them). The cache is handed from one
step to the next without copies: two infer requests alternate, each step's ``present`` output tensors are set
as the other request's ``past`` inputs (``set_tensor`` shares the memory). The outputs are dynamic (the cache
grows by one position a step), so the plugin allocates them per step: that is what the API forces; nothing
is copied through numpy.

OpenVINO's ``GroupQueryAttention`` (which the ONNX frontend maps the exporter's fused attention to) runs
batch 1 only (OpenVINO 2026.4: "GroupQueryAttention is only supported for batch_size == 1"; with a dynamic
batch it returns empty outputs instead of failing), so a batch > 1 is refused in one line before it runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import TargetUnavailable
from compress.measuring.generation import DecoderIO, Generated

BATCH_ONE_ONLY = ("OpenVINO's GroupQueryAttention (the decoder's fused attention) runs batch 1 only "
                  "(it returns empty outputs at batch > 1)")


class OvLMRunner:
    """An ONNX decoder with its KV cache compiled by OpenVINO; see the module docstring for the cache."""

    def __init__(self, compiled: Any, io: DecoderIO, name: str = "openvino") -> None:
        import openvino as ov

        self.name, self.io, self.compiled, self._ov = name, io, compiled, ov
        self.reqs = [compiled.create_infer_request(), compiled.create_infer_request()]
        ins = {i.get_any_name(): i for i in compiled.inputs}
        self.has_positions = "position_ids" in ins
        kv = ins[io.past_key % 0].get_element_type()
        self.kv_dtype = np.float16 if kv == ov.Type.f16 else np.float32
        # present name -> past name, for every layer's key and value.
        self.presents = {(io.present_key if k else io.present_value) % i: (io.past_key if k else io.past_value) % i
                         for i in range(io.layers) for k in (True, False)}

    @classmethod
    def load(cls, folder: Path, core: Any, device: str, props: dict[str, Any], name: str = "openvino") -> OvLMRunner:
        io = DecoderIO.load(folder)
        return cls(core.compile_model(core.read_model(str(folder / "model.onnx")), device, props), io, name)

    def empty_past(self, b: int) -> dict[str, Any]:
        z = self._ov.Tensor(np.zeros((b, self.io.kv_heads, 0, self.io.head_dim), self.kv_dtype))
        return {past: z for past in self.presents.values()}

    def step(self, req: Any, ids: np.ndarray, total: int, past: dict[str, Any]) -> np.ndarray:
        """One forward of ``ids`` (batch, s) after ``past`` (``total`` = cached + s positions): the logits as a
        view of the request's output (valid until it runs again)."""
        b, s = ids.shape
        if b != 1:
            raise TargetUnavailable(f"target 'openvino': a batch of {b}: {BATCH_ONE_ONLY}; time batch > 1 on "
                                    "onnxruntime or torch")
        t = self._ov.Tensor
        req.set_tensor("input_ids", t(np.ascontiguousarray(ids, np.int64)))
        req.set_tensor("attention_mask", t(np.ones((b, total), np.int64)))
        if self.has_positions:
            req.set_tensor("position_ids", t(np.arange(total - s, total, dtype=np.int64)[None].repeat(b, 0)))
        for name, value in past.items():
            req.set_tensor(name, value)
        req.infer()
        logits: np.ndarray = req.get_tensor("logits").data
        return logits

    def cache_of(self, req: Any) -> dict[str, Any]:
        """The request's present tensors, keyed as the next step's past inputs (shared, not copied)."""
        return {past: req.get_tensor(present) for present, past in self.presents.items()}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        out = self.step(self.reqs[0], ids[None], len(ids), self.empty_past(1))
        return np.array(out[0], dtype=np.float32)

    def generate(self, prompt: np.ndarray, new: int) -> Generated:
        b, p = prompt.shape
        t0 = time.perf_counter()
        req = self.reqs[0]
        nxt = self.step(req, prompt, p, self.empty_past(b))[:, -1].argmax(-1)
        toks = [nxt]
        t1 = time.perf_counter()
        for i in range(1, new):
            past = self.cache_of(req)
            req = self.reqs[i % 2]  # the other request: the cache it reads stays in the one that made it
            nxt = self.step(req, nxt[:, None], p + i, past)[:, -1].argmax(-1)
            toks.append(nxt)
        t2 = time.perf_counter()
        return Generated(np.stack(toks, 1), t1 - t0, t2 - t1)

    def stepper(self) -> OvStepper:
        return OvStepper(self)

    def close(self) -> None:
        self.reqs = []
        self.compiled = None


class OvStepper:
    """Speculative decoding's ``Stepper`` over an OpenVINO decoder (``compress.measuring.speculative``): the cache
    is the last request's present tensors, cut back by slicing the past axis (axis 2) into new tensors."""

    def __init__(self, runner: OvLMRunner) -> None:
        self.r = runner
        self.past: dict[str, Any] = {}
        self.length = 0
        self.turn = 0

    def _run(self, toks: np.ndarray) -> np.ndarray:
        ids = np.asarray(toks, np.int64)[None]
        req = self.r.reqs[self.turn]
        self.turn ^= 1
        logits = np.array(self.r.step(req, ids, self.length + ids.shape[1], self.past)[0], dtype=np.float32)
        self.past = self.r.cache_of(req)
        self.length += ids.shape[1]
        return logits

    def reset(self, prompt: np.ndarray) -> np.ndarray:
        self.past, self.length = self.r.empty_past(1), 0
        return self._run(prompt)

    def feed(self, toks: np.ndarray) -> np.ndarray:
        return self._run(toks)

    def crop(self, length: int) -> None:
        if length < self.length:
            t = self.r._ov.Tensor
            self.past = {k: t(np.ascontiguousarray(v.data[:, :, :length])) for k, v in self.past.items()}
            self.length = length
