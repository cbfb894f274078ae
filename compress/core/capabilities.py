"""What passes and targets declare about themselves, and what artifacts carry: the core asks these
questions and never compares a pass kind or target name.

* ``PassCaps``: what a pass consumes and produces, whether it lowers a PyTorch model to ONNX (the
  pipeline inserts such a pass where a chain needs ONNX), the precision ``compress compare`` offers
  it under, and which of its settings name files relative to the recipe.
* ``TargetCaps``: what a target consumes, which precisions and operators it runs, whether its
  outputs are the reference others are compared with, whether it runs any batch size, whether it
  is measured by default, whether its runner times on the device.
* ``Facts``: the typed record every artifact carries of what its consumers must honour (precision,
  how it was quantized, sparsity, required operators, dynamic batch, the parity tolerance its
  producer guarantees). Passes write them; targets check them (``refusal``) before building.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
# Lowest first: an artifact "computes in" the lowest precision any of its parts use.
_ORDER = {p: i for i, p in enumerate(reversed(PRECISIONS))}


class DecoderFacts(BaseModel):
    """An ONNX decoder that carries its KV cache between calls (a causal LM lowered for generation).

    Written by the lowering of a causal LM, kept by weight compression, read by every consumer: a
    target that cannot generate refuses it, the generation runner reads the cache layout from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    # The cache's layout: (batch, kv_heads, past_sequence, head_dim); the past length is axis 2.
    cache_layout: Literal["bhsd"] = "bhsd"
    past_axis: int = 2
    # SHA-256 of the tokenizer's vocabulary (compress.inputs.causal_lm.tokenizer_digest): two models that
    # share it can draft for each other and be compared token by token.
    tokenizer_digest: str = ""
    exporter: str = ""


