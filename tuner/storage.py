"""Where the stages live: an Optuna RDB storage (SQLite by default, PostgreSQL to scale out).

Everything stored is plain Optuna data, so ``optuna-dashboard <url>`` reads it as it is.
Passwords in storage URLs never leave this module unmasked.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from tuner import sqlite
from tuner.errors import UserError

DEFAULT_URL = "sqlite:///tuner.db"
# ``scheme://user:password@host``: the password runs to the ``@`` that a host follows, so
# one with a space, a ``/`` or a raw ``@`` in it is hidden whole (over-masking is safe).
_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]*:)(?P<password>[^\n]*?)@(?=[^@/\s]*(?:[/?\s]|$))",
    re.I,
)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)[^&#\s]*", re.I)


def mask(text: str) -> str:
    """A text with the password of any storage URL in it replaced by ``***``: the one of
    ``scheme://user:password@host`` and of a ``?password=`` query parameter (libpq's)."""
    text = _PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group('head')}***", text)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other databases or in-memory SQLite)."""
    if not url.startswith("sqlite:"):
        return None
    database = _parse(url).database
    return Path(database) if database and database != ":memory:" else None


def exists(url: str) -> bool:
    """Whether a storage may hold studies: a SQLite file that is there, or a server URL."""
    path = sqlite_path(url)
    return path is None or path.is_file()


HEARTBEAT_SECONDS = 10  # a running trial's worker writes a heartbeat this often
MISSED_HEARTBEATS = 3  # a trial silent for this many heartbeats is failed, and retried
MAX_RETRY = 2  # retries of one trial whose worker died
CREATE_ATTEMPTS = 5  # tries to open a database whose tables another worker is creating


