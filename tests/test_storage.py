"""Storage URLs: SQLite by default, PostgreSQL to scale out, passwords never shown."""

import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from tuner import storage as storages
from tuner.config import apply_overrides, load_study
from tuner.errors import UserError
from tuner.plan import plan_stage
from tuner.results import best_of, best_trial
from tuner.stage import Budget, run_stage


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://bob:s3cret@db/x", "postgresql://bob:***@db/x"),
        ("postgresql+psycopg2://bob:p%40ss@db:5432/x", "postgresql+psycopg2://bob:***@db:5432/x"),
        ("cannot reach mysql://u:pw@h/d now", "cannot reach mysql://u:***@h/d now"),
        ("sqlite:///tuner.db", "sqlite:///tuner.db"),
        ("postgresql://bob@db/x", "postgresql://bob@db/x"),
    ],
)
def test_mask_hides_every_password(text: str, masked: str) -> None:
    assert storages.mask(text) == masked


def test_a_missing_sqlite_file_is_not_created_by_reading(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/none.db"
    assert storages.open_existing(url) is None
    assert not (tmp_path / "none.db").exists()  # status/export/refusals create nothing


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    storage = storages.open_storage(f"sqlite:///{tmp_path}/t.db")
    with storage.engine.connect() as connection:  # type: ignore[attr-defined]
        mode = connection.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar()
    assert mode == "wal"  # readers beside a writer; commits do not wait for the disk


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "is not a database URL"),
        ("sqlite:////no/such/folder/t.db", "folder /no/such/folder does not exist"),
        ("postgresql://bob:hunter2@127.0.0.1:1/db", "Cannot open storage postgresql://bob:***@"),
    ],
)
def test_bad_storage_urls_are_one_line_without_the_password(url: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)) as info:
        storages.open_storage(url)
    assert "hunter2" not in str(info.value) and "\n" not in str(info.value)


def test_a_stage_runs_against_postgresql(postgres_url: str) -> None:
    study = apply_overrides(load_study(), {"storage": postgres_url, "batch_size": "32"}, {}).study
    storage = storages.open_storage(study.storage)
    plan = plan_stage(study, "lr", best_of(storage, study))

    def fn(config, report):
        report(1, {"accuracy": 0.5})
        return {"accuracy": config["lr"]}

    run_stage(plan, storage, fn, Budget(3, None), out=lambda line: None)
    stored = optuna.load_study(study_name="mnist1d_cnn/lr", storage=postgres_url)
    assert len(stored.trials) == 3
    assert stored.user_attrs["fixed"] == {"batch_size": 32}
    assert stored.trials[0].intermediate_values == {1: 0.5}


# --- the runner's small reads and one-statement writes: plain Optuna data, on both databases --


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/t.db"
    return str(request.getfixturevalue("postgres_url"))


def history(url: str, direction: str = "maximize") -> optuna.Study:
    """A stage with finished trials of every kind, a tie for the best, and one running."""
    storage = storages.open_storage(url)
    study = optuna.create_study(study_name="s/lr", storage=storage, direction=direction)
    for value, attrs in [(0.7, {"config": {}}), (0.9, {}), (0.8, {"config": {}}),
                         (0.8, {"config": {}}), (float("inf"), {"config": {}})]:  # fmt: skip
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"config": {}}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.ask()  # running
    return optuna.load_study(study_name="s/lr", storage=storage)


def test_states_counts_and_the_best_agree_with_optunas_own_reads(url: str) -> None:
    study = history(url)
    trials = study.get_trials(deepcopy=False)
    # One query says what reading every trial whole says.
    assert storages.trial_states(study) == {t.number: t.state for t in trials}
    assert storages.count_complete(study) == sum(t.state == TrialState.COMPLETE for t in trials)
    # The best finite COMPLETE value (inf is not one); ties keep the earlier trial.
    assert storages.best_complete(study) == (1, 0.9)
    # With an attr named, only trials that carry it count: as results.best_trial picks.
    assert storages.best_complete(study, "config") == (2, 0.8)
    best = best_trial(study)
    assert best is not None and (best.number, best.value) == (2, 0.8)


def test_the_best_of_a_minimized_stage_is_its_lowest_value(url: str) -> None:
    study = history(url, direction="minimize")
    assert storages.best_complete(study, "config") == (0, 0.7)  # the lowest that has a config
    assert storages.best_complete(study) == (0, 0.7)


def test_a_stage_without_a_complete_trial_has_no_best(url: str) -> None:
    study = optuna.create_study(storage=storages.open_storage(url))
    study.ask()
    assert storages.best_complete(study) is None
    assert storages.count_complete(study) == 0


