"""Stage notes: read back from the stage study alone; fake histories, no training."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from optuna_dashboard import get_note

from tuner.notes import describe, diagnostics_of, stage_note, write_stage_note

LR = FloatDistribution(1e-4, 1e-1, log=True)
SCHEDULE = CategoricalDistribution(["constant", "cosine"])


@pytest.fixture()
def study() -> optuna.Study:
    s = optuna.create_study(study_name="mnist1d_cnn/lr", direction="maximize")
    attrs = {
        "stage": "lr", "stage_index": 1, "metric": "accuracy", "searches": ["lr", "schedule"],
        "fixed": {"batch_size": 64, "epochs": 12, "data.url": "postgresql://me:hunter2@db/x"},
        "lineage": {
            "batch_size": {"stage": "batch_size", "trial": 3, "value": 0.9123},
            "epochs": {"stage": None, "trial": None, "value": None},
        },
        "study_config": {"stages": ["batch_size", "lr", "optimizer", "architecture"]},
    }  # fmt: skip
    for key, value in attrs.items():
        s.set_user_attr(key, value)
    for number, (value, lr) in enumerate([(0.91, 3e-3), (0.95, 1e-2), (None, 9e-2)]):
        s.add_trial(create_trial(
            state=TrialState.COMPLETE if value else TrialState.PRUNED, value=value,
            params={"lr": lr, "schedule": "cosine"},
            distributions={"lr": LR, "schedule": SCHEDULE},
            user_attrs={"config": {"lr": lr}, "best_epoch": 7 + number},
        ))  # fmt: skip
    return s


def test_the_note_says_what_was_searched_fixed_and_found(study: optuna.Study) -> None:
    note = stage_note(study)
    assert note.startswith("# Stage lr (2 of 4): mnist1d_cnn/lr")
    assert "3 trials: 2 complete, 1 pruned." in note
    assert "| `lr` | 0.0001 … 0.1, log |" in note  # the range each parameter was drawn from
    assert "| `schedule` | constant, cosine |" in note
    # Each fixed value names the stage and trial it came from, or says it was set by hand.
    assert "| `batch_size` | `64` | stage batch_size, trial #3 (accuracy 0.9123) |" in note
    assert "| `epochs` | `12` | set by hand |" in note
    assert "Trial #1: validation accuracy **0.9500**." in note
    assert "| `lr` | `0.01` |" in note and "best_epoch: 8" in note
    assert "_No diagnostics for this stage._" in note


def test_passwords_in_urls_never_appear(study: optuna.Study) -> None:
    note = stage_note(study)
    assert "hunter2" not in note and "postgresql://me:***@db/x" in note


def test_a_stage_without_a_complete_trial_or_fixed_values(study: optuna.Study) -> None:
    empty = optuna.create_study(study_name="s/batch_size")
    empty.set_user_attr("searches", ["batch_size"])
    note = stage_note(empty)
    assert "| `batch_size` | no trial drew it yet |" in note
    assert "Nothing: this stage starts from the study's defaults." in note
    assert "No complete trial yet." in note


def test_written_notes_reach_the_dashboard_and_keep_their_diagnostics(
    study: optuna.Study,
) -> None:
    body = write_stage_note(study, ["lr sits at the top of its range", "2 of 3 trials diverged"])
    assert get_note(study) == body
    assert study.metric_names == ["accuracy"]  # the dashboard's axes say what the value is
    # The report reads the diagnostics back from the note.
    assert diagnostics_of(study) == ["lr sits at the top of its range", "2 of 3 trials diverged"]
    write_stage_note(study)  # a second write replaces the note
    assert diagnostics_of(study) == []


def test_diagnostics_come_from_the_user_attr_first(study: optuna.Study) -> None:
    study.set_user_attr("diagnostics", ["the model is not learning"])
    assert "- the model is not learning" in stage_note(study)
    assert diagnostics_of(study) == ["the model is not learning"]


@pytest.mark.parametrize(
    ("distribution", "text"),
    [
        (FloatDistribution(0.0, 0.4), "0 … 0.4"),
        (FloatDistribution(1e-4, 1e-1, log=True), "0.0001 … 0.1, log"),
        (FloatDistribution(0.0, 0.5, step=0.1), "0 … 0.5, step 0.1"),
        (IntDistribution(1, 4), "1 … 4"),
        (IntDistribution(16, 256, step=16), "16 … 256, step 16"),
        (CategoricalDistribution([16, 32, 64]), "16, 32, 64"),
    ],
)
def test_describe(distribution: optuna.distributions.BaseDistribution, text: str) -> None:
    assert describe(distribution) == text
