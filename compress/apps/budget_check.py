"""``compress check``: measure every model a budgets file names and decide each budget (``CheckResult``).
See ``compress.apps.budget`` for the budgets file and the verdicts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..measuring.compare import CellRef, clock
from ..reporting.report_schema import Report, ResultCell
from .baseline_store import BaselineStore, fingerprint_key
from .budget_spec import (
    EXIT_PASS,
    EXIT_SKIPPED,
    BudgetsFile,
    BudgetSpec,
    check_fidelity_budgets,
    load_budgets,
    parse_limit,
)
from .budget_verdict import Verdict, evaluate_budget, junit_xml, overall_exit


@dataclass
class CheckResult:
    verdicts: list[Verdict]
    exit_code: int
    reports: dict[str, Report] = field(default_factory=dict)
    noise: list[str] = field(default_factory=list)  # per target/batch: A/A spread, smallest detectable difference
    warnings: list[str] = field(default_factory=list)  # machine load seen while measuring
    recorded: list[str] = field(default_factory=list)  # --update-baseline: what was recorded, for which machine, where
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS

    def summary(self) -> str:
        counts = {s: sum(v.status == s for v in self.verdicts)
                  for s in ("pass", "fail", "inconclusive", "skipped", "recorded")}
        lines = [v.line() for v in self.verdicts]
        lines += [f"WARNING {w}" for w in dict.fromkeys(self.warnings)]
        lines += self.noise
        lines += self.recorded
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "recorded"))
        if self.exit_code == EXIT_SKIPPED:
            lines.append("FAILED CLOSED: a budget could not be judged here (see SKIPPED above); record a baseline "
                         "with --update-baseline, make the target available, or allow it with --allow-skip "
                         "(or allow_skip = true in the budgets file or the budget)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"schema": "compress.check/v1", "exit_code": self.exit_code,
                "verdicts": [asdict(v) for v in self.verdicts], "noise": self.noise, "warnings": self.warnings,
                "recorded": self.recorded}


def _recipe_for(rec: Any, budgets: list[BudgetSpec], rounds: int | None) -> Any:
    """The model's recipe with every target and batch size the budgets need."""
    from ..core.registry import default_targets, get_target_config

    targets = list(rec.targets) or default_targets()
    have = {t.kind for t in targets}
    for b in budgets:
        lim = parse_limit(b.max, b.metric, b.title()) if b.max is not None and b.metric is not None else None
        for k in (b.target, lim.ratio_to if lim is not None else None):
            if k and k not in ("original", "recorded") and k not in have:
                targets.append(get_target_config(k)())
                have.add(k)
    batches = sorted({*rec.measure.batch_sizes, *(b.batch for b in budgets if b.fidelity is None)})
    seqs = sorted({*(rec.measure.seq_lens or []), *(b.seq for b in budgets if b.seq is not None)})
    measure = rec.measure.model_copy(update={"batch_sizes": batches, **({"min_runs": rounds} if rounds else {}),
                                             **({"seq_lens": seqs} if seqs else {})})
    return rec.model_copy(update={"targets": targets, "measure": measure})


def check(
    path: str | Path,
    baseline: str | Path | None = None,
    update_baseline: bool = False,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    fail_on_unavailable: bool | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    allow_skip: bool | None = None,
) -> CheckResult:
    """Measure every model named in a budgets file and decide each budget."""
    import time

    t0 = time.perf_counter()
    bf, recipes = load_budgets(path)  # a bad budgets file is answered before torch is imported
    from ..stages.recipe import load_recipe

    for rpath in recipes.values():
        load_recipe(rpath)  # and so is a bad recipe it names (pass settings included)
    check_fidelity_budgets(bf, recipes, Path(path), cache_dir)

    from ..reporting.report_tables import noise_lines

    base_path = Path(baseline) if baseline else Path(path).with_suffix(".baseline.json")
    store = BaselineStore(base_path)  # refuses a corrupt file before anything runs
    out = Path(out_dir) if out_dir else Path("runs") / "check"
    say = log or (lambda m: None)
    verdicts: list[Verdict] = []
    reports: dict[str, Report] = {}
    recorded_lines: list[str] = []
    for model, rpath in recipes.items():
        mine = [b for b in bf.budget if b.model == model]
        if not mine:
            continue
        report, mine_v = _check_model(model, rpath, mine, bf, store, out, cache_dir, progress, log, say)
        reports[model] = report
        verdicts += mine_v
        if update_baseline:
            recorded_lines.append(_record_baseline(model, report, store, mine_v))
    if update_baseline:
        store.save()
    skip_ok = bool(bf.allow_skip if allow_skip is None else allow_skip)
    if fail_on_unavailable:
        skip_ok = False
    res = CheckResult(verdicts, overall_exit(verdicts, skip_ok), reports, recorded=recorded_lines,
                      seconds=time.perf_counter() - t0)
    res.noise = [line for rep in reports.values() for line in noise_lines(rep)]
    res.warnings = [w for rep in reports.values() for w in (rep.contention.warnings if rep.contention else [])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(res.to_json(), indent=2))
    (out / "junit.xml").write_text(junit_xml(verdicts, time.perf_counter() - t0))
    return res


