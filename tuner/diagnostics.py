"""What a finished stage says about its search (playbook, seeds/000 and 003): the best value
at the edge of its range, the share of failed / diverged / pruned trials, a model that is
not learning, and where the best epoch falls.

Everything is read from the stage study (trials, their distributions and user attrs), so the
findings can be computed again at any time: ``status`` does, and the runner stores them with
the stage (study user attr ``diagnostics``) for the dashboard note.

Example:
    >>> study = optuna.load_study(study_name="mnist1d_cnn/lr", storage="sqlite:///tuner.db")
    >>> diagnose(study)
    ['lr=0.0297 (best, trial #9) sits at the upper edge of its range 0.0003 … 0.03 (log): ...']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.results import SURPLUS, best_trial

Print = Callable[[str], None]
ATTR = "diagnostics"  # the study user attr that holds the findings
EDGE = 0.10  # the best value within this share of its range (log range: of its log-span)
MOSTLY = 0.5  # more than this share of the finished trials diverged: the lr range is too high
NEAR_CHANCE = 0.9  # every trial's validation loss above this share of ln C: not learning
EARLY_EPOCHS = 0.10  # the best epoch in the first 10% of the epochs: fewer would do
LATE_EPOCHS = 0.75  # ... after 75% of them: train longer


def diagnose(study: optuna.Study) -> list[str]:
    """A stage's findings, one line each; empty when nothing stands out."""
    trials = [
        t for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL or t.user_attrs.get("stop_reason") != SURPLUS
    ]  # fmt: skip
    trials = [t for t in trials if t.state not in (TrialState.RUNNING, TrialState.WAITING)]
    if not trials:
        return []
    stage = str(study.user_attrs.get("stage", study.study_name.rsplit("/", 1)[-1]))
    best = best_trial(study)
    found = [*outcomes(trials), *not_learning(trials)]
    if best is not None:
        found += edges(best, stage)
        found += best_epoch(best)
    return found


def record(study: optuna.Study, out: Print = print) -> list[str]:
    """Diagnose a stage, store the findings with it (user attr ``diagnostics``), print them."""
    found = diagnose(study)
    study.set_user_attr(ATTR, found)
    for line in found:
        out(f"  ! {line}")
    return found


# --- the findings: one function each --------------------------------------------------------


def edges(best: FrozenTrial, stage: str) -> list[str]:
    """The best trial's numeric values that sit within 10% of an edge of their range."""
    found = []
    for name, dist in best.distributions.items():
        side = _edge(best.params[name], dist)
        if side is None:
            continue
        wider = _widened(dist, side)
        if wider is None:
            continue  # a natural bound (0, or 1 for an integer): nothing beyond it to try
        assert isinstance(dist, (FloatDistribution, IntDistribution))
        key = "high" if side == "upper" else "low"
        found.append(
            f"{name}={_fmt(best.params[name])} (best, trial #{best.number}) sits at the"
            f" {side} edge of its range {_fmt(dist.low)} … {_fmt(dist.high)}"
            f"{' (log)' if dist.log else ''}: widen the search space, e.g. {key}:"
            f" {_fmt(wider)} (search_spaces/{stage}.yaml, or search_spaces: in the study file)."
        )
    return found


def outcomes(trials: Sequence[FrozenTrial]) -> list[str]:
    """The share of pruned, diverged and failed trials; most diverged: lower the lr range."""
    n = len(trials)
    diverged = [t for t in trials if t.user_attrs.get("stop_reason") == "diverged"]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    pruned = [
        t for t in trials
        if t.state == TrialState.PRUNED and t.user_attrs.get("stop_reason") != "diverged"
    ]  # fmt: skip
    if not (diverged or failed or pruned):
        return []
    groups = (("pruned", pruned), ("diverged", diverged), ("failed", failed))
    parts = [f"{len(group)} {word} ({len(group) / n:.0%})" for word, group in groups if group]
    found = [f"{n} trials: {', '.join(parts)}."]
    if len(diverged) > MOSTLY * n:
        found.append(f"most trials diverged ({len(diverged)} of {n}): {_lower_lr(diverged)}")
    if failed:
        error = str(failed[-1].user_attrs.get("error", "unknown error"))[:120]
        found.append(f"{len(failed)} trial(s) failed; the last with: {error}")
    return found


