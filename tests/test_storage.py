"""Storage URLs: SQLite by default, PostgreSQL to scale out, passwords never shown."""

import re
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from tuner import storage as storages
from tuner.config import apply_overrides, load_study
from tuner.errors import UserError
from tuner.plan import plan_stage
from tuner.results import best_of
from tuner.runner import Budget, run_stage


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
