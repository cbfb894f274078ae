"""One run: plan -> execute -> measure -> report.

* ``compress.stages.plan``: validate everything and load the model and data (nothing runs yet);
* ``compress.stages.execute``: run the chains through the cache (the baseline and each variant);
* ``compress.measuring.measurement``: compile for every target, check parity, time interleaved, score;
* here: the report (report.json, report.md, pareto.png) and the run's verdict.

The measured figures are kept in the cache (``reports/<key>.json``) before the report files are
rendered and written, and dropped once they are: when writing fails (a full disk, Ctrl-C), the same
command run again renders the kept figures instead of measuring again.

Both the original model (the baseline) and the compressed ones go through every target in the
same process, and their latencies are measured interleaved, so the ratios in the report compare
like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.artifact import Artifact
from ..core.config import PassConfig
from ..core.fingerprint import machine_fingerprint
from ..core.manager import Instrument
from ..errors import CompressError, TargetUnavailable
from ..measuring.compare import CellRef
from ..measuring.measurement import Measurement, measure
from ..reporting.report_schema import Report
from . import preflight
from .execute import Variant, execute
from .plan import BASELINE, Plan, make_plan
from .recipe import Recipe


def run(
    recipe: Recipe | str | Path,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    variants: dict[str, list[PassConfig]] | None = None,
    write: bool = True,
    references: dict[str, Artifact] | None = None,
    extra_models: dict[str, Artifact] | None = None,
    baseline_label: str | None = None,
    aa_session: bool = True,
    instruments: Sequence[Instrument] = (),
) -> Report:
    """Run a recipe end to end; write report.json, report.md and pareto.png; return the typed report
    (``compress.reporting.report_schema.Report``; ``.to_json()`` is exactly what report.json holds).

    ``variants`` replaces the recipe's single pass chain with several named chains
    (``compress compare`` uses it for precisions); all are measured in one session.
    ``references`` maps a target name to a stored compiled baseline artifact (``compress check``'s
    recorded baseline): it is timed interleaved with the rest as variant "recorded".
    ``extra_models`` adds ready ONNX models as variants, measured as they are (``compress compare
    a.onnx b.onnx``). ``aa_session`` times a second session of each baseline beside it: the
    between-session noise, added to every ratio's interval. ``instruments`` are hooked into every
    variant's pass chain (e.g. ``DumpInstrument``, ``compress run --dump-ir``).
    A recipe's hardware ``profile`` (compress.stages.profiles) fills in its defaults and forces its ISA for the run.
    """
    from .profiles import profile_scope
    from .recipe import load_recipe

    t_start = time.perf_counter()
    with profile_scope(recipe if isinstance(recipe, Recipe) else load_recipe(recipe)) as (rec, _profile):
        plan = make_plan(rec, out_dir, cache_dir, progress, log, variants, write, extra_models, instruments)
        kept = _kept_figures(plan, variants, references, aa_session)
        if kept is not None and kept.exists():
            from ..reporting.report_schema import load_report

            rep = load_report(kept)
            plan.say(f"report: writing the figures measured in an earlier run of this command, whose report could "
                     f"not be written (kept in {kept}; delete that file to measure again)")
            _write(plan, rep, kept)
            return _verdict(plan, rep)
        made = execute(plan)
        measured = measure(plan, made, references, aa_session)
        return report(plan, made, measured, time.perf_counter() - t_start, baseline_label, kept)


def _kept_figures(plan: Plan, variants: dict[str, list[PassConfig]] | None, references: dict[str, Artifact] | None,
                  aa_session: bool) -> Path | None:
    """Where this command's measured figures are kept until its report is written (None: nothing written).
    The key is everything that decides what is measured and where it goes; the machine's fingerprint is in it
    too, so figures are never carried to another machine."""
    if not plan.write:
        return None
    from ..core.artifact import sha256_json

    key = sha256_json({
        "recipe": plan.recipe.model_dump(mode="json"), "out": str(plan.out.absolute()),
        "variants": {k: [c.model_dump(mode="json") for c in v] for k, v in (variants or {}).items()},
        "references": {k: a.digest for k, a in (references or {}).items()},
        "extra": {k: a.digest for k, a in plan.extra_models.items()}, "aa": aa_session,
        "machine": machine_fingerprint(),
    })
    return plan.cache.root / "reports" / f"{key}.json"


def _write(plan: Plan, rep: Report, kept: Path | None) -> None:
    """Keep the figures first (a failure while rendering or writing loses none), then write the report set."""
    from ..reporting.report import write_report

    if kept is not None and not kept.exists():
        import json

        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(rep.to_json(), default=str))
            tmp.replace(kept)
        except OSError:
            tmp.unlink(missing_ok=True)  # the disk is full: the report write below fails and says so
            kept = None
    try:
        write_report(rep, plan.out)
    except (CompressError, KeyboardInterrupt) as e:
        if kept is None or not kept.exists():
            raise
        where = f"the measured figures are kept in {kept}: the same command run again writes the report without " \
                "measuring again"
        if isinstance(e, KeyboardInterrupt):
            plan.say(f"interrupted while writing the report; {where}")
            raise
        raise type(e)(f"{e}; {where}") from e
    if kept is not None:
        kept.unlink(missing_ok=True)


def _verdict(plan: Plan, rep: Report) -> Report:
    if not any(c.status == "ok" for c in rep.results):
        why = "; ".join(f"{CellRef.of(c)}: {c.reason}" for c in rep.results)
        raise TargetUnavailable(f"nothing could be measured ({why}); the report in {plan.out} lists the reasons")
    return rep


def report(plan: Plan, variants: list[Variant], m: Measurement, seconds: float,
           baseline_label: str | None = None, kept: Path | None = None) -> Report:
    """Stage 4: build the typed report, write it (unless the plan says not to) and give the run's verdict."""
    from ..reporting.report import build_report

    rec, say, cells = plan.recipe, plan.say, m.cells
    notes: list[str] = []
    measured_targets = {c.target for c in cells if c.status == "ok"}
    for t in plan.targets:  # how each measured target was configured to be fair, as it declares
        if t.name in measured_targets:
            notes += [n for n in t.caps.report_notes if n not in notes]
    base_acc = next((c.accuracy for c in cells if c.variant == BASELINE and c.accuracy is not None), None)
    trained = bool(rec.model.train_epochs or rec.model.weights)
    note = preflight.chance_note(base_acc, plan.n_classes, rec.model.source, trained)
    if note:
        say(f"note: {note}")
    notes += [n for n in (note, m.threads_note) if n]
    from ..quality.accuracy_guard import judge

    for line in judge(cells, rec.measure.max_accuracy_drop, bool(plan.data and plan.data.labelled),
                      plan.data is not None, {k: pm.steps for k, pm in plan.chains.items()}):
        say(f"WARNING accuracy: {line}")
        notes.append(f"WARNING accuracy: {line}")
    from ..reporting.run_artifacts import assign_artifact_dirs, link_artifacts

    assign_artifact_dirs(cells)
    rep = build_report(rec, variants, cells, plan.data, m.threads, plan.auto_export, machine_fingerprint(),
                       seconds, plan.cache, m.contention, baseline_label=baseline_label, extra_notes=notes,
                       seq_own=m.seq_own)
    from ..core.lineage import build_lineage

    rep.lineage = build_lineage(plan, variants, cells)  # the graph and its evaluations, as data
    if plan.write:
        _write(plan, rep, kept)
        link_artifacts(cells, plan.out, variants)  # after the report: a failed write leaves --out as it was
    return _verdict(plan, rep)
