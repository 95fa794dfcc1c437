"""One trial: the bridge between an Optuna trial and the objective.

It draws the trial's values from the stage's space, trains through the objective with a
``report(epoch, metrics)`` that feeds Optuna's pruner and keeps the stage's deadline, and
records the result: its value, or PRUNED where it diverged or ran out of memory, or FAILed
with the error and its traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

import search_spaces
from tuner import artifacts, closed_loop, devices, race, signals
from tuner import storage as storages
from tuner.nested import merged
from tuner.objective import Objective
from tuner.plan import StagePlan
from tuner.results import SET, SURPLUS

LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# Stop reasons after which a trial is PRUNED rather than COMPLETE: the sampler learns to
# avoid the region (TPE ignores FAILed trials).
PRUNED_REASONS = ("diverged", "out_of_memory")


class TrialReport:
    """The objective's ``report(epoch, metrics)``: feeds Optuna's pruner each epoch, and
    stops a trial whose next epoch would end after its stage's time is up (so a run ends on
    time).

    A trial stopped for time keeps what it measured: it ends COMPLETE with its best epoch
    so far (as patience would end it), so a short run still hands every stage a result.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        metric: str,
        deadline: float | None,
        maximize: bool = True,
        pace: Pace | None = None,
    ) -> None:
        self.trial, self.metric, self.deadline, self.maximize = trial, metric, deadline, maximize
        self.pace = pace if pace is not None else Pace()
        self.reports = storages.Reports(trial)  # written about once a second, and at the end
        self.best: dict[str, float] = {}  # the best epoch's metrics so far, and its number
        self.curve: list[float] = []  # the metric of every epoch, for the trial's value
        self.started = self.last = time.time()
        self.prunable = True  # False: the pruner is not asked (a follow-up with more epochs)
        # The run's last epoch, where the config fixes it: no epoch follows it, so the deadline
        # does not cut it (a trial that trained every epoch ends on max_epochs, not out of time).
        self.last_epoch: int | None = None

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = time.time()
        if self.last == self.started:
            self.pace.first_report(now - self.started)
        epoch_seconds, self.last = now - self.last, now
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.curve.append(float(value))
        best = self.best.get(self.metric)
        if best is None or (value > best if self.maximize else value < best):
            self.best = {**{k: float(v) for k, v in metrics.items()}, "best_epoch": epoch}
        self.reports(float(value), epoch)
        if self.prunable and self.trial.should_prune():
            self.reports.flush()
            self.trial.set_user_attr("stop_reason", "pruned")
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        late = self.deadline is not None and now + epoch_seconds > self.deadline
        if late and epoch != self.last_epoch:
            raise OutOfTime(epoch)  # another epoch as long as this one would end too late

    def flush(self) -> None:
        """Write the reported values not written yet."""
        self.reports.flush()

    def result(self, epoch: int) -> dict[str, Any]:
        """The trial's result when time ran out after ``epoch``: its best epoch so far."""
        return {**self.best, "epochs_run": epoch, "stop_reason": "out_of_time"}


@dataclass
class Pace:
    """How soon this process's trials of a stage first report: no trial starts that could not
    report once before the stage's deadline."""

    first: float | None = None  # the shortest time from a trial's start to its first report

    def first_report(self, seconds: float) -> None:
        self.first = seconds if self.first is None else min(self.first, seconds)

    def too_late(self, deadline: float | None) -> bool:
        return deadline is not None and time.time() + (self.first or 0.0) >= deadline


