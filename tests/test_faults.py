"""Faults that must not lose work, with real processes and real signals: a worker killed
mid-trial is replaced and its trial run again; an interrupt of the run reaches every worker;
the workers of a killed run stop; a cut-off trial's values run again before anything new;
commands side by side draw their own trials; a dead trial shows as stale."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from tests import fake_study
from tests.test_scale import finished, start, trials, wait_for
from tuner import _status as status
from tuner import storage as storages
from tuner.stage import Budget, start_stage, work

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
    fake_study.write(tmp_path, trials=6, epochs=5, sleep=0.5)  # the worker starts in time
    storage = (
        f"sqlite:///{tmp_path}/tuner.db"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    run = start(tmp_path, f"storage={storage}", "workers=2", "heartbeat=1")
    wait_for(lambda: running_in(storage, run.pid, other=True))
    (victim,) = running_in(storage, run.pid, other=True)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)  # mid-trial, no chance to clean up
    _, err = run.communicate(timeout=240)
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


def test_sigterm_to_the_run_alone_interrupts_every_worker(tmp_path: Path) -> None:
    fake_study.write(tmp_path, trials=12, epochs=6, sleep=0.5)
    storage = f"sqlite:///{tmp_path}/tuner.db"
    run = start(tmp_path, "workers=2")
    wait_for(lambda: running_in(storage, run.pid) and running_in(storage, run.pid, other=True))
    cut = {t.number for t in trials(storage) if t.state == TrialState.RUNNING}
    os.kill(run.pid, signal.SIGTERM)  # the run's PID alone, as Kubernetes and systemd send it
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "Traceback" not in err
    after = trials(storage)
    assert not [t for t in after if t.state == TrialState.RUNNING]
    for trial in after:
        if trial.number in cut:  # the worker's trial too, not only the run's
            assert trial.state == TrialState.FAIL
            assert trial.user_attrs["stop_reason"] == "interrupted"
    assert len(finished(storage)) < 12  # the worker did not go on with the stage


SCRIPT = """
import sys

import tuner

if __name__ == "__main__":  # the worker processes import this file too
    try:
        tuner.run(tuner.load("fake.yaml"), workers=2, check=False)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
"""


def test_sigterm_to_a_python_script_running_tuner_interrupts_every_worker(tmp_path: Path) -> None:
    # tuner.run from a script, not the command line: the same handling of the signal.
    fake_study.write(tmp_path, trials=12, epochs=6, sleep=0.5)
    (tmp_path / "tune.py").write_text(SCRIPT)
    storage = f"sqlite:///{tmp_path}/tuner.db"
    run = subprocess.Popen(
        [sys.executable, "tune.py"], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: running_in(storage, run.pid) and running_in(storage, run.pid, other=True))
    cut = {t.number for t in trials(storage) if t.state == TrialState.RUNNING}
    workers = {t.user_attrs["pid"] for t in running_in(storage, run.pid, other=True)}
    os.kill(run.pid, signal.SIGTERM)  # the script's PID alone
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err  # the script caught it as KeyboardInterrupt
    assert err.strip() == "interrupted"
    after = trials(storage)
    assert not [t for t in after if t.state == TrialState.RUNNING]
    for trial in after:
        if trial.number in cut:  # the script's trial and the worker's
            assert trial.state == TrialState.FAIL
            assert trial.user_attrs["stop_reason"] == "interrupted"
    assert len(finished(storage)) < 12  # the worker did not go on with the stage
    assert not any(alive(pid) for pid in workers)


def test_the_workers_of_a_killed_run_stop_and_mark_their_trial(tmp_path: Path) -> None:
    fake_study.write(tmp_path, trials=12, epochs=6, sleep=0.5)
    storage = f"sqlite:///{tmp_path}/tuner.db"
    run = start(tmp_path, "workers=2")
    wait_for(lambda: running_in(storage, run.pid, other=True))
    (orphaned,) = running_in(storage, run.pid, other=True)
    worker = orphaned.user_attrs["pid"]
    run.kill()
    _, err = run.communicate(timeout=60)  # the worker holds the pipes until it ends too
    wait_for(lambda: not alive(worker))
    assert "Traceback" not in err
    mine = [t for t in trials(storage) if t.user_attrs.get("pid") == worker]
    ended = next(t for t in mine if t.number == orphaned.number)
    assert ended.state == TrialState.FAIL and ended.user_attrs["stop_reason"] == "interrupted"
    assert max(t.number for t in mine) == orphaned.number  # it started no trial after


# --- what runs after a cut-off trial, decided in one process (fake objectives) ---------------


def grid_stage(tmp_path: Path):
    """The default study's batch-size stage (a grid of 4 sizes: 64, then 32, 128, 256)."""
    from tuner.config import apply_overrides, load_study
    from tuner.plan import plan_stage
    from tuner.results import best_of

    study = apply_overrides(load_study(), {"storage": f"sqlite:///{tmp_path}/t.db"}, {}).study
    storage = storages.open_storage(study.storage, heartbeat=1)
    return study, plan_stage(study, "batch_size", best_of(storage, study)), storage


