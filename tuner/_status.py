"""``tuner status``: a table of the stages, then each stage's best params and fixed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner import closed_loop, devices, diagnostics, race, retry
from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.errors import StageRefused, UserError
from tuner.plan import Source, plan_stage, rerun_command, stale_keys
from tuner.results import SURPLUS, best_of, best_trial, fresh_from, rescored
from tuner.text import printable


@dataclass
class StageStatus:
    """What one stage holds now."""

    stage: str
    exists: bool = False
    budget: int = 0  # its trials' worth: the study's, and what a widening added
    credit: float = 0.0  # what its pruned trials gave back of it (closed_loop.credit)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    stale: list[retry.Stale] = field(default_factory=list)  # running, its heartbeat stopped
    cut_off: list[str] = field(default_factory=list)  # to run again first: "#3 (interrupted)"
    best_value: float | None = None
    best_number: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Source] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)  # upstream keys changed since it ran
    diagnostics: list[str] = field(default_factory=list)
    best_seeds: list[float] = field(default_factory=list)  # the best's value on each seed
    best_fresh_from: int = 1  # where its fresh values start (results.fresh_from)
    widened: list[str] = field(default_factory=list)  # what the closed loop changed, and why
    ended: str | None = None  # the stop rule's line, where it ended the stage
    devices: str = ""  # how many trials each device ran (tuner.devices), where a run set them
    race: dict[int, dict[str, Any]] = field(default_factory=dict)  # a time race's measurements


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
                row.changed = stale_keys(plan, found.user_attrs.get("lineage", {}))
                row.credit = closed_loop.credit(plan, found.get_trials(deepcopy=False))
            except StageRefused:
                row.changed = []  # an upstream stage lost its result; nothing to compare
        rows.append(row)
    return rows


def _fill(row: StageStatus, found: optuna.Study) -> None:
    row.exists = True
    row.budget += closed_loop.extra_trials(found)
    trials = found.get_trials(deepcopy=False)
    row.stale = retry.stale_trials(found)
    waiting = retry.queued_retries(trials)
    row.cut_off = [f"#{t.number} ({_cut_why(t)})" for t in retry.unretried(trials)]
    row.cut_off += [f"#{t.number} (queued again)" for t in waiting]
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            row.complete += 1
        elif trial.state == TrialState.PRUNED:
            row.pruned += 1
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("stop_reason") != SURPLUS:
            row.failed += 1  # a surplus trial lost a race for the budget; it never trained
        elif trial.state == TrialState.RUNNING:
            row.running += 1
    row.running -= len(row.stale)
    top = best_trial(found)
    if top is not None:
        row.best_value, row.best_number, row.best_params = top.value, top.number, top.params
        row.best_seeds = rescored(found, top) or []
        row.best_fresh_from = fresh_from(found.user_attrs, top.number)
    row.widened = [
        closed_loop.Widening.from_dict(r).line()
        for r in found.user_attrs.get(closed_loop.WIDENED, [])
    ]
    longer = closed_loop.follow_up_line(found)
    row.widened += [longer] if longer else []
    row.ended = found.user_attrs.get("ended") or None
    row.fixed = dict(found.user_attrs.get("fixed", {}))
    row.lineage = {k: Source.from_dict(v) for k, v in found.user_attrs.get("lineage", {}).items()}
    row.diagnostics = diagnostics.diagnose(found)  # computed afresh: running stages too
    row.devices = devices.summary(found.get_trials(deepcopy=False))
    row.race = race.measured(found.user_attrs)


def render(study: StudyConfig, rows: list[StageStatus]) -> str:
    """The status as text: one table row per stage, then the details of each."""
    head = (
        f"study {study.name} ({storages.mask(study.storage)}): {study.metric}, {study.direction}"
    )
    table: list[tuple[str, ...]] = [
        ("stage", "finished", "complete", "pruned", "failed", f"best {study.metric}", "trial")
    ]
    for r in rows:
        if not r.exists:
            table.append((r.stage, f"0/{r.budget}", "-", "-", "-", "-", "-"))
            continue
        best = f"{r.best_value:.4f}" if r.best_value is not None else "-"
        if r.best_seeds:
            best = closed_loop.spread_text(r.best_seeds, r.best_fresh_from)
        table.append((
            r.stage, f"{closed_loop.count(r.complete + r.pruned - r.credit)}/{r.budget}",
            str(r.complete), str(r.pruned),
            str(r.failed), best, f"#{r.best_number}" if r.best_number is not None else "-",
        ))  # fmt: skip
    table = [tuple(map(printable, row)) for row in table]  # a study named with ESC in it
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [printable(head), ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in table]  # fmt: skip
    lines.append("")
    for r in rows:
        lines += [printable(line) for line in _details(study, r)]  # one line each, escaped
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
    pad = " " * len(r.stage)
    lines += [f"{' ' * len(r.stage)}  {line}" for line in (*r.widened, r.ended) if line]
    if r.race:
        raced = ", ".join(
            f"{size}: {m.get('samples_per_s', 0):.0f}/s -> {m.get('samples')}"
            for size, m in r.race.items()
        )
        lines.append(f"{' ' * len(r.stage)}  race (samples/s -> samples, reused): {raced}")
    if r.devices:
        lines.append(f"{' ' * len(r.stage)}  ran on {r.devices}")
    if r.running:
        lines.append(f"{pad}  {r.running} trial(s) running now")
    for dead in r.stale:
        began = f", started {dead.started:%Y-%m-%d %H:%M:%S}" if dead.started else ""
        lines.append(
            f"{pad}  trial #{dead.number} is stale: no heartbeat for {_age(dead.silent)} (last"
            f" {dead.last:%Y-%m-%d %H:%M:%S}{began}); its worker stopped, and the next run"
            " fails it and runs its values again first"
        )
    if r.cut_off:
        lines.append(
            f"{pad}  the next run runs {len(r.cut_off)} cut-off trial(s) again first:"
            f" {', '.join(r.cut_off)}"
        )
    if r.changed:
        lines.append(
            f"{' ' * len(r.stage)}  STALE: {', '.join(r.changed)} changed upstream since it ran;"
            f" `{rerun_command(study, r.stage, 'restart=true')}`"
        )
    return lines


def _cut_why(trial: optuna.trial.FrozenTrial) -> str:
    if trial.user_attrs.get("stop_reason") == retry.INTERRUPTED:
        return "interrupted"
    return "its worker stopped"


def _age(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show(study: StudyConfig) -> str:
    """``tuner status``: fails with one line where there is nothing to show."""
    return render(study, collect_existing(study))


def collect_existing(study: StudyConfig) -> list[StageStatus]:
    """``collect``, failing with one line where the storage does not exist."""
    if not storages.exists(study.storage):
        raise UserError(
            f"No storage at {storages.mask(study.storage)}: run `python -m tuner run` first"
            " (or pass storage=...)."
        )
    return collect(study)
