"""What the runner reads and writes after every trial, in one query each, on Optuna's own rows.

Optuna reads a study's trials whole (six queries, and a FrozenTrial each) and commits every
user attr on its own. Where the runner needs only states or the best value, one small query
does; a trial's results go in with one statement, and its reported values with one about
once a second (``Reports``). The rows are Optuna's own, as Optuna writes them (its private
``optuna.storages._rdb.models``). Storages that are not a database fall back on Optuna's
calls, and so do the writes on databases other than SQLite and PostgreSQL. tuner.storage
opens the storages and re-exports these functions under its name.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

# The databases whose writes go in one statement (tuner.retry writes attrs through these too).
UPSERT: dict[str, Any] = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}
_TRIALS = models.TrialModel.__table__
_VALUES = models.TrialValueModel.__table__
USER_ATTRS = models.TrialUserAttributeModel.__table__
_STUDY_USER_ATTRS = models.StudyUserAttributeModel.__table__
_INTERMEDIATE = models.TrialIntermediateValueModel.__table__
# The statements are built once, so that SQLAlchemy compiles each once.
_STUDY = _TRIALS.c.study_id == sqlalchemy.bindparam("study_id")
_STATES = sqlalchemy.select(_TRIALS.c.number, _TRIALS.c.state).where(_STUDY)
_COMPLETE = (
    sqlalchemy.select(sqlalchemy.func.count())
    .select_from(_TRIALS)
    .where(_STUDY, _TRIALS.c.state == TrialState.COMPLETE)
)
_STATE = sqlalchemy.select(_TRIALS.c.state).where(
    _TRIALS.c.trial_id == sqlalchemy.bindparam("trial_id")
)


def trial_states(study: optuna.Study) -> dict[int, TrialState]:
    """Each trial's state, by trial number, read with one query."""
    rdb = rdb_of(study._storage)
    if rdb is None:
        return {t.number: t.state for t in study.get_trials(deepcopy=False)}
    with rdb.engine.connect() as connection:
        rows = connection.execute(_STATES, {"study_id": study._study_id})
        return {number: state for number, state in rows}


def count_complete(study: optuna.Study) -> int:
    """How many trials of a study are COMPLETE, read with one query."""
    rdb = rdb_of(study._storage)
    if rdb is None:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    with rdb.engine.connect() as connection:
        return int(connection.execute(_COMPLETE, {"study_id": study._study_id}).scalar_one())


