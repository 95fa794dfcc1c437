"""Output files (export, report, train): an ``out=`` that cannot be written is one line and
exit status 2 before any work, and a file is written whole or not at all, with no temporary
file left behind on any failure."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import fake_study
from tests.fs import tree, unwritable
from tuner import files
from tuner.cli import main
from tuner.errors import UserError


@pytest.fixture()
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished fake stage in tmp_path, which is also the current folder."""
    fake_study.write(tmp_path, trials=2, epochs=1, sleep=0.0)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "study=fake.yaml"]) == 0
    return tmp_path


def bad_outs(folder: Path) -> dict[str, tuple[str, str]]:
    """out= values that cannot be written, and what the one line says about each."""
    (folder / "sub").mkdir()
    os.mkfifo(folder / "fifo")
    return {
        "empty": ("", "needs a file name"),
        "this folder": (".", "is a folder"),
        "a folder": (str(folder / "sub"), "is a folder"),
        "in /proc": ("/proc/x", "cannot write in folder /proc"),
        # A FIFO, not /dev/null: a code without the check renames over the target.
        "a FIFO": (str(folder / "fifo"), "is not a regular file"),
        "no such folder": ("nowhere/x.out", "folder nowhere does not exist"),
        "below a file": ("fake.yaml/x.out", "fake.yaml is a file"),
        "unwritable folder": (str(folder / "locked" / "x.out"), "cannot write in folder"),
    }


@pytest.mark.parametrize("command", ["export", "report", "report-csv"])
def test_an_out_that_cannot_be_written_is_one_line_and_nothing_is_written(
    command: str, filled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    (filled / "locked").mkdir()
    cases = bad_outs(filled)
    with unwritable(filled / "locked"):
        for name, (out, message) in cases.items():
            before = tree(filled)
            args = [command.split("-")[0], "study=fake.yaml", f"out={out}"]
            if command == "report-csv":
                args.append("format=csv")
            code = main(args)
            err = capsys.readouterr().err
            assert code == 2, (name, err)
            assert err.startswith(f"tuner: out={out}") and err.count("\n") == 1, (name, err)
            assert message in err, (name, err)
            assert tree(filled) == before, name  # no .tmp file, nothing else either
    assert not [p for p in Path("/proc").glob(".*.tmp")]


def test_export_checks_out_before_it_reads_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no storage here: the out= mistake is the one named
    assert main(["export", "out=/proc/best.yaml"]) == 2
    assert "out=/proc/best.yaml: cannot write" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_whole_and_a_failure_leaves_the_old_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out.yaml"
    files.write(target, "old\n")
    assert target.read_text() == "old\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600

    def interrupted(handle: object) -> None:
        handle.write(b"half")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write(target, interrupted)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml"]
    with unwritable(tmp_path), pytest.raises(UserError, match=r"Cannot write .*out\.yaml"):
        files.write(target, "new\n")
    assert target.read_text() == "old\n"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


MODEL_OBJECTIVE = '''
import torch

from fakeobj import train as fake_train


def train(config, report, test=False):
    """The fake objective, with a model to save."""
    return {**fake_train(config, report, test=test), "model": torch.nn.Linear(64, 64)}
'''


@pytest.fixture()
def exported(filled: Path) -> Path:
    """best.yaml of the fake stage, its objective one that returns a model."""
    assert main(["export", "study=fake.yaml", "out=best.yaml"]) == 0
    (filled / "modelobj.py").write_text(MODEL_OBJECTIVE)
    best = filled / "best.yaml"
    best.write_text(best.read_text().replace("fakeobj:train", "modelobj:train"))
    return best


def tuner(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


@pytest.mark.parametrize("out", ["", "/proc/trained", "best.yaml", "locked/trained"])
def test_train_checks_out_before_it_trains(out: str, exported: Path) -> None:
    (exported.parent / "locked").mkdir()
    with unwritable(exported.parent / "locked"):
        before = tree(exported.parent)
        done = tuner(sys.executable, "-m", "tuner", "train", "config=best.yaml", f"out={out}",
                     cwd=exported.parent)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"tuner: out={out}"), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert "epoch" not in done.stdout  # it did not train first
        assert tree(exported.parent) == before


FULL_DISK = textwrap.dedent("""\
    disk=$1
    shift
    mount -t tmpfs -o size=64k tuner-test "$disk" || exit 99
    head -c 1048576 /dev/zero > "$disk/filler" 2>/dev/null
    "$@"
    code=$?
    echo "LISTING:"
    ls -A "$disk/trained"
    exit $code
""")


def test_train_on_a_full_disk_is_one_line_and_leaves_no_half_written_file(
    exported: Path,
) -> None:
    # A real full disk: a 64 KiB tmpfs, filled, in a mount namespace of its own (the mount
    # ends with the command). Skipped where this process may not make one.
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    disk = exported.parent / "disk"
    disk.mkdir()
    done = tuner(
        "unshare", "-m", "sh", "-c", FULL_DISK, "sh", str(disk),
        sys.executable, "-m", "tuner", "train", "config=best.yaml", "out=disk/trained",
        cwd=exported.parent,
    )  # fmt: skip
    if done.returncode == 99 or "unshare failed" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "No space left on device; nothing was written" in done.stderr
    assert "model.pt" in done.stderr
    output, listing = done.stdout.split("LISTING:\n")
    assert "epoch   1" in output  # it trained, then the write failed
    assert listing == ""  # no model.pt, no metrics.yaml, no temporary file


def test_a_reader_that_leaves_early_ends_the_command_quietly(filled: Path) -> None:
    # `python -m tuner status | head -1`, made certain: the pipe's read end is closed before
    # the command writes its first line, so every write meets a closed pipe.
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tuner", "status", "study=fake.yaml"],
            cwd=filled, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell reports `yes | head -1`
