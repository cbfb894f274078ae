"""report.json has a typed, versioned schema: the writer validates against it, readers load through it,
and the published JSON schema (docs/report.schema.json) is generated from it and cannot drift."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from compress.cli import main
from compress.errors import InputError
from compress.reporting.report import render_markdown, render_text
from compress.reporting.report_schema import SCHEMA, Report, ResultCell, load_report, schema_text
from compress.reporting.report_schema import main as schema_main

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "report.schema.json"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small real run: a quantized variant on two targets, two batch sizes (ratios, parity, noise)."""
    tmp = tmp_path_factory.mktemp("schema")
    (tmp / "r.toml").write_text(
        'name = "s"\nmodel = { source = "zoo:digits-cnn" }\ndata = { source = "builtin:digits" }\n'
        'measure = { batch_sizes = [1, 2], warmup = 1, min_runs = 8, min_time_s = 0.0 }\n'
        '[[passes]]\nkind = "quantize.int8"\nsamples = 32\n'
        '[[targets]]\nkind = "torch"\n[[targets]]\nkind = "onnxruntime"\n')
    code = main(["run", str(tmp / "r.toml"), "--out", str(tmp / "out"), "--cache", str(tmp / "cache"), "-q"])
    assert code == 0
    return tmp / "out"


def test_published_schema_is_generated_from_the_models(tmp_path: Path) -> None:
    assert PUBLISHED.read_text(encoding="utf-8") == schema_text(), \
        "docs/report.schema.json is stale: run python -m compress.reporting.report_schema"
    assert schema_main([str(PUBLISHED), "--check"]) == 0
    stale = tmp_path / "s.json"
    stale.write_text(schema_text().replace('"number"', '"string"', 1))
    assert schema_main([str(stale), "--check"]) == 1
    assert schema_main([str(stale)]) == 0 and stale.read_text() == schema_text()
    assert json.loads(schema_text())["properties"]["schema"]["const"] == SCHEMA


def test_a_real_report_validates_against_the_published_schema_and_a_corrupted_one_does_not(run_dir: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    schema = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    rep = json.loads((run_dir / "report.json").read_text())
    assert list(validator.iter_errors(rep)) == []
    # The run really exercised the structured parts (otherwise the validation above proves little).
    q = next(r for r in rep["results"] if (r["variant"], r["target"]) == ("s", "onnxruntime"))
    assert q["status"] == "ok" and q["parity"]["precision"] == "int8" and q["quant_parity"]
    assert set(q["ratio_to_baseline"]) == {"1", "2"} and q["latency"]["2"]["samples_ms"]
    assert rep["noise"] and rep["variants"]["s"]["steps"][-1]["pass"] == "quantize.int8"

    def broken(change: Any) -> list[str]:
        bad = copy.deepcopy(rep)
        change(bad)
        return [e.message for e in validator.iter_errors(bad)]

    assert any("'great' is not one of" in m for m in broken(lambda d: d["results"][0].update(status="great")))
    assert any("Additional properties" in m for m in broken(lambda d: d["results"][0].update(latncy={})))
    assert any("'latency' is a required property" in m for m in broken(lambda d: d["results"][0].pop("latency")))
    assert broken(lambda d: d.update(schema="compress.report/v0"))
    assert broken(lambda d: d["results"][0]["latency"]["1"].update(p50_ms="fast"))
    qi = rep["results"].index(q)
    assert broken(lambda d: d["results"][qi]["ratio_to_baseline"]["1"].update(verdict="meh"))
    assert broken(lambda d: d["results"][0]["latency"].update({"one": d["results"][0]["latency"]["1"]}))


def test_load_report_round_trips_and_renders(run_dir: Path) -> None:
    rep = load_report(run_dir / "report.json")
    assert isinstance(rep, Report) and rep.to_json() == json.loads((run_dir / "report.json").read_text())
    cell = rep.cell("s", "onnxruntime")
    assert cell is not None and cell.latency["1"].p50_ms > 0 and rep.batches == ["1", "2"]
    assert "## Parity (each target vs its input model)" in render_markdown(rep)
    assert "s  " in render_text(rep) and rep.measurement.threads >= 1


@pytest.mark.parametrize(("text", "needle"), [
    ("{not json", "not a compress report: not JSON"),
    ('{"results": []}', "not a compress report (no 'schema' key)"),
    ('{"schema": "compress.check/v1"}', "not a compress report (schema 'compress.check/v1'"),
    ('{"schema": "compress.report/v9"}', "report schema 'compress.report/v9', but this version of compress reads"),
    ('{"schema": "compress.report/v1", "created": 1}', "not a valid compress.report/v1 report: created:"),
])
def test_load_report_refuses_what_is_not_a_current_report_in_one_line(tmp_path: Path, text: str,
                                                                       needle: str) -> None:
    p = tmp_path / "report.json"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_report(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg and e.value.exit_code == 2
    with pytest.raises(InputError, match="no such report file"):
        load_report(tmp_path / "missing.json")


def test_a_misspelled_key_in_the_writer_fails_validation(run_dir: Path) -> None:
    good = json.loads((run_dir / "report.json").read_text())["results"][0]
    ResultCell.model_validate(good)
    with pytest.raises(ValidationError, match="accuracy_top_1"):
        ResultCell.model_validate({**good, "accuracy_top_1": good["accuracy_top1"]})
    with pytest.raises(ValidationError, match="status"):
        ResultCell.model_validate({**good, "status": "fine"})