def test_a_cut_off_grid_point_runs_again_before_the_rest_of_the_grid(tmp_path: Path) -> None:
    study, plan, storage = grid_stage(tmp_path)
    budget, lines = Budget(2, None), []

    def cut_at_32(config, report):
        if config["batch_size"] == 32:
            raise KeyboardInterrupt  # as SIGINT or SIGTERM mid-trial
        return {"accuracy": config["batch_size"] / 1000}

    start_stage(plan, storage, budget, out=lines.append)
    assert "its grid has 4 points and the stage 2 trials: the first 2 run" in lines[-1]
    with pytest.raises(KeyboardInterrupt):
        work(plan, storage, cut_at_32, budget, out=lines.append)
    found = optuna.load_study(study_name=plan.name, storage=storage)
    cut = next(t for t in found.trials if t.state == TrialState.FAIL)
    assert "the next run runs 1 cut-off trial(s) again first:" in status.render(
        study, status.collect(study)
    )

    lines.clear()
    start_stage(plan, storage, budget, out=lines.append)
    assert f"runs 1 cut-off trial(s) again first: #{cut.number} (interrupted" in lines[-1]
    work(plan, storage, lambda c, r: {"accuracy": c["batch_size"] / 1000}, budget,
         out=lines.append)  # fmt: skip
    after = found.trials
    done = [t for t in after if t.state == TrialState.COMPLETE]
    # The size the interrupt cut off ran, once, before the grid's next sizes.
    assert sorted(t.params["batch_size"] for t in done) == [32, 64]
    assert [t.user_attrs.get("retry_of") for t in done] == [None, cut.number]
    assert not [t for t in after if t.state in LEFT]  # nothing left queued at the end
    assert "cut-off" not in status.render(study, status.collect(study))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the trial is asked, not optimized
def test_a_stale_running_trial_shows_as_stale(tmp_path: Path) -> None:
    study, plan, storage = grid_stage(tmp_path)
    start_stage(plan, storage, Budget(4, None), out=lambda line: None)
    found = optuna.load_study(study_name=plan.name, storage=storage)
    trial = found.ask()  # a trial whose worker was killed: it beat once, long ago
    storage.record_heartbeat(trial._trial_id)
    rdb = storages._rdb(storage)
    with rdb.engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = '2026-01-02 03:04:05'")
        )
    text = status.render(study, status.collect(study))
    assert "running now" not in text
    assert f"trial #{trial.number} is stale: no heartbeat for " in text
    assert "(last 2026-01-02 03:04:05, started " in text and "its worker stopped" in text


def test_the_next_run_runs_an_interrupted_trial_again_before_new_ones(tmp_path: Path) -> None:
    fake_study.write(tmp_path, trials=3, epochs=4, sleep=0.4)
    storage = f"sqlite:///{tmp_path}/tuner.db"
    run = start(tmp_path)
    in_objective = lambda t: t.state == TrialState.RUNNING and "config" in t.user_attrs  # noqa: E731
    wait_for(lambda: len(finished(storage)) >= 1 and any(map(in_objective, trials(storage))))
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=60)
    assert run.returncode == 130
    (cut,) = [t for t in trials(storage) if t.state == TrialState.FAIL]
    before = max(t.number for t in trials(storage))

    again = start(tmp_path)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"runs 1 cut-off trial(s) again first: #{cut.number} (interrupted" in out
    after = trials(storage)
    rerun = next(t for t in after if t.number == before + 1)  # the first trial of this run
    assert rerun.params == cut.params and rerun.user_attrs["retry_of"] == cut.number
    assert rerun.state == TrialState.COMPLETE
    assert len(finished(storage)) == 3 and not [t for t in after if t.state in LEFT]


def test_commands_side_by_side_draw_their_own_trials(tmp_path: Path, postgres_url: str) -> None:
    fake_study.write(tmp_path, trials=10, epochs=1, sleep=0.1)
    # Two separate commands on one database, as on two machines; seed= is the same in both.
    runs = [start(tmp_path, f"storage={postgres_url}", "stage=lr") for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
    ran = [t for t in trials(postgres_url) if t.params]
    assert len({tuple(sorted(t.params.items())) for t in ran}) == len(ran)  # none drawn twice
    seeds = {t.user_attrs["pid"]: t.user_attrs["sampler_seed"] for t in ran}
    assert len(seeds) == 2 and len(set(seeds.values())) == 2  # each command seeded its own


def test_a_trial_cut_off_every_time_is_run_again_at_most_max_retry_times() -> None:
    from optuna.distributions import FloatDistribution

    from tuner import retry

    def cut(number: int, of: int | None = None) -> optuna.trial.FrozenTrial:
        attrs = {"stop_reason": "interrupted", **({"retry_of": of} if of is not None else {})}
        made = optuna.trial.create_trial(
            state=TrialState.FAIL, params={"lr": 0.1},
            distributions={"lr": FloatDistribution(1e-5, 1.0)}, user_attrs=attrs,
        )  # fmt: skip
        made.number = number
        return made

    chain = [cut(0)]
    for number in range(1, storages.MAX_RETRY + 1):
        assert [t.number for t in retry.unretried(chain)] == [number - 1]
        chain.append(cut(number, of=number - 1))
    assert retry.unretried(chain) == []  # its values ran 1 + MAX_RETRY times: enough


def test_a_study_files_sampler_seed_repeats_the_draws(tmp_path: Path) -> None:
    import dataclasses

    from tuner.config import apply_overrides, load_study
    from tuner.plan import plan_stage
    from tuner.results import best_of
    from tuner.stage import run_stage

    drawn = []
    for run in ("a", "b"):
        study = apply_overrides(load_study(), {"storage": f"sqlite:///{tmp_path}/{run}.db",
                                               "batch_size": "64"}, {}).study  # fmt: skip
        study = dataclasses.replace(study, sampler={**study.sampler, "seed": 0})
        storage = storages.open_storage(study.storage)
        plan = plan_stage(study, "lr", best_of(storage, study))
        found = run_stage(plan, storage, lambda c, r: {"accuracy": c["lr"]}, Budget(4, None),
                          out=lambda line: None)  # fmt: skip
        drawn.append([(t.params, t.user_attrs["sampler_seed"]) for t in found.trials])
    assert drawn[0] == drawn[1]  # the same seed, the same draws
