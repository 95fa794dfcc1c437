"""Storage that is busy or cannot be written: a locked SQLite file is waited for with a line
that says so, up to a stated limit, then one line and exit status 2; a file this user can
read but not write is read by status, export and report, and refused by run in one line."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import fake_study
from tests.fs import tree, unwritable
from tuner import sqlite
from tuner.cli import main


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fake stage, run in a process of its own, which has closed the database
    when it ends, as a user's earlier run has."""
    folder = tmp_path_factory.mktemp("finished")
    fake_study.write(folder, trials=2, epochs=1, sleep=0.0)
    done = tuner("run", "study=fake.yaml", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture()
def filled(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished stage's folder in tmp_path/db."""
    return Path(shutil.copytree(finished, tmp_path / "db"))


def tuner(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args], cwd=cwd, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )  # fmt: skip


@pytest.mark.parametrize("locked", ["file", "file and folder"])
def test_a_database_this_user_cannot_write_is_read_by_status_export_and_report(
    locked: str, filled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # "file": SQLite may still make its -shm and -wal files beside it; "file and folder": it
    # cannot, and the file is read as it is (a copy on a read-only share).
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(filled)
    study = "study=fake.yaml"
    with contextlib.ExitStack() as stack:
        stack.enter_context(unwritable(filled / "tuner.db"))
        if locked == "file and folder":
            stack.enter_context(unwritable(filled))
        before = tree(filled)
        capsys.readouterr()
        assert main(["status", study]) == 0, capsys.readouterr().err
        assert re.search(r"^lr +2/2 +2 ", capsys.readouterr().out, re.M)
        assert main(["export", study, f"out={out / 'best.yaml'}"]) == 0
        assert main(["report", study, f"out={out / 'report.csv'}"]) == 0
        assert "validation accuracy" in capsys.readouterr().out
        assert main(["run", study, "restart=true"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "this user cannot write" in err, err
        if locked == "file and folder":
            assert tree(filled) == before  # read as it is: nothing made beside it
    assert (out / "best.yaml").is_file() and (out / "report.csv").is_file()


HOLD = textwrap.dedent("""\
    import sqlite3, sys, time
    connection = sqlite3.connect(sys.argv[1], isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_database_locked_by_another_process_is_waited_for_then_one_line(
    filled: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(filled / "tuner.db")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        done = tuner("run", "study=fake.yaml", "restart=true", cwd=filled,
                     TUNER_SQLITE_BUSY_SECONDS="2")  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 2, done.stderr  # the wait, then giving up: no traceback
    assert lines[0] == (
        f"tuner: {filled / 'tuner.db'} is locked by another process; waiting up to 2 s for it"
        " (TUNER_SQLITE_BUSY_SECONDS sets how long)."
    )
    assert lines[1].startswith(f"tuner: {filled / 'tuner.db'} stayed locked by another process")
    assert "TUNER_SQLITE_BUSY_SECONDS=SECONDS" in lines[1]
    done = tuner("status", "study=fake.yaml", cwd=filled)  # the lock gone, all is there
    assert done.returncode == 0 and re.search(r"^lr +2/2 ", done.stdout, re.M), done.stderr


def test_a_lock_released_within_the_wait_is_no_error(filled: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(filled / "tuner.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    runner = subprocess.Popen(
        [sys.executable, "-m", "tuner", "run", "study=fake.yaml", "restart=true"],
        cwd=filled, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TUNER_SQLITE_BUSY_SECONDS": "120", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert runner.stderr is not None
        notice = runner.stderr.readline()  # it waits, and says so ...
        assert "is locked by another process; waiting up to 120 s" in notice
    finally:
        holder.kill()  # ... and goes on once the lock is gone
        holder.wait()
    out, err = runner.communicate(timeout=300)
    assert runner.returncode == 0, err
    assert re.search(r"^lr +2/2 ", out, re.M)


@pytest.mark.parametrize("text", ["soon", "-1", "nan", "inf"])
def test_a_bad_wait_limit_is_one_line(
    text: str, filled: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(filled)
    monkeypatch.setenv(sqlite.BUSY_ENV, text)
    before = tree(filled)
    assert main(["status", "study=fake.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tuner: TUNER_SQLITE_BUSY_SECONDS={text}: the wait for a locked database is a number"
        " of seconds, 0 or more (default 60).\n"
    )
    assert tree(filled) == before
