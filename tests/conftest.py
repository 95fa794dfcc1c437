"""Shared fixtures: a private cache folder, and a fresh PostgreSQL database."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # Generated data sets are cached on disk; tests share one cache of their own.
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped at the end.

    Skipped where no server runs; CI sets TUNER_REQUIRE_POSTGRES=1 and then it fails.
    """
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("TUNER_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here and not reachable: {exc}")
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({exc})")
    name = f"tuner_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
