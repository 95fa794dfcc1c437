"""Cut-off trials: those that an interrupt (SIGINT, SIGTERM) or a dead worker (its heartbeat
stopped) ended before they finished. Each one's values run again once, ahead of whatever the
stage has queued and before it samples anything new; a stage that ends leaves nothing queued.

A trial failed by its heartbeat says so ("its worker stopped", and when it last beat), and
``status`` tells a running trial whose heartbeat has stopped (a stale one) from a live one.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from tuner import rows
from tuner import storage as storages
from tuner.results import SURPLUS

INTERRUPTED = "interrupted"  # stop_reason of a trial that SIGINT or SIGTERM ended
WORKER_STOPPED = "worker_stopped"  # stop_reason of a trial failed by its heartbeat
LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)

_TRIALS = models.TrialModel.__table__
_BEATS = models.TrialHeartbeatModel.__table__


class StaleTrialCallback(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose heartbeat stopped (its values queued again), which also
    records why the trial failed and puts the retry ahead of the stage's queue."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().__call__(study, trial)
        rdb = rows.rdb_of(study._storage)
        if rdb is not None:
            last = last_heartbeats(rdb, [trial._trial_id]).get(trial._trial_id)
            since = f" (no heartbeat since {last:%Y-%m-%d %H:%M:%S})" if last else ""
            _set_attrs(rdb, trial._trial_id, {
                "stop_reason": WORKER_STOPPED, "error": f"its worker stopped{since}",
            })  # fmt: skip
        queue(study)


def is_cut_off(trial: FrozenTrial) -> bool:
    """Whether an interrupt or a dead worker ended the trial (not an error of its own)."""
    if trial.state != TrialState.FAIL:
        return False
    reason = trial.user_attrs.get("stop_reason")
    return reason in (INTERRUPTED, WORKER_STOPPED) or (
        reason is None and "error" not in trial.user_attrs  # failed by an older heartbeat
    )


def _parents(trial: FrozenTrial) -> set[int]:
    """The numbers of the trials this one runs again (none: not a retry)."""
    parents = {int(n) for n in trial.system_attrs.get("retry_history", [])}  # Optuna's retry
    if "retry_of" in trial.user_attrs:
        parents.add(int(trial.user_attrs["retry_of"]))
    return parents


def _never_ran(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and trial.user_attrs.get("stop_reason") == SURPLUS


def _params(trial: FrozenTrial) -> dict[str, Any]:
    return dict(trial.params or trial.system_attrs.get("fixed_params") or {})


def _key(trial: FrozenTrial) -> str:
    return json.dumps(_params(trial), sort_keys=True, default=str)


def unretried(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The cut-off trials with values to run and no retry that ran or is queued; a trial
    that is itself the MAX_RETRY-th retry of its values is not run again (a config that
    kills its worker every time must not take the run down with it)."""
    covered: set[int] = set()
    for trial in trials:
        if not _never_ran(trial):
            covered |= _parents(trial)
    by_number = {t.number: t for t in trials}

    def tries(trial: FrozenTrial) -> int:  # how many times its values ran before it
        parents = [by_number[n] for n in _parents(trial) if n in by_number and n < trial.number]
        return 1 + tries(max(parents, key=lambda t: t.number)) if parents else 0

    return [t for t in trials if is_cut_off(t) and t.number not in covered and _params(t)
            and tries(t) < storages.MAX_RETRY]  # fmt: skip