def open_storage(
    url: str, heartbeat: float | None = None, *, read_only: bool = False
) -> optuna.storages.BaseStorage:
    """Open (and, for SQLite, create) a storage; a bad URL or a server that cannot be reached
    is a UserError naming the URL with its password masked.

    A SQLite file this user cannot write (or in a folder they cannot write) is opened
    read-only where ``read_only`` says the command only reads, else refused.

    With ``heartbeat`` (seconds), running trials send heartbeats; the trials of a worker that
    died (no heartbeat for MISSED_HEARTBEATS beats) are failed and retried with the same
    parameters, up to MAX_RETRY times.
    """
    from tuner import retry  # it writes through this module

    parsed = _parse(url)
    kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.is_dir():
            raise UserError(f"storage={mask(url)}: folder {path.parent} does not exist.")
        # Writers wait for each other instead of failing with "database is locked", and
        # say so when the wait is long (tuner/sqlite.py).
        kwargs["connect_args"] = sqlite.connect_args()
        if path.exists() and not sqlite.writable(path):
            if not read_only:
                raise UserError(
                    f"storage={mask(url)}: this user cannot write {path} (or make files in"
                    " its folder); status, export and report can read it, run needs a copy"
                    " that can be written."
                )
            kwargs["creator"] = sqlite.read_only_creator(path)
    elif parsed.drivername.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    if not parsed.drivername.startswith("sqlite"):
        # A server may drop an idle connection: each is tested before use. A file needs no
        # test, and on SQLite it would double the queries.
        kwargs["pool_pre_ping"] = True
    try:
        beats: dict[str, Any] = {}
        if heartbeat is not None:
            beats = {
                "heartbeat_interval": max(1, round(heartbeat)),
                "grace_period": max(2, round(heartbeat * MISSED_HEARTBEATS)),
                "heartbeat_stale_trial_callback": retry.StaleTrialCallback(max_retry=MAX_RETRY),
            }
        storage = _create(url, kwargs, beats)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = mask(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise UserError(f"Cannot open storage {mask(url)}: {reason}") from None
    if path is not None and "creator" not in kwargs:
        sqlite.tune(storage.engine)
    return storage


_CHECKED: set[str] = set()  # databases whose schema version this process has checked


def _create(
    url: str, engine_kwargs: dict[str, Any], beats: dict[str, Any]
) -> optuna.storages.RDBStorage:
    """The RDB storage; workers that start on a fresh database at the same moment race to
    create its tables, and the losers try again once the winner is done.

    Optuna checks the schema version by loading all its migration scripts (50 ms); a run
    opens its database more than once, and checks it the first time only.
    """
    path = sqlite_path(url)
    database = str(path.resolve()) if path is not None else url
    for attempt in range(CREATE_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                skip_compatibility_check=database in _CHECKED,
                **beats,
            )
            _CHECKED.add(database)
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether running trials of this storage send heartbeats."""
    return getattr(storage, "heartbeat_interval", None) is not None


def heartbeat_grace(storage: optuna.storages.BaseStorage | None) -> float | None:
    """Seconds a running trial's heartbeat may be silent before the trial is failed (None:
    no heartbeats)."""
    rdb = _rdb(storage)
    if rdb is None or rdb.heartbeat_interval is None:
        return None
    return float(rdb.grace_period or 2 * rdb.heartbeat_interval)


# --- what the runner reads and writes after every trial, in one query each -----------------
# Optuna reads a study's trials whole (six queries, and a FrozenTrial each) and commits every
# user attr on its own. Where the runner needs only states or the best value, one small query
# does; a trial's results go in with one statement, and its reported values with one about
# once a second (``Reports``). The rows are Optuna's own, as Optuna writes them. Storages that
# are not a database fall back on Optuna's calls, and so do the writes on databases other
# than SQLite and PostgreSQL.

_UPSERT: dict[str, Any] = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}
_TRIALS = models.TrialModel.__table__
_VALUES = models.TrialValueModel.__table__
_USER_ATTRS = models.TrialUserAttributeModel.__table__
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
    rdb = _rdb(study._storage)
    if rdb is None:
        return {t.number: t.state for t in study.get_trials(deepcopy=False)}
    with rdb.engine.connect() as connection:
        rows = connection.execute(_STATES, {"study_id": study._study_id})
        return {number: state for number, state in rows}


def count_complete(study: optuna.Study) -> int:
    """How many trials of a study are COMPLETE, read with one query."""
    rdb = _rdb(study._storage)
    if rdb is None:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    with rdb.engine.connect() as connection:
        return int(connection.execute(_COMPLETE, {"study_id": study._study_id}).scalar_one())


def best_complete(study: optuna.Study, attr: str | None = None) -> tuple[int, float] | None:
    """The number and value of the best COMPLETE trial with a finite value (ties: the earlier
    trial), among those that have the user attr ``attr`` where one is named; one query."""
    best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    rdb = _rdb(study._storage)
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
    rdb = _rdb(getattr(trial, "storage", None))
    if rdb is None or rdb.engine.name not in _UPSERT or not attrs:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    rows = [{"key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    _upsert(rdb, trial, _USER_ATTRS, rows)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what trial.user_attrs shows


def set_study_user_attrs(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    """Set user attrs of a study in one statement, as ``study.set_user_attr`` would set each
    (a stage records its plan with a handful of them)."""
    rdb = _rdb(study._storage)
    if rdb is None or rdb.engine.name not in _UPSERT or not attrs:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    rows = [
        {"study_id": study._study_id, "key": key, "value_json": json.dumps(value)}
        for key, value in attrs.items()
    ]
    with rdb.engine.begin() as connection:
        connection.execute(_upsert_statement(rdb.engine.name, _STUDY_USER_ATTRS), rows)


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
        rdb = _rdb(getattr(trial, "storage", None))
        self._rdb = rdb if rdb is not None and rdb.engine.name in _UPSERT else None
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
    upsert = _upsert_statement(rdb.engine.name, table)
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
            _USER_ATTRS.c.trial_id == _TRIALS.c.trial_id,
            _USER_ATTRS.c.key == sqlalchemy.bindparam("attr"),
        )
    )


@functools.cache
def _upsert_statement(dialect: str, table: sqlalchemy.Table) -> Any:
    """INSERT ... ON CONFLICT (trial, key) DO UPDATE for the rows of a trial's attrs or
    intermediate values (the one unique constraint of each table)."""
    (unique,) = [c for c in table.constraints if isinstance(c, sqlalchemy.UniqueConstraint)]
    insert = _UPSERT[dialect](table)
    keys = {column.name for column in unique.columns}
    return insert.on_conflict_do_update(
        index_elements=list(unique.columns),
        set_={
            c.name: insert.excluded[c.name]
            for c in table.columns
            if c.name not in keys and not c.primary_key
        },
    )


def _rdb(storage: optuna.storages.BaseStorage | None) -> optuna.storages.RDBStorage | None:
    """The database storage behind a study's storage (Optuna wraps it in a cache), if any."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def open_existing(
    url: str, heartbeat: float | None = None, *, read_only: bool = False
) -> optuna.storages.BaseStorage | None:
    """The storage if it may hold studies; None (and nothing created) for a missing file."""
    return open_storage(url, heartbeat, read_only=read_only) if exists(url) else None


def load(storage: optuna.storages.BaseStorage | None, name: str) -> optuna.Study | None:
    """A stage's study, or None where the storage has no study of that name."""
    if storage is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _parse(url: str) -> Any:
    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise UserError(
            f"storage={mask(url)} is not a database URL: use sqlite:///tuner.db or"
            " postgresql://user:password@host/db."
        ) from None