class Facts(BaseModel):
    """What every consumer of an artifact must honour. Frozen: a pass derives new facts with ``evolve``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The lowest precision the model computes in.
    precision: Precision = "fp32"
    # How integer precision was reached: Q/DQ pairs whose reference kernels simulate the deployed
    # integer model ("qdq"), integer ops quantizing activations at run time ("dynamic"), or integer
    # weights dequantized on the fly ("weight_only").
    quantization: Literal["qdq", "dynamic", "weight_only"] | None = None
    # Zeros a target may exploit: "2:4" (semi-structured, sparse tensor cores) or "unstructured".
    sparsity: Literal["2:4", "unstructured"] | None = None
    # Operators outside the standard ONNX domain the model needs, as "domain:op".
    required_ops: tuple[str, ...] = ()
    # Whether the batch dimension may change between calls (None: not known, e.g. a PyTorch module,
    # which takes any batch).
    dynamic_batch: bool | None = None
    # An absolute-difference bound the model's producer guarantees for its lowering (a fake-quantized
    # model may round a tie the other way after export: one quantization step). None: the default.
    lowering_atol: float | None = None
    # The CPU architecture a compiled artifact runs on ("x86_64", "aarch64"); None: not tied to one
    # (an ONNX or PyTorch model, or a build any machine of the kind can load).
    arch: str | None = None
    # A decoder language model lowered with its KV cache (None: any other model).
    decoder: DecoderFacts | None = None

    def evolve(self, **changes: Any) -> Facts:
        """These facts with ``changes`` applied (validated)."""
        return Facts.model_validate({**self.model_dump(), **changes})

    def lower_precision(self, precision: str) -> Facts:
        """The facts of a model that now also computes in ``precision`` (the lower one wins)."""
        if _ORDER[precision] < _ORDER[self.precision]:
            return self.evolve(precision=precision)
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class PassCaps:
    """What a pass needs and provides (registered with it; read by the core, the CLI and recipes)."""

    consumes: str
    produces: str
    # Turns a PyTorch model into ONNX: the pipeline inserts it where a chain switches to ONNX.
    lowers_to_onnx: bool = False
    # Offered as ``compress compare --precision NAME`` (the pass with its default settings).
    compare_precision: str | None = None
    # Settings that name a file, relative to the recipe's folder when written in a recipe.
    path_fields: tuple[str, ...] = ()
    # Settings that name a model source (zoo:, hf:DIR, a file), resolved like the recipe's model.
    source_fields: tuple[str, ...] = ()
    # Settings that only train (fine-tuning epochs): at 0 the pass gives the same shapes untrained.
    # A search's untrained probe of a trial sets them to 0 (compress.apps.search.probe_recipe).
    training_fields: tuple[str, ...] = ()
    # The pass only trains: it changes weights, never shapes or precision (the probe leaves it out).
    trains_only: bool = False
    # Settings that, when set, make the pass choose by the trained model's accuracy (accuracy-controlled
    # quantization picks its float nodes so): a search cannot probe such a trial untrained.
    accuracy_fields: tuple[str, ...] = ()
    # Settings of a fidelity guard that only refuses, never shapes the model: a search's untrained probe turns
    # them off (None), since an untrained model is no evidence either way.
    guard_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class BundleSpec:
    """How a target's build travels as a deployable bundle (``compress export``): the file it is, the
    runtime package the device needs at exactly the version that built it, and why exactly."""

    model: str
    runtime: str
    why_exact: str
    pinned: tuple[str, ...] = ()  # further packages whose exact version the device must have too


@dataclass(frozen=True)
class TargetCaps:
    """What a target consumes and runs (a class attribute ``caps`` of every target)."""

    consumes: str
    # Precisions it can run; an artifact in another precision is refused with the reason.
    precisions: frozenset[str] = frozenset(PRECISIONS)
    # Operator domains beyond the standard ONNX one it implements ("com.microsoft", ...), sub-domains included;
    # an entry "domain:Op" names one operator of a domain it implements only in part.
    op_domains: frozenset[str] = frozenset()
    # Its outputs are the reference the others are compared with (eager PyTorch): it has no parity
    # of its own to check, and fidelity prefers it as the baseline.
    reference: bool = False
    # Runs any batch size whatever the artifact's batch dimension (a PyTorch module does).
    any_batch: bool = False
    # Measured when a recipe names no target.
    default: bool = False
    # Its runner records time on the device per call (``runner.device_ms``), reported beside wall time.
    device_timing: bool = False
    # Sparsity patterns it has kernels for: a model with one of them is said to run dense on a target without
    # (``dense_note``), since its zeros buy no speed there.
    sparse_kernels: frozenset[str] = frozenset()
    # Notes a report carries whenever this target was measured (how it was configured to be fair).
    report_notes: tuple[str, ...] = ()
    # Has a generate loop for decoder language models (``target.lm_runner``): runs artifacts whose facts
    # name a decoder with its KV cache.
    generates: bool = False
    # Its builds can be exported as a bundle that runs without this package (None: they cannot).
    bundle: BundleSpec | None = None
    # The Python modules (import names) its runtime needs, and how to install them: ``compress targets``
    # probes them with importlib.util.find_spec, without importing the runtime (TVM alone takes seconds);
    # ``unavailable_reason()`` remains the full check, run by ``compress targets --check`` and every run.
    requires: tuple[str, ...] = ()
    install: str = ""


def dense_note(caps: TargetCaps, facts: Facts, target: str, able: list[str]) -> str | None:
    """The note of a cell whose model has a sparsity pattern some target has kernels for (``able``) but this one
    does not: it runs the zeros as dense weights. None when the target has the kernels or no target has."""
    if facts.sparsity is None or facts.sparsity in caps.sparse_kernels or not able:
        return None
    return (f"the model's {facts.sparsity} sparsity runs as dense weights on '{target}' (no {facts.sparsity} "
            f"kernels; targets with them: {', '.join(able)}): its zeros buy no speed here")


def refusal(caps: TargetCaps, facts: Facts, target: str) -> str | None:
    """Why a target with ``caps`` cannot run an artifact with ``facts``, or None when it can."""
    if facts.precision not in caps.precisions:
        return (f"target '{target}' does not run {facts.precision} models (it runs "
                f"{', '.join(p for p in PRECISIONS if p in caps.precisions)})")
    # A domain covers its sub-domains (ONNX Runtime's com.microsoft covers com.microsoft.nchwc); "domain:Op" itself.
    missing = [op for op in facts.required_ops
               if not any(op == d or op.split(":", 1)[0] == d or op.startswith(d + ".") for d in caps.op_domains)]
    if missing:
        return (f"target '{target}' lacks the operator(s) {', '.join(missing)} this model needs "
                "(made by a pass that targets another runtime)")
    if facts.decoder is not None and not caps.generates:
        return f"target '{target}' has no generate loop for a decoder language model with its KV cache"
    return None
