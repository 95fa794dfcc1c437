"""Where the stages live: an Optuna RDB storage (SQLite by default, PostgreSQL to scale out).

Everything stored is plain Optuna data, so ``optuna-dashboard <url>`` reads it as it is.
Passwords in storage URLs never leave this module unmasked.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from tuner.errors import UserError

DEFAULT_URL = "sqlite:///tuner.db"
_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]*:)(?P<password>[^@\s]*)@", re.I)


def mask(text: str) -> str:
    """Any ``scheme://user:password@`` in a text with the password replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)


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


def open_storage(url: str, heartbeat: float | None = None) -> optuna.storages.BaseStorage:
    """Open (and, for SQLite, create) a storage; a bad URL or a server that cannot be reached
    is a UserError naming the URL with its password masked.

    With ``heartbeat`` (seconds), running trials send heartbeats; the trials of a worker that
    died (no heartbeat for MISSED_HEARTBEATS beats) are failed and retried with the same
    parameters, up to MAX_RETRY times.
    """
    parsed = _parse(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.is_dir():
            raise UserError(f"storage={mask(url)}: folder {path.parent} does not exist.")
        # Writers wait for each other instead of failing with "database is locked".
        kwargs["connect_args"] = {"timeout": 60}
    elif parsed.drivername.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        beats: dict[str, Any] = {}
        if heartbeat is not None:
            beats = {
                "heartbeat_interval": max(1, round(heartbeat)),
                "grace_period": max(2, round(heartbeat * MISSED_HEARTBEATS)),
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY
                ),
            }
        storage = _create(url, kwargs, beats)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = mask(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise UserError(f"Cannot open storage {mask(url)}: {reason}") from None
    if path is not None:
        _tune_sqlite(storage.engine)
    return storage


def _create(
    url: str, engine_kwargs: dict[str, Any], beats: dict[str, Any]
) -> optuna.storages.RDBStorage:
    """The RDB storage; workers that start on a fresh database at the same moment race to
    create its tables, and the losers try again once the winner is done."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **beats)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def _tune_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """WAL lets readers (status, the dashboard) run beside a writer, and with
    synchronous=NORMAL a commit no longer waits for the disk: 3.7x less time per trial
    here (tests/benchmarks/bench_storage.py). A crash keeps the database consistent."""

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections made while creating the tables predate the listener


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether running trials of this storage send heartbeats."""
    return getattr(storage, "heartbeat_interval", None) is not None


def open_existing(url: str) -> optuna.storages.BaseStorage | None:
    """The storage if it may hold studies; None (and nothing created) for a missing file."""
    return open_storage(url) if exists(url) else None


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