class OutOfTime(Exception):
    """Raised by ``report`` when the stage's time is up; the objective ends the trial."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"out of time after epoch {epoch}")
        self.epoch = epoch


def make_objective(
    plan: StagePlan,
    fn: Objective,
    budget: float | None = None,
    deadline: float | None = None,
    pace: Pace | None = None,
    sampler_seed: int | None = None,
) -> StageObjective:
    """The Optuna objective of a stage: draw, train, record, score.

    With a budget, a trial that finds ``budget`` live trials before it (workers racing for
    the last places) ends at once as a FAILed ``surplus`` trial: the budget is exact. Each
    trial records the process that runs it (``pid``), the seed of that process's sampler
    (``sampler_seed``) and, with heartbeats, how long its heartbeat may be silent.
    """
    return StageObjective(plan, fn, budget, deadline, pace, sampler_seed)


class StageObjective:
    """A stage's Optuna objective (``make_objective``); it keeps the last trial it ran, and
    that trial's value, for the progress line."""

    def __init__(
        self,
        plan: StagePlan,
        fn: Objective,
        budget: float | None,
        deadline: float | None,
        pace: Pace | None,
        sampler_seed: int | None = None,
    ) -> None:
        self.plan, self.fn, self.budget, self.deadline, self.pace = (
            plan,
            fn,
            budget,
            deadline,
            pace,
        )
        self.sampler_seed = sampler_seed
        self.last: tuple[optuna.Trial, float | None] | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.last = (trial, None)
        value = self._run(trial)
        self.last = (trial, value)
        return value

    def _run(self, trial: optuna.Trial) -> float:
        plan, budget = self.plan, self.budget
        if budget is not None and _claimed_before(trial) >= budget:
            trial.set_user_attr("stop_reason", SURPLUS)
            raise Surplus(f"the stage's {budget:g} places are taken by other workers")
        drawn = search_spaces.suggest(trial, plan.space, plan.incumbent)
        # A queued follow-up (closed_loop.FollowUp) trains with more than its params: more epochs.
        extra = trial.user_attrs.get(SET) or {}
        config = race.replay(trial.study, merged(plan.incumbent, drawn, extra))
        started_attrs: dict[str, Any] = {
            "config": config,
            "pid": os.getpid(),
            **devices.trial_attrs(),
        }
        if self.sampler_seed is not None:
            started_attrs["sampler_seed"] = self.sampler_seed
        grace = storages.heartbeat_grace(trial.study._storage)
        if grace is not None:
            started_attrs["heartbeat_grace"] = grace  # status tells a stale trial by it
        storages.set_user_attrs(trial, started_attrs)
        started = time.perf_counter()
        metric, maximize = plan.study.metric, plan.study.direction == "maximize"
        report = TrialReport(trial, metric, self.deadline, maximize, self.pace)
        report.prunable = not extra  # its epochs are not the others' epochs: not compared
        report.last_epoch = last_epoch(config)
        try:
            try:
                result = self.fn(config, report)
            except OutOfTime as stop:
                result = report.result(stop.epoch)
            race.record(trial, config, result)  # a time race's measurement, for a replay
            report.flush()  # the trial's whole curve, before its result
            score(trial, result, metric, time.perf_counter() - started)
            # The value: the best mean over a few epochs (loop.smooth), not the luckiest one.
            window = int(plan.study.loop["smooth"])
            value = closed_loop.trial_value(result, report.curve, metric, window, maximize)
            model = result.get("model")
            if model is not None and artifacts.becomes_best(trial.study, value):
                # The dashboard offers the weights of each stage's best trial for download.
                artifacts.save_weights(trial.study, trial, model, plan.study.storage)
            return value
        except optuna.TrialPruned:
            report.flush()  # pruned by the objective itself: its curve so far
            raise
        except KeyboardInterrupt:
            signals.exit_on_next_interrupt()  # recording may hang; a second Ctrl-C ends it
            with contextlib.suppress(Exception):
                report.flush()
            storages.set_user_attrs(
                trial, {"stop_reason": "interrupted", "error": "interrupted (SIGINT or SIGTERM)"}
            )
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):  # the curve up to the error, where it can be
                report.flush()
            failure = {"error": f"{type(exc).__name__}: {exc}"}
            if not isinstance(exc, MissingMetric):  # its traceback is ours: it says nothing
                failure["traceback"] = traceback.format_exc(limit=-8)
            storages.set_user_attrs(trial, failure)
            raise


def last_epoch(config: Mapping[str, Any]) -> int | None:
    """The epoch a run of ``config`` ends on where nothing cuts it: its ``epochs``, unless it
    trains for a time or sample budget (then its epochs are not known before it runs)."""
    epochs = config.get("epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        return None
    budgeted = config.get("time_budget") is not None or config.get("train_samples") is not None
    return None if budgeted else epochs


class MissingMetric(ValueError):
    """The objective returned no finite value of the study's metric."""


class Surplus(Exception):
    """A trial that would exceed the stage's budget (another worker was faster)."""


def _claimed_before(trial: optuna.Trial) -> int:
    """Live trials (finished, running or waiting) numbered before this one."""
    states = storages.trial_states(trial.study)
    return sum(1 for number, state in states.items() if number < trial.number and state in LIVE)


def score(trial: optuna.Trial, result: Mapping[str, Any], metric: str, seconds: float) -> float:
    """Record a trial's result; its value, or PRUNED where it diverged or ran out of memory."""
    if not isinstance(result, Mapping):
        raise TypeError(
            f"the objective must return a dict of metrics, got {type(result).__name__}"
        )
    record = {k: plain(v) for k, v in result.items() if k not in ("model", "test")}
    record["trial_seconds"] = round(seconds, 3)
    storages.set_user_attrs(trial, record)  # one transaction, not one per key
    if record.get("stop_reason") in PRUNED_REASONS:
        raise optuna.TrialPruned(str(record["stop_reason"]))
    value = result.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MissingMetric(
            f"the objective returned no finite '{metric}' (got keys: {', '.join(result)})"
        )
    return float(value)


def plain(value: Any) -> Any:
    """A JSON-ready value (numpy and torch scalars become Python numbers)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return str(value)