def _check_model(model: str, rpath: Path, mine: list[BudgetSpec], bf: BudgetsFile, store: BaselineStore, out: Path,
                 cache_dir: str | Path | None, progress: bool, log: Callable[[str], None] | None,
                 say: Callable[[str], None]) -> tuple[Report, list[Verdict]]:
    """One model measured (with the recorded baselines it needs re-timed beside it) and its budgets decided."""
    import time

    from ..core.fingerprint import machine_fingerprint
    from ..stages.pipeline import run
    from ..stages.recipe import load_recipe

    rec = _recipe_for(load_recipe(rpath), mine, bf.rounds)
    fp0 = fingerprint_key(machine_fingerprint(), rec.measure.threads or "auto")
    refs = store.references(model, rec, mine, fp0, say)
    say(f"measuring {model} ({rpath})")
    t_model = time.perf_counter()
    report = run(rec, out_dir=out / model, cache_dir=cache_dir, progress=progress, log=log, references=refs)
    fp = fingerprint_key(report.machine.model_dump(), report.measurement.threads_setting or "auto")
    mine_v = [evaluate_budget(b, report, bf, store, fp, _memory_probe(report)) for b in mine]
    share = (time.perf_counter() - t_model) / len(mine_v)
    for b, v in zip(mine, mine_v, strict=True):
        v.allow_skip, v.seconds = b.allow_skip, share
    return report, mine_v


def _memory_probe(report: Report) -> Callable[[ResultCell, int], int]:
    """Peak memory of a cell's compiled model at a batch, measured in a fresh process."""

    def memory(cell: ResultCell, batch: int) -> int:
        from ..core.artifact import Artifact
        from ..core.registry import get_target_config
        from ..measuring.memprobe import measure_peak_memory

        cfg = get_target_config(cell.target).model_validate(cell.target_config)
        assert cell.compiled_path is not None  # an "ok" cell has a compiled artifact
        probe = measure_peak_memory(cfg, Artifact.load(Path(cell.compiled_path)), batch, report.measurement.threads)
        return probe["model_peak_bytes"]

    return memory


def _record_baseline(model: str, report: Report, store: BaselineStore, mine_v: list[Verdict]) -> str:
    """--update-baseline: every measured cell's samples (on its clock) and its kept artifact, for this machine."""
    from ..core.lineage import cell_records

    fp = fingerprint_key(report.machine.model_dump(), report.measurement.threads_setting or "auto")
    cells = []
    for r in report.results:
        if r.reference or r.status != "ok":
            continue
        art = store.keep_artifact(Path(r.compiled_path)) if r.compiled_path else None
        for batch in r.latency:
            ck = clock(r, batch)
            assert ck is not None  # the cell's own latency key
            samples, p50 = ck.samples, float(ck.stats.p50_ms)
            store.put(BaselineStore.key(model, r.variant, r.target, batch, fp), {
                "digest": r.compiled_digest, "samples_ms": samples, "p50_ms": p50,
                "recorded": report.created, "machine": report.machine.cpu.model,
                "artifact": art, **({"device": r.device} if r.device is not None else {}),
                # The run's own lineage records of this build (core.lineage): its chain and evaluations.
                "lineage": cell_records(report.lineage, r.variant, r.target, r.compiled_digest)})
            cells.append(f"{CellRef.of(r)}@b{batch} p50 {p50:.4g} ms")
    for v in mine_v:  # a budget against the baseline just recorded: nothing to compare yet, not a skip
        if v.status == "skipped" and v.limit.replace(" ", "").endswith("xrecorded"):
            v.status = "recorded"
            v.detail = f"baseline recorded now for fingerprint {fp[:12]} in {store.path}; later checks compare"
    where = f"{store.path} (artifacts in {store.artifact_dir}/)"
    threads = report.measurement.threads_setting or "auto"
    return (f"RECORDED baseline of {model}: {len(cells)} cells ({'; '.join(cells)}) for machine fingerprint "
            f"{fp[:12]} ({report.machine.cpu.model}, threads {threads}) in {where}")


def assert_budgets(path: str | Path, **kwargs: Any) -> CheckResult:
    """pytest-friendly: raise :class:`BudgetExceeded` naming every budget that did not pass."""
    from ..errors import BudgetExceeded

    res = check(path, **kwargs)
    if not res.passed:
        bad = [v.line() for v in res.verdicts if v.status != "pass"]
        raise BudgetExceeded("budgets not met:\n" + "\n".join(bad))
    return res
