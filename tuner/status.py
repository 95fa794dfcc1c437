"""``tuner status``: a table of the stages, then each stage's best params and fixed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner import diagnostics
from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.errors import StageRefused, UserError
from tuner.plan import Source, plan_stage, rerun_command, stale_keys
from tuner.results import SURPLUS, best_of, best_trial


@dataclass
class StageStatus:
    """What one stage holds now."""

    stage: str
    exists: bool = False
    budget: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best_value: float | None = None
    best_number: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Source] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)


def collect(study: StudyConfig) -> list[StageStatus]:
    """The status of every stage of a study (nothing is created in the storage)."""
    storage = storages.open_existing(study.storage, read_only=True)
    best = best_of(storage, study)
    rows = []
    for stage in study.stages:
        row = StageStatus(stage, budget=study.trials[stage])
        found = storages.load(storage, study.stage_name(stage))
        if found is not None:
            _fill(row, found)
            try:
                plan = plan_stage(study, stage, best)
                row.stale = stale_keys(plan, found.user_attrs.get("lineage", {}))
            except StageRefused:
                row.stale = []  # an upstream stage lost its result; nothing to compare
        rows.append(row)
    return rows


def _fill(row: StageStatus, found: optuna.Study) -> None:
    row.exists = True
    for trial in found.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            row.complete += 1
        elif trial.state == TrialState.PRUNED:
            row.pruned += 1
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("stop_reason") != SURPLUS:
            row.failed += 1  # a surplus trial lost a race for the budget; it never trained
        elif trial.state == TrialState.RUNNING:
            row.running += 1
    top = best_trial(found)
    if top is not None:
        row.best_value, row.best_number, row.best_params = top.value, top.number, top.params
    row.fixed = dict(found.user_attrs.get("fixed", {}))
    row.lineage = {k: Source.from_dict(v) for k, v in found.user_attrs.get("lineage", {}).items()}
    row.diagnostics = diagnostics.diagnose(found)  # computed afresh: running stages too


def render(study: StudyConfig, rows: list[StageStatus]) -> str:
    """The status as text: one table row per stage, then the details of each."""
    head = (
        f"study {study.name} ({storages.mask(study.storage)}): {study.metric}, {study.direction}"
    )
    table = [
        ("stage", "finished", "complete", "pruned", "failed", f"best {study.metric}", "trial")
    ]
    for r in rows:
        if not r.exists:
            table.append((r.stage, f"0/{r.budget}", "-", "-", "-", "-", "-"))
            continue
        best = f"{r.best_value:.4f}" if r.best_value is not None else "-"
        table.append((
            r.stage, f"{r.complete + r.pruned}/{r.budget}", str(r.complete), str(r.pruned),
            str(r.failed), best, f"#{r.best_number}" if r.best_number is not None else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [head, ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in table]  # fmt: skip
    lines.append("")
    for r in rows:
        lines += _details(study, r)
    return "\n".join(lines).rstrip()


def _details(study: StudyConfig, r: StageStatus) -> list[str]:
    if not r.exists:
        return [f"{r.stage}: not started (`{rerun_command(study, r.stage)}`)"]
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in r.best_params.items()) or "-"
    fixed = (
        ", ".join(
            f"{k}={_fmt(v)} ({r.lineage[k].label if k in r.lineage else '?'})"
            for k, v in r.fixed.items()
        )
        or "nothing"
    )
    lines = [f"{r.stage}: best {params}", f"{' ' * len(r.stage)}  fixed {fixed}"]
    lines += [f"{' ' * len(r.stage)}  ! {line}" for line in r.diagnostics]
    if r.running:
        lines.append(f"{' ' * len(r.stage)}  {r.running} trial(s) running now")
    if r.stale:
        lines.append(
            f"{' ' * len(r.stage)}  STALE: {', '.join(r.stale)} changed upstream since it ran;"
            f" `{rerun_command(study, r.stage, 'restart=true')}`"
        )
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show(study: StudyConfig) -> str:
    """``tuner status``: fails with one line where there is nothing to show."""
    if not storages.exists(study.storage):
        raise UserError(
            f"No storage at {storages.mask(study.storage)}: run `python -m tuner run` first"
            " (or pass storage=...)."
        )
    return render(study, collect(study))
