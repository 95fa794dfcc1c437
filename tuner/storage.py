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

from tuner import sqlite
from tuner.errors import UserError

# The runner's one-query reads and batched writes of Optuna's rows live in tuner.rows; they
# are here too, under the names the runner has always called them by.
from tuner.rows import FLUSH_SECONDS as FLUSH_SECONDS
from tuner.rows import Reports as Reports
from tuner.rows import best_complete as best_complete
from tuner.rows import count_complete as count_complete
from tuner.rows import rdb_of as _rdb
from tuner.rows import set_study_user_attrs as set_study_user_attrs
from tuner.rows import set_user_attrs as set_user_attrs
from tuner.rows import trial_states as trial_states

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
