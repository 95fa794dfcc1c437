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
import sqlalchemy.exc
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from tests import fake_study
from tuner import storage as storages
from tuner.config import apply_overrides, load_study
from tuner.plan import StagePlan, plan_stage
from tuner.results import best_of
from tuner.stage import Budget, start_stage, work
from tuner.trial import make_objective

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start(folder: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tuner", "run", "study=fake.yaml", *args],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The stage's trials; none while the run has not created it yet. The file is left to the
    run to create: opening it first here raced the run's creation of Optuna's tables (an
    IntegrityError in this process, seen once in a full suite run)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return []
    try:
        return optuna.load_study(study_name="fake/lr", storage=storage).trials
    except (KeyError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
        return []  # not created yet, or its tables are being created


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


# --- the budget rules, decided from the trials' states (fake trials, one process) ------------


def lr_stage(tmp_path: Path, trials: int) -> tuple[StagePlan, BaseStorage, optuna.Study]:
    """The fake study's lr stage, started: its plan, its storage, its (empty) study."""
    fake_study.write(tmp_path, trials=trials)
    config = load_study(str(tmp_path / "fake.yaml"))
    config = apply_overrides(config, {"storage": f"sqlite:///{tmp_path}/tuner.db"}, {}).study
    storage = storages.open_storage(config.storage)
    plan = plan_stage(config, "lr", best_of(storage, config))
    start_stage(plan, storage, Budget(trials, None), out=lambda line: None)
    return plan, storage, optuna.load_study(study_name=plan.name, storage=storage)


def score(config, report):
    report(1, {"accuracy": 0.5})
    return {"accuracy": config["lr"]}


def test_a_trial_that_finds_the_budget_taken_is_surplus(tmp_path: Path) -> None:
    plan, _, study = lr_stage(tmp_path, trials=2)
    study.ask()  # the incumbent, taken by another worker
    study.ask()  # ... and a second trial: the budget of 2 is taken
    study.optimize(make_objective(plan, score, budget=2), n_trials=1, catch=(Exception,))
    late = study.trials[-1]
    # Two live trials numbered before it: it ends at once, FAILed as surplus, untrained.
    assert late.state == TrialState.FAIL and late.user_attrs["stop_reason"] == "surplus"
    assert "config" not in late.user_attrs


def test_a_retried_trial_within_the_budget_runs_and_one_beyond_does_not(
    tmp_path: Path,
) -> None:
    plan, storage, study = lr_stage(tmp_path, trials=3)
    work(plan, storage, score, Budget(2, None), out=lambda line: None)  # 2 finished
    retry = {"lr": 0.02, "schedule": "cosine", "warmup": 0.1}
    study.enqueue_trial(retry)  # as a dead worker's trial is enqueued again
    study.enqueue_trial({"lr": 0.03, "schedule": "cosine", "warmup": 0.1})
    work(plan, storage, score, Budget(3, None), out=lambda line: None)
    states = [t.state for t in study.trials]
    # The waiting trial within the budget of 3 runs; the one beyond it never runs, and is
    # not left waiting once the stage has its budget.
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    assert study.trials[3].user_attrs["stop_reason"] == "surplus"
    assert study.trials[2].params == retry


def test_worker_processes_start_once_and_serve_every_stage_of_a_run(tmp_path: Path) -> None:
    fake_study.write(tmp_path, trials=12, epochs=2, sleep=0.5)
    two_stages = (
        (tmp_path / "fake.yaml")
        .read_text()
        .replace("stages: [lr]", "stages: [lr, optimizer]")
        .replace("trials: {lr: 12}", "trials: {lr: 12, optimizer: 6}")
    )
    extra = "  optimizer: adamw\n  momentum: 0.9\n  beta1: 0.9\n  beta2: 0.999\n"
    (tmp_path / "fake.yaml").write_text(two_stages + extra + "  weight_decay: 0.01\n")
    run = start(tmp_path, "workers=2", "threads=2")
    _, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    storage = f"sqlite:///{tmp_path}/tuner.db"
    pids = {}
    for stage, budget in (("lr", 12), ("optimizer", 6)):
        done = [t for t in optuna.load_study(study_name=f"fake/{stage}", storage=storage).trials
                if t.state in FINISHED]  # fmt: skip
        assert len(done) == budget  # each stage's budget, exactly
        pids[stage] = {t.user_attrs["pid"] for t in done}
        assert {t.user_attrs["threads"] for t in done} == {2}  # threads= holds in every worker
    # The helper, warm by then, shares the second stage; it is the same process as in the
    # first: one helper for the whole run, not one started per stage.
    assert len(pids["optimizer"]) == 2
    assert len(pids["lr"] | pids["optimizer"]) == 2
