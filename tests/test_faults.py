"""Faults that must not lose work, with real processes and real signals: a worker killed
mid-trial is replaced and its trial run again; an interrupt of the run reaches every worker;
the workers of a killed run stop; a cut-off trial's values run again before anything new;
commands side by side draw their own trials; a dead trial shows as stale."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests import fake_study
from tests.test_scale import finished, start, trials, wait_for

LEFT = (TrialState.WAITING, TrialState.RUNNING)


def running_in(storage: str, pid: int, other: bool = False) -> list[optuna.trial.FrozenTrial]:
    """The running trials that process ``pid`` runs (``other``: that another process runs)."""
    return [t for t in trials(storage) if t.state == TrialState.RUNNING and "pid" in t.user_attrs
            and (t.user_attrs["pid"] != pid) == other]  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_killed_worker_is_replaced_and_its_trial_runs_again(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    fake_study.write(tmp_path, trials=6, epochs=4, sleep=0.4)
    storage = (
        f"sqlite:///{tmp_path}/tuner.db"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    run = start(tmp_path, f"storage={storage}", "workers=2", "heartbeat=1")
    wait_for(lambda: running_in(storage, run.pid, other=True))
    (victim,) = running_in(storage, run.pid, other=True)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)  # mid-trial, no chance to clean up
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    assert "Traceback" not in err
    after = trials(storage)
    assert len([t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 6
    assert not [t for t in after if t.state in LEFT]  # nothing left queued or running
    dead = next(t for t in after if t.number == victim.number)
    assert dead.state == TrialState.FAIL
    assert dead.user_attrs["error"].startswith("its worker stopped")
    again = [t for t in after if victim.number in t.system_attrs.get("retry_history", [])]
    assert [t.state for t in again] == [TrialState.COMPLETE]
    assert again[0].params == victim.params  # run again as it was
    assert "ended with exit status -9; a new worker takes its place" in err