def test_a_trials_attrs_and_reports_are_stored_as_optuna_stores_them(url: str) -> None:
    study = optuna.create_study(study_name="s/lr", storage=storages.open_storage(url))
    trial = study.ask()
    matrix = [[3, 1], [0, 4]]
    storages.set_user_attrs(trial, {"config": {"lr": 0.01}, "stop_reason": "patience"})
    storages.set_user_attrs(trial, {"stop_reason": "max_epochs", "confusion_matrix": matrix})
    reports = storages.Reports(trial)
    for epoch, value in [(1, 0.5), (2, 0.75)]:
        reports(value, epoch)
    with pytest.warns(UserWarning, match="already reported"):
        reports(0.1, 2)  # a step reported twice: the first value stays
    assert trial.user_attrs["stop_reason"] == "max_epochs"  # the trial sees what it wrote
    reports.flush()
    study.tell(trial, 0.75)
    stored = optuna.load_study(study_name="s/lr", storage=url).trials[0]
    # A later write of a key replaces it; every value reads back as plain Optuna data.
    assert stored.user_attrs == {
        "config": {"lr": 0.01}, "stop_reason": "max_epochs", "confusion_matrix": matrix,
    }  # fmt: skip
    assert stored.intermediate_values == {1: 0.5, 2: 0.75}


def test_a_studys_attrs_are_stored_as_optuna_stores_them(url: str) -> None:
    study = optuna.create_study(study_name="s/lr", storage=storages.open_storage(url))
    study.set_user_attr("stage", "batch_size")
    storages.set_study_user_attrs(study, {"stage": "lr", "fixed": {"batch_size": 64}})
    # A key written again is replaced; each value reads back as plain Optuna data.
    stored = optuna.load_study(study_name="s/lr", storage=url)
    assert stored.user_attrs == {"stage": "lr", "fixed": {"batch_size": 64}}
    in_memory = optuna.create_study()
    storages.set_study_user_attrs(in_memory, {"stage": "lr"})  # Optuna's own call
    assert in_memory.user_attrs == {"stage": "lr"}


def test_reported_values_reach_the_pruner_at_once_and_the_database_behind(url: str) -> None:
    seen: list[dict[int, float]] = []

    class Watching(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            seen.append(dict(trial.intermediate_values))
            return False

    study = optuna.create_study(
        study_name="s/lr", storage=storages.open_storage(url), pruner=Watching()
    )

    def stored() -> dict[int, float]:
        return optuna.load_study(study_name="s/lr", storage=url).trials[0].intermediate_values

    trial = study.ask()
    reports = storages.Reports(trial, every=3600)  # no write falls due during the test
    for epoch, value in [(1, 0.5), (2, 0.75)]:
        reports(value, epoch)
        trial.should_prune()
    # The pruner decides on every value as it is reported; the database has none yet ...
    assert seen == [{1: 0.5}, {1: 0.5, 2: 0.75}]
    assert stored() == {}
    reports.flush()  # ... until the flush writes both in one go
    assert stored() == {1: 0.5, 2: 0.75}
    due = storages.Reports(trial, every=0.0)  # a write due at every report
    due(0.8, 3)
    assert stored() == {1: 0.5, 2: 0.75, 3: 0.8}


def test_a_finished_trial_takes_no_more_writes(url: str) -> None:
    study = optuna.create_study(storage=storages.open_storage(url))
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)  # as a heartbeat check fails a silent worker's
    # As Optuna's own set_user_attr and report: a late write of a failed trial is refused.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storages.set_user_attrs(trial, {"stop_reason": "max_epochs"})
    reports = storages.Reports(trial)
    reports(0.5, 1)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        reports.flush()


def test_other_storages_fall_back_on_optunas_calls() -> None:
    study = optuna.create_study()  # in memory
    for value in (0.2, 0.6):
        study.add_trial(optuna.trial.create_trial(value=value))
    trial = study.ask()
    storages.set_user_attrs(trial, {"config": {}})
    storages.Reports(trial)(0.4, 1)  # written at once: no flush needed
    assert trial.user_attrs == {"config": {}} and study.trials[-1].intermediate_values == {1: 0.4}
    assert storages.trial_states(study) == {0: TrialState.COMPLETE, 1: TrialState.COMPLETE,
                                            2: TrialState.RUNNING}  # fmt: skip
    assert storages.count_complete(study) == 2
    assert storages.best_complete(study) == (0, 0.2)  # minimize: Optuna's default


def test_a_database_is_checked_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    manager = optuna.storages._rdb.storage._VersionManager
    real = manager.check_table_schema_compatibility

    def check(self: Any) -> None:
        checks.append(self.url)
        real(self)

    monkeypatch.setattr(manager, "check_table_schema_compatibility", check)
    url = f"sqlite:///{tmp_path}/t.db"
    for _ in range(3):  # status, a run's plan, its stage: each opens the database
        storages.open_storage(url)
    assert len(checks) == 1  # Optuna's schema check (50 ms) runs the first time only
