"""Scale out and survive: workers share a stage's budget exactly, a dead worker's trial is
retried, an interrupt keeps every finished trial. Real processes, real SQLite and PostgreSQL.
"""

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

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start(folder: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tuner", "run", "study=fake.yaml", *args],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The stage's trials; none while the run has not created it yet."""
    try:
        return optuna.load_study(study_name="fake/lr", storage=storage).trials
    except KeyError:
        return []


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def finished(storage: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials(storage) if t.state in FINISHED]


def test_four_workers_on_sqlite_share_the_budget_exactly(tmp_path: Path) -> None:
    fake_study.write(tmp_path, trials=20, epochs=2, sleep=0.5)  # workers take ~5 s to start
    run = start(tmp_path, "workers=4")
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    assert "database is locked" not in out + err
    done = finished(f"sqlite:///{tmp_path}/tuner.db")
    assert len(done) == 20  # exactly the budget, not 20 x 4, not 20 + a few
    assert len({t.user_attrs["pid"] for t in done}) > 1  # the workers did share the work


def test_four_machines_on_postgresql_share_the_budget_exactly(
    tmp_path: Path, postgres_url: str
) -> None:
    fake_study.write(tmp_path, trials=20, epochs=2, sleep=0.1)
    # Four separate commands on one database, as on four machines.
    runs = [start(tmp_path, f"storage={postgres_url}", "stage=lr") for _ in range(4)]
    for run in runs:
        _, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
    all_trials = trials(postgres_url)
    assert len([t for t in all_trials if t.state in FINISHED]) == 20
    surplus = [t for t in all_trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("stop_reason") == "surplus" for t in surplus)  # races only


def test_a_killed_worker_has_its_trial_failed_by_heartbeat_and_retried(
    tmp_path: Path, postgres_url: str
) -> None:
    fake_study.write(tmp_path, trials=6, epochs=4, sleep=0.5)
    storage = postgres_url
    victim = start(tmp_path, f"storage={storage}", "heartbeat=1")
    wait_for(lambda: len(finished(storage)) >= 2 and any(
        t.state == TrialState.RUNNING for t in trials(storage)))  # fmt: skip
    before = {t.number: (t.state, t.value) for t in finished(storage)}
    victim.send_signal(signal.SIGKILL)  # mid-trial, no chance to clean up
    victim.wait(timeout=30)
    killed = next(t for t in trials(storage) if t.state == TrialState.RUNNING)

    rescuer = start(tmp_path, f"storage={storage}", "heartbeat=1")
    _, err = rescuer.communicate(timeout=240)
    assert rescuer.returncode == 0, err
    after = trials(storage)
    assert len([t for t in after if t.state in FINISHED]) == 6  # the budget, met
    dead = next(t for t in after if t.number == killed.number)
    assert dead.state == TrialState.FAIL  # failed by the heartbeat check
    retry = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params  # retried as it was
    assert retry[0].state == TrialState.COMPLETE
    for t in after:  # no finished trial lost or changed
        if t.number in before:
            assert (t.state, t.value) == before[t.number]


def test_sigint_mid_trial_keeps_finished_trials_and_the_next_run_completes(
    tmp_path: Path,
) -> None:
    fake_study.write(tmp_path, trials=6, epochs=4, sleep=0.3)
    storage = f"sqlite:///{tmp_path}/tuner.db"
    run = start(tmp_path)
    wait_for(lambda: len(finished(storage)) >= 2 and any(
        t.state == TrialState.RUNNING for t in trials(storage)))  # fmt: skip
    before = {t.number: t.value for t in finished(storage)}
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert err.strip().splitlines() == [
        "tuner: interrupted; finished trials are kept, run again to resume."
    ]
    interrupted = [t for t in trials(storage) if t.state == TrialState.FAIL]
    assert [t.user_attrs["stop_reason"] for t in interrupted] == ["interrupted"]

    again = start(tmp_path)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    done = finished(storage)
    assert len(done) == 6  # the stage completes its budget
    assert {t.number: t.value for t in done if t.number in before} == before  # intact


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_ends_a_run_like_ctrl_c(tmp_path: Path, sig: signal.Signals) -> None:
    fake_study.write(tmp_path, trials=4, epochs=4, sleep=0.3)
    storage = f"sqlite:///{tmp_path}/tuner.db"
    run = start(tmp_path)
    wait_for(lambda: any(t.state == TrialState.RUNNING for t in trials(storage)))
    run.send_signal(sig)
    run.communicate(timeout=60)
    assert run.returncode == 130
    assert [t.state for t in trials(storage)].count(TrialState.RUNNING) == 0  # none left hanging
