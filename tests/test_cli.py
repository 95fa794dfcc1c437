"""The command line, as a newcomer meets it: errors are one line, a tiny run round-trips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuner import yamlio
from tuner.cli import main


def tuner(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: python -m tuner COMMAND" in capsys.readouterr().out


def test_a_later_stage_in_an_empty_folder_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    result = tuner("run", "stage=optimizer", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert "stage lr" in lines[0] or "stage batch_size" in lines[0]
    assert "python -m tuner run stage=batch_size" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no database file left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fly"], "Unknown command 'fly'"),
        (["run", "lrr=0.1"], "Unknown config key: lrr (did you mean lr?)"),
        (["run", "lr=fast"], "lr=fast: lr must be a number"),
        (["run", "stage=warmup"], "Unknown stage 'warmup'"),
        (["run", "study=nope"], "Unknown study 'nope'"),
        (["run", "storage=sqlite:////no/such/dir/t.db"], "folder /no/such/dir does not exist"),
        (["status"], "No storage at sqlite:///tuner.db"),
        (["export"], "Nothing to export"),
        (["train"], "train needs config=FILE"),
        (["train", "config=missing.yaml"], "missing.yaml: no such file"),
        (["run", "objective=nowhere_pkg:train"], "cannot import module 'nowhere_pkg'"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1, err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_tiny_run_then_status_export_and_train_round_trip(tmp_path: Path) -> None:
    # A whole staged run on digits, small enough for a test: 2 trials a stage, 3 epochs.
    run = tuner("run", "study=digits_mlp", "trials=7", "epochs=3", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for stage in ("batch_size", "lr", "optimizer", "architecture"):
        assert "== stage" in run.stdout and f"[{stage} " in run.stdout
    assert "next:" in run.stdout

    status = tuner("status", "study=digits_mlp", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "architecture" in status.stdout and "(lr#" in status.stdout

    export = tuner("export", "study=digits_mlp", "out=best.yaml", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    document = yamlio.load(tmp_path / "best.yaml")
    assert document["config"]["data"]["name"] == "digits"
    assert document["config"]["epochs"] == 3  # the override is part of the config
    # The refinement stage re-tunes what the lr stage chose (lr, schedule, warm-up): every
    # value of the lr stage now comes from it.
    assert set(document["provenance"]["stages"]) == {
        "batch_size",
        "optimizer",
        "architecture",
        "refine",
    }

    train = tuner("train", "config=best.yaml", "out=trained", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    metrics = yamlio.load(tmp_path / "trained" / "metrics.yaml")
    # Same config, same seed, same machine: the best epoch's validation value comes back
    # exactly (the trial's value, provenance.value, is its smoothed peak: loop.smooth).
    assert metrics["validation"]["accuracy"] == pytest.approx(
        document["validation"]["accuracy"], abs=1e-12
    )
    assert 0.0 < metrics["test"]["accuracy"] <= 1.0  # the test split is scored, once, here
    assert (tmp_path / "trained" / "model.pt").is_file()