def best_complete(study: optuna.Study, attr: str | None = None) -> tuple[int, float] | None:
    """The number and value of the best COMPLETE trial with a finite value (ties: the earlier
    trial), among those that have the user attr ``attr`` where one is named; one query."""
    best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    rdb = rdb_of(study._storage)
    if rdb is None:
        found = [
            (t.number, t.value)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
            and (attr is None or attr in t.user_attrs)
        ]  # fmt: skip
        return best(found, key=lambda pair: (pair[1], -pair[0])) if found else None
    with rdb.engine.connect() as connection:
        query = _best_statement(best is max, attr is not None)
        row = connection.execute(query, {"study_id": study._study_id, "attr": attr}).first()
    return None if row is None else (int(row[0]), float(row[1]))


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Set user attrs of a running trial in one transaction, as ``trial.set_user_attr`` would
    set each; a finished trial (failed by a heartbeat check, say) raises as it would."""
    rdb = rdb_of(getattr(trial, "storage", None))
    if rdb is None or rdb.engine.name not in UPSERT or not attrs:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    rows = [{"key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    _upsert(rdb, trial, USER_ATTRS, rows)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what trial.user_attrs shows


def set_study_user_attrs(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    """Set user attrs of a study in one statement, as ``study.set_user_attr`` would set each
    (a stage records its plan with a handful of them)."""
    rdb = rdb_of(study._storage)
    if rdb is None or rdb.engine.name not in UPSERT or not attrs:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    rows = [
        {"study_id": study._study_id, "key": key, "value_json": json.dumps(value)}
        for key, value in attrs.items()
    ]
    with rdb.engine.begin() as connection:
        connection.execute(upsert_statement(rdb.engine.name, _STUDY_USER_ATTRS), rows)


FLUSH_SECONDS = 1.0  # a running trial writes its reported values at most this often


class Reports:
    """``trial.report(value, step)`` for one running trial, written behind.

    A value is in the trial's own view at once, where Optuna's pruners read it; it goes to
    the database, with the values reported before it, in one statement once ``every`` seconds
    have passed since the last write, and at ``flush()``, which the runner calls before a
    trial is pruned or told. So a trial of short epochs writes about once a second instead
    of twice an epoch; the dashboard and other workers see a running trial's curve at most
    that much late, and a finished trial's curve whole. A finished trial (failed by a
    heartbeat check, say) refuses the write as Optuna's ``report`` does, at the flush.

    Example:
        >>> reports = Reports(trial)
        >>> for epoch in range(1, 13):
        ...     reports(0.9, epoch)
        ...     if trial.should_prune():
        ...         break
        >>> reports.flush()
    """

    def __init__(self, trial: optuna.Trial, every: float = FLUSH_SECONDS) -> None:
        self.trial, self.every = trial, every
        rdb = rdb_of(getattr(trial, "storage", None))
        self._rdb = rdb if rdb is not None and rdb.engine.name in UPSERT else None
        self._pending: dict[int, float] = {}
        self._written = time.monotonic()

    def __call__(self, value: float, step: int) -> None:
        value, step = float(value), int(step)
        reported = self.trial._cached_frozen_trial.intermediate_values
        if self._rdb is None or step < 0 or step in reported:
            # Optuna's own call: its checks, its warning for a step reported twice (the
            # first value stays), or a storage that is not a database.
            self.trial.report(value, step)
            return
        reported[step] = value  # what the pruner reads
        self._pending[step] = value
        if time.monotonic() - self._written >= self.every:
            self.flush()

    def flush(self) -> None:
        """Write the values not written yet, in one statement."""
        if self._rdb is None or not self._pending:
            return
        rows = []
        for step, value in self._pending.items():
            stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(
                value
            )
            rows.append({"step": step, "intermediate_value": stored,
                         "intermediate_value_type": kind})  # fmt: skip
        _upsert(self._rdb, self.trial, _INTERMEDIATE, rows)
        self._pending.clear()
        self._written = time.monotonic()


def _upsert(
    rdb: optuna.storages.RDBStorage,
    trial: optuna.Trial,
    table: sqlalchemy.Table,
    rows: list[dict[str, Any]],
) -> None:
    """Insert or update a running trial's rows of ``table`` in one transaction, after the
    check Optuna makes that the trial is not finished."""
    trial_id = trial._trial_id
    upsert = upsert_statement(rdb.engine.name, table)
    with rdb.engine.begin() as connection:
        state = connection.execute(_STATE, {"trial_id": trial_id}).scalar_one()
        rdb.check_trial_is_updatable(trial_id, state)
        connection.execute(upsert, [{"trial_id": trial_id, **row} for row in rows])


@functools.cache
def _best_statement(maximize: bool, with_attr: bool) -> sqlalchemy.Select[Any]:
    """The best finite COMPLETE trial (ties: the earlier); ``with_attr``: among those
    that have the user attr bound to ``attr``."""
    value = _VALUES.c.value
    query = (
        sqlalchemy.select(_TRIALS.c.number, value)
        .join(_VALUES, _VALUES.c.trial_id == _TRIALS.c.trial_id)
        .where(
            _STUDY,
            _TRIALS.c.state == TrialState.COMPLETE,
            _VALUES.c.objective == 0,
            _VALUES.c.value_type == models.TrialValueModel.TrialValueType.FINITE,
        )
        .order_by(value.desc() if maximize else value.asc(), _TRIALS.c.number.asc())
        .limit(1)
    )
    if not with_attr:
        return query
    return query.where(
        sqlalchemy.exists().where(
            USER_ATTRS.c.trial_id == _TRIALS.c.trial_id,
            USER_ATTRS.c.key == sqlalchemy.bindparam("attr"),
        )
    )


@functools.cache
def upsert_statement(dialect: str, table: sqlalchemy.Table) -> Any:
    """INSERT ... ON CONFLICT (trial, key) DO UPDATE for the rows of a trial's attrs or
    intermediate values (the one unique constraint of each table)."""
    (unique,) = [c for c in table.constraints if isinstance(c, sqlalchemy.UniqueConstraint)]
    insert = UPSERT[dialect](table)
    keys = {column.name for column in unique.columns}
    return insert.on_conflict_do_update(
        index_elements=list(unique.columns),
        set_={
            c.name: insert.excluded[c.name]
            for c in table.columns
            if c.name not in keys and not c.primary_key
        },
    )


def rdb_of(storage: optuna.storages.BaseStorage | None) -> optuna.storages.RDBStorage | None:
    """The database storage behind a study's storage (Optuna wraps it in a cache), if any."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None
