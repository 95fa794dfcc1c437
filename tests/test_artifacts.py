"""Best trials' weights as Optuna artifacts: where they go, when a trial is the new best,
and that they come back as the state dict that was saved."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import optuna
import pytest
import torch
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import create_trial

from tuner import artifacts
from tuner.errors import UserError


@pytest.mark.parametrize(
    ("url", "given", "expected"),
    [
        ("sqlite:////data/runs/tuner.db", None, "/data/runs/tuner_artifacts"),  # by the file
        ("sqlite:///tuner.db", None, "tuner_artifacts"),
        ("postgresql://me:pw@db/tuner", None, "{cwd}/tuner_artifacts"),  # a server: here
        ("postgresql://me:pw@db/tuner", "/shared/weights", "/shared/weights"),
    ],
)
def test_the_folder(url: str, given: str | None, expected: str) -> None:
    assert str(artifacts.folder(url, given)) == expected.format(cwd=Path.cwd())


@pytest.mark.parametrize(
    ("direction", "value", "best"),
    [("maximize", 0.95, True), ("maximize", 0.9, False), ("minimize", 0.1, True),
     ("minimize", 0.9, False), ("maximize", float("nan"), False)],
)  # fmt: skip
def test_becomes_best(
    direction: Literal["maximize", "minimize"], value: float, best: bool
) -> None:
    study = optuna.create_study(direction=direction)
    for v in (0.5, 0.9):
        study.add_trial(create_trial(value=v))
    # Ties keep the earlier trial: only a strictly better value saves new weights.
    assert artifacts.becomes_best(study, value) is best


def test_the_first_complete_trial_is_the_best() -> None:
    assert artifacts.becomes_best(optuna.create_study(), 1.0)


def test_weights_round_trip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="s/lr", storage=storage)
    trial = study.ask()
    model = torch.nn.Linear(4, 3)
    artifact_id = artifacts.save_weights(study, trial, model, url)
    study.tell(trial, 0.5)
    assert (tmp_path / "tuner_artifacts" / artifact_id).is_file()  # next to the database
    meta = get_all_artifact_meta(study.trials[0], storage=storage)
    assert [m.filename for m in meta] == ["s-lr-trial0-weights.pt"]
    back = tmp_path / "back.pt"
    download_artifact(
        artifact_store=artifacts.store(url), artifact_id=artifact_id, file_path=str(back)
    )
    state = torch.load(back, weights_only=True)
    assert torch.equal(state["weight"], model.weight.detach())


def test_a_missing_parent_folder_is_a_user_error(tmp_path: Path) -> None:
    study = optuna.create_study()
    with pytest.raises(UserError, match="does not exist"):
        artifacts.save_weights(
            study, study.ask(), torch.nn.Linear(1, 1), "sqlite:///x.db", str(tmp_path / "a/b")
        )
