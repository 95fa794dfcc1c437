"""Reading stage results back from the storage: a stage's best trial, as later stages and
status, export, notes and the report need it."""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.plan import Best, BestOf, Source

SURPLUS = "surplus"  # stop_reason of a trial that found the budget taken when it started


def best_of(storage: optuna.storages.BaseStorage | None, study: StudyConfig) -> BestOf:
    """A function that reads a stage's best finished trial from the storage."""

    def best(stage: str) -> Best | None:
        found = storages.load(storage, study.stage_name(stage))
        if found is None:
            return None
        trial = best_trial(found)
        if trial is None:
            return None
        lineage = found.user_attrs.get("lineage", {})
        return Best(
            stage=stage,
            number=trial.number,
            value=float(trial.value),  # type: ignore[arg-type]
            config=trial.user_attrs["config"],
            lineage={key: Source.from_dict(src) for key, src in lineage.items()},
        )

    return best


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial that carries its config, or None."""
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "config" in t.user_attrs and t.value is not None and math.isfinite(t.value)
    ]  # fmt: skip
    if not complete:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
