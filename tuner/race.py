"""The batch-size stage's time race, made repeatable.

The batch-size stage sets ``time_budget`` (seconds): the objective times each candidate's
training step and trains for budget x throughput samples, so candidates are compared at
equal training time (the playbook: batch size is chosen for speed). What a trial measured is
stored with the stage (a study user attr ``race:<batch_size>``: the throughput and the
sample count it gave), and any later trial of that batch size in the stage (a retried
trial, a resumed run, another worker) trains that stored sample count (``train_samples``)
instead of timing again.

``deterministic`` (a run option, or the study file's ``deterministic: true``) replaces the
race with a budget in samples that the study gives (``budget.samples``): nothing a trial
trains then depends on the machine's speed or load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import optuna

from tuner.config import StudyConfig
from tuner.errors import UserError

PREFIX = "race:"  # study user attr of the race's measurement at one batch size
TIME_KEY = "time_budget"  # the config key of the race: seconds of training per candidate
SAMPLES_KEY = "train_samples"  # the config key of a budget in samples (the objective's)


def deterministic_settings(study: StudyConfig, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's ``set:`` values; under ``deterministic``, a time race becomes the study's
    budget in samples (``time_budget: null``, ``train_samples: budget.samples``)."""
    out = dict(settings)
    if study.deterministic and out.get(TIME_KEY) is not None:
        out[TIME_KEY] = None
        out[SAMPLES_KEY] = study.samples
    return out


def check_deterministic(
    study: StudyConfig, *, workers: int, timeout: float | None, stage: str | None = None
) -> None:
    """A deterministic run's settings hold: one worker, no time limit, a sample budget where a
    stage that runs (``stage``, or all) races. Raises UserError: one line, the key, the fix."""
    if not study.deterministic:
        return
    if workers != 1:
        raise UserError(
            f"deterministic=true with workers={workers}: parallel trials draw from each"
            " other's results in the order they finish; use workers=1, or drop deterministic."
        )
    if timeout is not None:
        raise UserError(
            f"deterministic=true with timeout={timeout:g}: a time limit ends trials by the"
            " machine's speed; drop timeout= (the study's budget.timeout is ignored too)."
        )
    from tuner.plan import load_space  # not at import: plan imports this module

    stages = [stage] if stage in study.stages else study.stages
    racing = [s for s in stages if load_space(study, s).settings.get(TIME_KEY) is not None]
    if racing and study.samples is None:
        raise UserError(
            f"deterministic=true: stage {racing[0]} races batch sizes for time, and a"
            f" deterministic run needs a budget in samples instead: set budget.samples (samples"
            f" of training per candidate, like 100000) in {study.source}."
        )


def replay(study: optuna.Study, config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial config in a time race, with the sample count measured for its batch size
    before (by this stage's earlier trial of that size), so it trains the same samples."""
    out = dict(config)
    if out.get(TIME_KEY) is None or out.get(SAMPLES_KEY) is not None:
        return out
    stored = study.user_attrs.get(f"{PREFIX}{out.get('batch_size')}")
    if isinstance(stored, Mapping) and isinstance(stored.get("samples"), int):
        out[SAMPLES_KEY] = stored["samples"]
    return out


def record(trial: optuna.Trial, config: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    """Store a race trial's measured throughput and the sample count it gave with the stage;
    the first measurement of a batch size stands (a replay measures nothing)."""
    if not isinstance(result, Mapping) or config.get(TIME_KEY) is None:
        return
    if config.get(SAMPLES_KEY) is not None:
        return
    speed, samples = result.get("probe_samples_per_s"), result.get(SAMPLES_KEY)
    if not isinstance(speed, (int, float)) or not isinstance(samples, int):
        return
    key = f"{PREFIX}{config.get('batch_size')}"
    if key in trial.study.user_attrs:
        return
    trial.study.set_user_attr(
        key,
        {
            "samples_per_s": float(speed),
            "samples": samples,
            "time_budget": float(config[TIME_KEY]),
            "trial": trial.number,
        },
    )


def measured(attrs: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """A stage's stored race measurements by batch size (for status and the report)."""
    out = {}
    for key, value in attrs.items():
        if key.startswith(PREFIX) and key[len(PREFIX) :].isdigit() and isinstance(value, dict):
            out[int(key[len(PREFIX) :])] = value
    return dict(sorted(out.items()))


def apply(study: StudyConfig, deterministic: bool | None) -> StudyConfig:
    """The study with a run's ``deterministic=`` (None: the study file's), which also drops
    the study's time limit (``budget.timeout``): a deadline ends trials by speed."""
    on = study.deterministic if deterministic is None else bool(deterministic)
    return replace(study, deterministic=on, timeout=None if on else study.timeout)


def describe(study: StudyConfig) -> str | None:
    """One line on a deterministic run, for the run's output (None: it is not one)."""
    if not study.deterministic:
        return None
    budget = "" if study.samples is None else f"; a time race trains {study.samples} samples"
    return f"deterministic: one worker, no time limit{budget}"
