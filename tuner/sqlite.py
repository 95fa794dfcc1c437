"""SQLite connections: a wait for another process's lock that says so, and read-only files.

A writer waits for another one's lock (``BEGIN EXCLUSIVE`` in a shell, a backup tool, a
command on another machine of a shared folder) up to ``busy_seconds()``: 60 s, or
TUNER_SQLITE_BUSY_SECONDS. Once it has waited a few seconds it prints one line saying so;
on giving up it raises DatabaseLocked (one line, exit status 2) instead of SQLite's
"database is locked", which Optuna reports as "invalid data in the commit".

The wait is SQLite's own busy timeout, taken in steps of WAIT_STEP seconds: a statement
that got SQLITE_BUSY after its busy handler waited is tried again, as the handler itself
would (a BUSY that comes at once, without a wait, is a deadlock and is raised as it is), and
Ctrl-C is seen between steps.
"""

from __future__ import annotations

import functools
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy

from tuner.errors import UserError

BUSY_SECONDS = 60.0  # how long a statement waits for a lock another process holds
BUSY_ENV = "TUNER_SQLITE_BUSY_SECONDS"
NOTICE_SECONDS = 5.0  # a wait this long (or half the limit, if less) gets a line on stderr
WAIT_STEP = 1.0  # seconds of SQLite's busy timeout per try
_T = TypeVar("_T")
_NOTICED: set[str] = set()  # the files this process has said it waits for


class DatabaseLocked(UserError):
    """Another process held the database's lock for longer than the wait allows."""


def busy_seconds() -> float:
    """The wait for a locked database: TUNER_SQLITE_BUSY_SECONDS, else BUSY_SECONDS."""
    text = os.environ.get(BUSY_ENV)
    if text is None:
        return BUSY_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise UserError(
            f"{BUSY_ENV}={text}: the wait for a locked database is a number of seconds, 0 or"
            f" more (default {BUSY_SECONDS:g})."
        )
    return value


def connect_args() -> dict[str, Any]:
    """``connect_args`` for SQLAlchemy's sqlite3 driver: the waiting connection class."""
    return {"factory": Connection, "timeout": min(WAIT_STEP, busy_seconds())}


def writable(path: Path) -> bool:
    """Whether SQLite may write the file and make its journal files beside it."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def read_only_creator(path: Path) -> Callable[[], sqlite3.Connection]:
    """A ``creator`` for SQLAlchemy that opens the file read-only (``mode=ro``), for a
    database this user may read but not write."""
    return functools.partial(_connect_read_only, path.resolve())


def _connect_read_only(path: Path) -> sqlite3.Connection:
    base = f"file:{quote(str(path))}?mode=ro"
    kwargs = {**connect_args(), "uri": True, "check_same_thread": False}
    try:
        connection = sqlite3.connect(base, **kwargs)
        connection.execute("PRAGMA schema_version").fetchone()  # opens it, and its WAL index
        return connection
    except sqlite3.OperationalError as exc:
        wal = path.with_name(path.name + "-wal")
        if getattr(exc, "sqlite_errorname", "") != "SQLITE_CANTOPEN" or (
            wal.exists() and wal.stat().st_size > 0
        ):
            raise
    # A WAL database in a folder this user cannot write, with no WAL file beside it: SQLite
    # cannot make its WAL index there, and there is nothing in a WAL to miss.
    return sqlite3.connect(f"{base}&immutable=1", **kwargs)


def tune(engine: sqlalchemy.engine.Engine) -> None:
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


class Connection(sqlite3.Connection):
    """A sqlite3 connection whose statements wait for a lock as the module says."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        name = str(database)
        if name.startswith("file:"):
            name = name[len("file:") :].split("?", 1)[0]
        self.file = name
        self.limit = busy_seconds()
        self.step = min(WAIT_STEP, self.limit)

    def cursor(self, factory: Any = None) -> Any:
        return super().cursor(factory or Cursor)

    def commit(self) -> None:
        _waiting(self, super().commit)


class Cursor(sqlite3.Cursor):
    """The cursor SQLAlchemy runs statements with, on a ``Connection``."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return _waiting(self.connection, lambda: super(Cursor, self).execute(sql, parameters))

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Any:
        many = super().executemany
        return _waiting(self.connection, lambda: many(sql, seq_of_parameters))


def _waiting(connection: Any, call: Callable[[], _T]) -> _T:
    """``call()``, tried again while another process holds the lock, up to the limit."""
    if not isinstance(connection, Connection):
        return call()
    started = time.monotonic()
    while True:
        tried = time.monotonic()
        try:
            return call()
        except sqlite3.OperationalError as exc:
            waited = time.monotonic() - tried
            if not _busy(exc) or waited < connection.step / 2:
                raise  # not a lock, or a deadlock SQLite refused to wait on
        total = time.monotonic() - started
        if total >= connection.limit:
            raise DatabaseLocked(
                f"{connection.file} stayed locked by another process for {total:.0f} s;"
                " stop that process (or let it finish) and run again, or wait longer with"
                f" {BUSY_ENV}=SECONDS (now {connection.limit:g})."
            ) from None
        if total >= min(NOTICE_SECONDS, connection.limit / 2) and connection.file not in _NOTICED:
            _NOTICED.add(connection.file)
            print(
                f"tuner: {connection.file} is locked by another process; waiting up to"
                f" {connection.limit:g} s for it ({BUSY_ENV} sets how long).",
                file=sys.stderr,
                flush=True,
            )


def _busy(exc: sqlite3.OperationalError) -> bool:
    name = getattr(exc, "sqlite_errorname", None)
    return name == "SQLITE_BUSY" if name else "database is locked" in str(exc)
