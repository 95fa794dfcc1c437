"""Reading stage results back from the storage: a stage's best trial, as later stages and
status, export, notes and the report need it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.plan import Best, BestOf, Source

RESCORED = "rescored"  # study user attr: {trial number: values over seeds} (tuner.closed_loop)
SET = "set"  # trial user attr: config values it trained with beyond its params (a follow-up's)
SURPLUS = "surplus"  # stop_reason of a trial that found the budget taken when it started
LONGER = "longer"  # study user attr: the follow-up that trained the best for more epochs


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
    """The best COMPLETE trial that carries its config, or None.

    Where the stage re-scored its top trials on other seeds (tuner.closed_loop), the best is
    the one with the best mean over its fresh seeds (``fresh_mean``), not the luckiest single
    value: over the fresh seeds *every* re-scored trial has (``shared_seeds``), so that a
    re-scoring cut short by the deadline compares each on the same seeds (the seed draws the
    validation split, and one split is easier than another); the mean over all its fresh
    seeds breaks a tie.
    """
    complete = ranked(study)
    if not complete:
        return None
    attrs = study.user_attrs  # read once: a query on an RDB storage
    fresh = {t.number: fresh_values(attrs, t) for t in complete}
    rescored = [t for t in complete if fresh[t.number]]
    if len(rescored) < 2:
        return complete[0]
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    shared = shared_seeds([fresh[t.number] for t in rescored])

    def mean(values: list[float]) -> float:
        value = statistics.fmean(values)
        return sign * value if math.isfinite(value) else -math.inf

    def key(t: FrozenTrial) -> tuple[float, float, int]:
        values = fresh[t.number]
        return mean(values[:shared]), mean(values), -t.number  # ties: the earlier trial

    return max(rescored, key=key)


def shared_seeds(fresh: list[list[float]]) -> int:
    """How many fresh seeds the re-scored trials all have: each trial's fresh values are on
    seed+1, seed+2, ... in that order (a follow-up on a fresh seed too: see ``fresh_from``),
    so the first ``shared_seeds`` of each are the same seeds, the same validation splits.
    Seen (the default study, its refinement stage cut short): the trial exported won on its
    one fresh seed against the others' mean over two."""
    return min((len(values) for values in fresh), default=0)


def fresh_mean(values: list[float], start: int = 1) -> float:
    """The mean of a re-scored trial's values on its fresh seeds: all but the first.

    The first value is the one that put the trial in the stage's top few, so it is flattered
    (the best of 20 noisy trials on 400 validation samples: +0.5 points seen) and flattered the
    most for the trial ranked first; the fresh seeds are trained after the choice of the top
    few, so they are fair to each. A nan (a seed that failed) makes the mean nan. ``start``:
    where the fresh values start (0 for a follow-up on a fresh seed, see ``fresh_from``)."""
    return statistics.fmean(values[start:]) if len(values) > start else statistics.fmean(values)


def fresh_follow_up(attrs: Mapping[str, Any]) -> int | None:
    """The trial number of a stage's follow-up with more epochs that trained on a fresh seed
    (tuner.closed_loop.follow_up), from the stage's user attrs; None where it has none."""
    longer = attrs.get(LONGER)
    if not isinstance(longer, Mapping) or "seed" not in (longer.get("set") or {}):
        return None
    number = longer.get("number")
    return number if isinstance(number, int) else None


def fresh_from(attrs: Mapping[str, Any], number: int) -> int:
    """Where a trial's fresh values start among its values over seeds (``attrs``: its stage's
    user attrs): 1, as its first value is the one that ranked it (flattered); 0 for the
    follow-up on a fresh seed (``fresh_follow_up``): no value of its own chose it."""
    return 0 if number == fresh_follow_up(attrs) else 1


def fresh_values(attrs: Mapping[str, Any], trial: FrozenTrial) -> list[float]:
    """A trial's values on fresh seeds (none where the stage did not re-score it), by which
    a re-scored stage's best is chosen: a follow-up on a fresh seed and the best it follows
    up compare on the same fresh seeds. ``attrs``: the stage's user attrs."""
    start = fresh_from(attrs, trial.number)
    values = (attrs.get(RESCORED) or {}).get(str(trial.number))
    if not values and start == 0 and trial.value is not None:
        values = [float(trial.value)]
    return list(values or [])[start:]


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE trials that carry their config, best value first (ties: the earlier)."""
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "config" in t.user_attrs and t.value is not None and math.isfinite(t.value)
    ]  # fmt: skip
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return sorted(complete, key=lambda t: (-sign * float(t.value), t.number))  # type: ignore[arg-type]


def rescored(study: optuna.Study, trial: FrozenTrial) -> list[float] | None:
    """A trial's values over the seeds it was trained on, where the stage re-scored it."""
    values = (study.user_attrs.get(RESCORED) or {}).get(str(trial.number))
    return list(values) if values and len(values) > 1 else None