def queued_retries(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The retries waiting to run."""
    return [t for t in trials if t.state == TrialState.WAITING and _parents(t)]


def queue(study: optuna.Study) -> list[int]:
    """Queue a retry of each cut-off trial that has none, put every queued retry ahead of
    the stage's other queued trials, and drop queued duplicates; returns the numbers of the
    cut-off trials queued now."""
    trials = study.get_trials(deepcopy=False)
    todo = unretried(trials)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    retries = [t.number for t in waiting if _parents(t)]
    others = [t for t in waiting if not _parents(t)]
    moved: list[FrozenTrial] = []
    if others and (todo or min(t.number for t in others) < max(retries, default=-1)):
        moved = fail_waiting(study, others)  # queued again below, behind the retries
    for trial in todo:
        study.enqueue_trial(_params(trial), user_attrs={"retry_of": trial.number})
    for trial in moved:
        study.enqueue_trial(_params(trial), user_attrs=dict(trial.user_attrs))
    drop_duplicates(study)
    return [t.number for t in todo]


def drop_duplicates(study: optuna.Study) -> None:
    """Fail each queued trial whose values an earlier live trial holds: commands that start
    a stage at the same moment may each queue its first trials."""
    seen: set[str] = set()
    duplicates = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state not in LIVE or not _params(trial):
            continue
        key = _key(trial)
        if key in seen and trial.state == TrialState.WAITING:
            duplicates.append(trial)
        seen.add(key)
    fail_waiting(study, duplicates)


def finish(study: optuna.Study) -> None:
    """A stage that has its budget leaves nothing queued: what waits is beyond the budget."""
    states = rows.trial_states(study)
    if TrialState.WAITING in states.values():
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        fail_waiting(study, waiting)


def fail_waiting(study: optuna.Study, trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Fail queued trials as never run (``surplus``), each only if it is still queued (no
    worker took it meanwhile); returns those failed."""
    rdb = rows.rdb_of(study._storage)
    failed = []
    for trial in trials:
        if rdb is None:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        else:
            update = (
                _TRIALS.update()
                .where(_TRIALS.c.trial_id == trial._trial_id)
                .where(_TRIALS.c.state == TrialState.WAITING)
                .values(state=TrialState.FAIL, datetime_complete=datetime.datetime.now())
            )
            with rdb.engine.begin() as connection:
                if connection.execute(update).rowcount != 1:
                    continue  # a worker took it
            _set_attrs(rdb, trial._trial_id, {"stop_reason": SURPLUS})
        failed.append(trial)
    return failed


def _set_attrs(rdb: optuna.storages.RDBStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    """User attrs of a trial, finished or not (Optuna refuses to write a finished one's)."""
    if rdb.engine.name not in rows.UPSERT:
        return
    statement = rows.upsert_statement(rdb.engine.name, rows.USER_ATTRS)
    values = [
        {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
    ]
    with rdb.engine.begin() as connection:
        connection.execute(statement, values)


def last_heartbeats(
    rdb: optuna.storages.RDBStorage, trial_ids: Iterable[int]
) -> dict[int, datetime.datetime]:
    """The last heartbeat of each trial that sent one, in the database's clock."""
    ids = list(trial_ids)
    if not ids:
        return {}
    query = sqlalchemy.select(_BEATS.c.trial_id, _BEATS.c.heartbeat).where(
        _BEATS.c.trial_id.in_(ids)
    )
    with rdb.engine.connect() as connection:
        return {trial_id: beat for trial_id, beat in connection.execute(query)}


@dataclass(frozen=True)
class Stale:
    """A running trial whose heartbeat stopped: its worker is gone."""

    number: int
    last: datetime.datetime  # its last heartbeat, in the database's clock
    silent: float  # seconds since
    started: datetime.datetime | None = None  # when it started, in its worker's clock


def stale_trials(study: optuna.Study) -> list[Stale]:
    """The running trials of a stage whose heartbeat has been silent longer than its grace
    period (recorded with the trial; else the default's)."""
    rdb = rows.rdb_of(study._storage)
    if rdb is None:
        return []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beats = last_heartbeats(rdb, [t._trial_id for t in running])
    if not beats:
        return []
    with rdb.engine.connect() as connection:
        now = connection.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
    if isinstance(now, str):  # SQLite's CURRENT_TIMESTAMP, as text
        now = datetime.datetime.fromisoformat(now)
    now = now.replace(tzinfo=None)  # as Optuna compares them
    default = float(storages.HEARTBEAT_SECONDS * storages.MISSED_HEARTBEATS)
    found = []
    for trial in running:
        last = beats.get(trial._trial_id)
        if last is None:
            continue
        silent = (now - last).total_seconds()
        if silent > float(trial.user_attrs.get("heartbeat_grace", default)):
            found.append(Stale(trial.number, last, silent, trial.datetime_start))
    return found
