"""compress.measuring.compare: the one home of "how do two measured cells compare" (clock, device, identity, ratio)."""

from __future__ import annotations

import numpy as np
import pytest

from compress.measuring.compare import CellRef, clock, compare, same_build, to_numbers
from compress.reporting.report_schema import IdenticalRatio, MeasuredRatio, NoRatio
from tests.reports import cell, latency, make_report


def _samples(center: float, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).normal(center, 0.01 * center, 30)]


def _device(samples: list[float]) -> dict:
    return {**{k: v for k, v in latency(samples).items() if k not in ("samples_ms", "timing")},
            "measured_on": "dev", "samples_ms": samples}


def test_cell_refs_spell_and_parse_back() -> None:
    ref = CellRef("int8", "onnxruntime")
    assert str(ref) == "int8/onnxruntime" and CellRef.parse(str(ref)) == ref
    with pytest.raises(ValueError):
        CellRef.parse("no-slash")


def test_a_remote_cell_is_read_on_its_devices_clock_and_never_divided_by_a_host_figure() -> None:
    host, dev = _samples(5.0, 0), _samples(1.0, 1)
    rep = make_report([
        cell("baseline", "tvm", lat={"1": latency(host, device=_device(_samples(2.0, 2)))}, device="rpc"),
        cell("q", "tvm", lat={"1": latency(host, device=_device(dev))}, device="rpc"),
        cell("q", "onnxruntime", lat={"1": latency(_samples(1.0, 3))}),
    ])
    q_tvm, base, q_ort = rep.cell("q", "tvm"), rep.cell("baseline", "tvm"), rep.cell("q", "onnxruntime")
    assert q_tvm is not None and base is not None and q_ort is not None
    ck = clock(q_tvm, "1")
    assert ck is not None and ck.device == "rpc" and ck.samples == dev
    r = compare(q_tvm, base, "1")
    assert isinstance(r, MeasuredRatio) and r.ratio == pytest.approx(0.5, rel=0.05) and "(device clock)" in r.text
    refused = compare(q_tvm, q_ort, "1", what="onnxruntime")
    assert isinstance(refused, NoRatio) and refused.verdict == "not comparable" and "two devices" in refused.text
    assert isinstance(to_numbers(q_tvm, "1", {"samples_ms": dev}, "p50"), NoRatio)  # host numbers: refused too


def test_identical_builds_are_labelled_by_digest_not_raced() -> None:
    rep = make_report([cell("baseline", "ort", digest="d", lat={"1": latency(_samples(1.0, 0))}),
                       cell("q", "ort", digest="d", lat={"1": latency(_samples(0.5, 1))}),
                       cell("r", "ort", digest="e", lat={"1": latency(_samples(0.5, 2))})])
    base, q, r = rep.cell("baseline", "ort"), rep.cell("q", "ort"), rep.cell("r", "ort")
    assert base is not None and q is not None and r is not None
    assert same_build(q, base) and not same_build(r, base)
    assert isinstance(compare(q, base, "1"), IdenticalRatio)
    got = compare(r, base, "1")
    assert isinstance(got, MeasuredRatio) and got.verdict == "faster"
    assert isinstance(compare(r, base, "32"), NoRatio)  # not timed there: no ratio, said why