def not_learning(trials: Sequence[FrozenTrial]) -> list[str]:
    """Every trial's validation loss stayed near chance (ln C): the model learns nothing."""
    losses, classes = [], None
    for t in trials:
        loss = t.user_attrs.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.append(float(loss))
        matrix = t.user_attrs.get("confusion_matrix")
        if isinstance(matrix, list) and len(matrix) >= 2:
            classes = len(matrix)
    if not losses or classes is None:
        return []
    chance = math.log(classes)
    if min(losses) < NEAR_CHANCE * chance:
        return []
    return [
        f"the model is not learning: every trial's validation loss stayed near chance (best"
        f" {min(losses):.3f}, ln {classes} = {chance:.3f}; seeds/000 'loss stays at 0.69')."
        " Likely causes: the lr range (too low, or so high it stalls), labels misaligned"
        " with the inputs, inputs not normalized, or the wrong loss for the task;"
        " `python -m tuner check` tests the model and data."
    ]


def best_epoch(best: FrozenTrial) -> list[str]:
    """Where the best trial's best epoch falls among its epochs (not for a time budget)."""
    config: dict[str, Any] = best.user_attrs.get("config") or {}
    epoch, epochs = best.user_attrs.get("best_epoch"), config.get("epochs")
    budgeted = config.get("time_budget") is not None or config.get("train_samples") is not None
    if budgeted or not isinstance(epoch, int):
        return []
    if not isinstance(epochs, int) or epochs < 2 or epoch < 1:
        return []
    where = f"the best trial (#{best.number}) peaked at epoch {epoch} of {epochs}"
    if epoch <= EARLY_EPOCHS * epochs:
        return [f"{where}, in the first 10%: fewer epochs would do (epochs={max(2, 3 * epoch)})."]
    if epoch > LATE_EPOCHS * epochs:
        return [
            f"{where}, in the last 25%: it may still be improving, train longer"
            f" (epochs={2 * epochs}; a decaying schedule peaks late by design, so compare)."
        ]
    return []


# --- helpers ---------------------------------------------------------------------------------


def _edge(value: Any, dist: BaseDistribution) -> str | None:
    """``lower`` or ``upper`` when a numeric value lies within EDGE of its range's end."""
    if not isinstance(dist, (FloatDistribution, IntDistribution)) or dist.high <= dist.low:
        return None
    if dist.log:
        if value <= 0:
            return None
        position = math.log(value / dist.low) / math.log(dist.high / dist.low)
    else:
        position = (value - dist.low) / (dist.high - dist.low)
    if position <= EDGE:
        return "lower"
    if position >= 1 - EDGE:
        return "upper"
    return None


def _widened(dist: FloatDistribution | IntDistribution | BaseDistribution, side: str) -> Any:
    """The bound a wider range would have on ``side``; None at a natural bound."""
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    low, high = dist.low, dist.high
    if dist.log:
        return high * 10 if side == "upper" else low / 10
    if isinstance(dist, IntDistribution):
        step = max(1, (high - low) // 2)
        if side == "lower":
            return None if low <= 1 else max(1, low - step)
        return high + step
    if side == "lower":
        return None if low <= 0 else (low / 2 if low <= 1 else low - (high - low) / 2)
    if low >= 0 and high < 1:  # a share (dropout, momentum): halfway to 1
        return (1 + high) / 2
    return high + (high - low) / 2


def _lower_lr(diverged: Sequence[FrozenTrial]) -> str:
    lrs = [v for t in diverged for k, v in t.params.items() if k.split("[")[0] == "lr"]
    if not lrs:
        return "lower the learning rate (lr=...) or the range it is drawn from."
    return (
        f"lower the lr range (the smallest lr that diverged: {_fmt(min(lrs))}; e.g. high:"
        f" {_fmt(min(lrs) / 3)}), or add warmup."
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
