"""Running stages: each stage is one Optuna study, its trials calls of the objective.

The runner enqueues the incumbent as a stage's first trial, reports every epoch's
validation metric to Optuna (whose pruner may stop the trial), turns a diverged trial into
PRUNED with its reason, stops a stage whose trials keep failing, and resumes a stage up to
its budget when it is run again.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import optuna
from optuna.pruners import _percentile
from optuna.trial import FrozenTrial, TrialState

import search_spaces
from tuner import __version__, artifacts, diagnostics, notes, signals
from tuner import storage as storages
from tuner.config import DEFAULT_STUDY, StudyConfig, merged
from tuner.errors import StageFailed, StageRefused, UserError
from tuner.objective import Objective, load_objective, load_validator
from tuner.plan import (
    Source,
    StagePlan,
    load_space,
    plan_stage,
    rerun_command,
    stale_keys,
)
from tuner.progress import StageProgress
from tuner.results import SURPLUS, best_of

Print = Callable[[str], None]
COMPLETE = (TrialState.COMPLETE,)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
POLL_SECONDS = 1.0  # how often a worker with nothing to start looks for retried trials
FAILURE_STREAK = 5  # this many failed trials in a row stop a stage: the error is not bad luck
REFRESH_SECONDS = storages.FLUSH_SECONDS  # the pruner counts other workers' trials this often
# Stop reasons after which a trial is PRUNED rather than COMPLETE: the sampler learns to
# avoid the region (TPE ignores FAILed trials).
PRUNED_REASONS = ("diverged", "out_of_memory")


# --- samplers and pruners --------------------------------------------------------------------


def make_sampler(study: StudyConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded."""
    options = {k: v for k, v in study.sampler.items() if k != "name"}
    name = study.sampler.get("name", "tpe")
    try:
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **options)
        # group=True: TPE models the conditional parameters (momentum[sgd] ...) per branch.
        options.setdefault("multivariate", True)
        options.setdefault("group", True)
        return optuna.samplers.TPESampler(seed=seed, **options)
    except TypeError as exc:
        raise UserError(f"sampler {name}: {exc}.") from None


def make_pruner(plan: StagePlan, max_epochs: int) -> optuna.pruners.BasePruner:
    """The study's pruner; Hyperband's maximum resource is the trial's epoch budget.

    A grid stage (batch size) prunes nothing: its candidates train for equal *time*, so the
    same epoch means different amounts of training, and each must be seen to the end.
    """
    if plan.space.grid:
        return optuna.pruners.NopPruner()
    study = plan.study
    options = {k: v for k, v in study.pruner.items() if k != "name"}
    name = study.pruner.get("name", "median")
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**options)
        if name == "hyperband":
            options.setdefault("max_resource", max_epochs)
            return optuna.pruners.HyperbandPruner(**options)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**options)
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as exc:
        raise UserError(f"pruner {name}: {exc}") from None


class _CachedPercentilePruner(optuna.pruners.BasePruner):
    """Optuna's percentile (median) pruner, deciding as it decides, with what it reads and
    computes kept between epochs.

    Optuna's pruner reads the study's trials at every epoch, the running ones whole, and
    computes the percentile of the COMPLETE ones again. A COMPLETE trial no longer changes:
    this one counts them with a small query once per trial and at most once a second, reads
    them again only when their number has changed, and keeps the percentile of each step
    until then. A trial that another worker finishes while this one runs counts from this
    trial's next decision at least a second on (workers race anyway); in one process, every
    decision counts every finished trial.
    """

    def __init__(self, pruner: optuna.pruners.PercentilePruner) -> None:
        self.pruner = pruner
        self._complete: list[FrozenTrial] = []
        self._percentiles: dict[int, float] = {}  # by step, over self._complete
        self._counted: tuple[int, float] = (-1, -math.inf)  # trial id, time of the count

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        # The checks of optuna.pruners.PercentilePruner.prune, in its order.
        settings = self.pruner
        complete = self._read(study, trial)
        if not complete or len(complete) < settings._n_startup_trials:
            return False
        step = trial.last_step
        if step is None or step < settings._n_warmup_steps:
            return False
        steps = trial.intermediate_values.keys()
        if not _percentile._is_first_in_interval_step(
            step, steps, settings._n_warmup_steps, settings._interval_steps
        ):
            return False
        direction = study.direction
        best = _percentile._get_best_intermediate_result_over_steps(trial, direction)
        if math.isnan(best):
            return True
        if step not in self._percentiles:
            self._percentiles[step] = _percentile._get_percentile_intermediate_result_over_trials(
                complete, direction, step, settings._percentile, settings._n_min_trials
            )
        bar = self._percentiles[step]
        if math.isnan(bar):
            return False
        return best < bar if direction == optuna.study.StudyDirection.MAXIMIZE else best > bar

    def _read(self, study: optuna.Study, trial: FrozenTrial) -> list[FrozenTrial]:
        """The stage's COMPLETE trials: counted once per trial and at most once a second,
        read again when their number changed."""
        now = time.monotonic()
        if self._counted[0] == trial._trial_id and now - self._counted[1] < REFRESH_SECONDS:
            return self._complete
        self._counted = (trial._trial_id, now)
        count = storages.count_complete(study)
        if count != len(self._complete):
            # The trials the sampler read as this trial started, unless one finished since.
            complete = study._get_trials(deepcopy=False, states=COMPLETE, use_cache=True)
            if len(complete) != count:
                complete = study.get_trials(deepcopy=False, states=COMPLETE)
            self._complete, self._percentiles = complete, {}
        return self._complete


def _read_less(pruner: optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    if isinstance(pruner, optuna.pruners.PercentilePruner):  # the median pruner is one
        return _CachedPercentilePruner(pruner)
    return pruner


# --- one trial -------------------------------------------------------------------------------


class _Report:
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
        self.started = self.last = time.time()

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = time.time()
        if self.last == self.started:
            self.pace.first_report(now - self.started)
        epoch_seconds, self.last = now - self.last, now
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        best = self.best.get(self.metric)
        if best is None or (value > best if self.maximize else value < best):
            self.best = {**{k: float(v) for k, v in metrics.items()}, "best_epoch": epoch}
        self.reports(float(value), epoch)
        if self.trial.should_prune():
            self.reports.flush()
            self.trial.set_user_attr("stop_reason", "pruned")
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        if self.deadline is not None and now + epoch_seconds > self.deadline:
            raise _OutOfTime(epoch)  # another epoch as long as this one would end too late

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


class _OutOfTime(Exception):
    """Raised by ``report`` when the stage's time is up; the objective ends the trial."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"out of time after epoch {epoch}")
        self.epoch = epoch


def make_objective(
    plan: StagePlan,
    fn: Objective,
    budget: int | None = None,
    deadline: float | None = None,
    pace: Pace | None = None,
) -> StageObjective:
    """The Optuna objective of a stage: draw, train, record, score.

    With a budget, a trial that finds ``budget`` live trials before it (workers racing for
    the last places) ends at once as a FAILed ``surplus`` trial: the budget is exact.
    """
    return StageObjective(plan, fn, budget, deadline, pace)


class StageObjective:
    """A stage's Optuna objective (``make_objective``); it keeps the last trial it ran, and
    that trial's value, for the progress line."""

    def __init__(
        self,
        plan: StagePlan,
        fn: Objective,
        budget: int | None,
        deadline: float | None,
        pace: Pace | None,
    ) -> None:
        self.plan, self.fn, self.budget, self.deadline, self.pace = (
            plan,
            fn,
            budget,
            deadline,
            pace,
        )
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
            raise _Surplus(f"the stage's {budget} trials are taken by other workers")
        drawn = search_spaces.suggest(trial, plan.space, plan.incumbent)
        config = merged(plan.incumbent, drawn)
        storages.set_user_attrs(trial, {"config": config})
        started = time.perf_counter()
        metric, maximize = plan.study.metric, plan.study.direction == "maximize"
        report = _Report(trial, metric, self.deadline, maximize, self.pace)
        try:
            try:
                result = self.fn(config, report)
            except _OutOfTime as stop:
                result = report.result(stop.epoch)
            report.flush()  # the trial's whole curve, before its result
            value = _score(trial, result, metric, time.perf_counter() - started)
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


class MissingMetric(ValueError):
    """The objective returned no finite value of the study's metric."""


class _Surplus(Exception):
    """A trial that would exceed the stage's budget (another worker was faster)."""


def _claimed_before(trial: optuna.Trial) -> int:
    """Live trials (finished, running or waiting) numbered before this one."""
    states = storages.trial_states(trial.study)
    return sum(1 for number, state in states.items() if number < trial.number and state in LIVE)


def _score(trial: optuna.Trial, result: Mapping[str, Any], metric: str, seconds: float) -> float:
    """Record a trial's result; its value, or PRUNED where it diverged or ran out of memory."""
    if not isinstance(result, Mapping):
        raise TypeError(
            f"the objective must return a dict of metrics, got {type(result).__name__}"
        )
    record = {k: _plain(v) for k, v in result.items() if k not in ("model", "test")}
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


def _plain(value: Any) -> Any:
    """A JSON-ready value (numpy and torch scalars become Python numbers)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)


# --- one stage -------------------------------------------------------------------------------


@dataclass
class Budget:
    """A stage's budget: finished trials, and seconds (None: no limit)."""

    trials: int
    timeout: float | None


class _Progress:
    """A line per finished trial: stage, n/N, state, value, best so far, why it stopped."""

    def __init__(
        self, plan: StagePlan, budget: Budget, out: Print, bar: StageProgress | None = None
    ) -> None:
        self.plan, self.budget, self.out, self.bar = plan, budget, out, bar
        self.failures: list[str] = []

    @property
    def failing(self) -> bool:
        """The last FAILURE_STREAK trials failed with one and the same error."""
        recent = self.failures[-FAILURE_STREAK:]
        return len(recent) == FAILURE_STREAK and len(set(recent)) == 1

    def __call__(
        self, study: optuna.Study, trial: optuna.Trial, value: float | None
    ) -> dict[int, TrialState]:
        """Print the line of a trial that has just ended (``value``: what its objective
        returned); return every trial's state, read for it."""
        states = storages.trial_states(study)  # one small query: this trial's state, and n
        ended = _ended(trial, states[trial.number], value)
        if ended.user_attrs.get("stop_reason") == SURPLUS:
            return states
        done = sum(1 for state in states.values() if state in FINISHED)
        metric = self.plan.study.metric
        state = ended.state.name
        shown = f"{metric}={ended.value:.4f}" if ended.value is not None else ""
        best = storages.best_complete(study, "config")  # as results.best_trial picks it
        best_text = f"best {best[1]:.4f} (#{best[0]})" if best is not None else "no best yet"
        reason = _why(ended)
        params = " ".join(f"{k}={_short(v)}" for k, v in ended.params.items())
        seconds = ended.duration.total_seconds() if ended.duration else 0.0
        if self.bar is not None:
            self.bar.update(done, best[1] if best is not None else None)
        self.out(
            f"[{self.plan.stage} {done}/{self.budget.trials}] #{ended.number} {state:<8} "
            f"{shown:<16} {best_text:<22} {reason:<22} {seconds:5.1f}s  {params}"
        )
        if ended.state == TrialState.FAIL:
            self.failures.append(str(ended.user_attrs.get("error", "unknown error")))
        else:
            self.failures.clear()
        return states


def _ended(trial: optuna.Trial, state: TrialState, value: float | None) -> FrozenTrial:
    """A trial that has just ended, as this process holds it: what Optuna stored of it (but
    its system attrs), without reading it back from the storage."""
    held = trial._cached_frozen_trial
    if state == TrialState.PRUNED:  # Optuna's value of a pruned trial: its last report
        last = held.last_step
        value = None if last is None else held.intermediate_values[last]
    return FrozenTrial(
        number=held.number,
        state=state,
        value=value if state in FINISHED else None,
        datetime_start=held.datetime_start,
        datetime_complete=datetime.datetime.now(),
        params=held.params,
        distributions=held.distributions,
        user_attrs=held.user_attrs,
        system_attrs={},
        intermediate_values=held.intermediate_values,
        trial_id=held._trial_id,
    )


def _why(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    if trial.state == TrialState.FAIL:
        return str(attrs.get("error", "failed"))[:60]
    reason = attrs.get("stop_reason", trial.state.name.lower())
    epoch = attrs.get("best_epoch")
    if reason in ("pruned", "out_of_time"):
        return f"{reason.replace('_', ' ')} at epoch {trial.last_step}"
    return f"{reason}, best epoch {epoch}" if epoch is not None else str(reason)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def start_stage(
    plan: StagePlan,
    storage: optuna.storages.BaseStorage,
    budget: Budget,
    *,
    restart: bool = False,
    out: Print = print,
) -> int:
    """Create (or reopen) a stage's study, record its plan, enqueue its first trials, and
    print its header; returns how many trials are finished already."""
    existing = storages.load(storage, plan.name)
    if existing is not None and restart:
        optuna.delete_study(study_name=plan.name, storage=storage)
        existing = None
    if existing is not None and existing.trials:
        _refuse_if_stale(plan, existing)
    study = optuna.create_study(
        study_name=plan.name,
        storage=storage,
        direction=optuna.study.StudyDirection[plan.study.direction.upper()],
        load_if_exists=True,
    )
    if not study.trials:
        _start(plan, study)
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    _header(plan, budget, done, out)
    if done >= budget.trials:
        out(
            f"  stage {plan.stage} has {done}/{budget.trials} finished trials already"
            f" (raise trials= to run more)."
        )
    return done


def work(
    plan: StagePlan,
    storage: optuna.storages.BaseStorage,
    fn: Objective,
    budget: Budget,
    *,
    deadline: float | None = None,
    worker: int = 0,
    out: Print = print,
    bar: StageProgress | None = None,
) -> optuna.Study:
    """One worker's share of a stage: run trials until the stage has ``budget.trials``
    finished ones, however many workers (here or on other machines) run beside it.

    A worker with nothing to start waits while other trials run: if one of them fails, or
    its worker dies (its heartbeat stops and the trial is retried), this worker takes it.
    """
    n_before = storage.get_n_trials(storage.get_study_id_from_name(plan.name))
    study = optuna.load_study(
        study_name=plan.name,
        storage=storage,
        sampler=make_sampler(plan.study, _seed(plan, n_before, worker)),
        pruner=_read_less(make_pruner(plan, int(plan.incumbent.get("epochs", 1) or 1))),
    )
    progress = _Progress(plan, budget, out, bar)
    pace = Pace()
    objective = make_objective(plan, fn, budget.trials, deadline, pace)
    states = storages.trial_states(study)  # one small query, not every trial read whole
    while not progress.failing:
        if pace.too_late(deadline):
            break
        live = sorted(number for number, state in states.items() if state in LIVE)
        waiting = any(states[number] == TrialState.WAITING for number in live[: budget.trials])
        if len(live) < budget.trials or waiting:
            # No callback: Optuna would read the trial back whole for it, and the line needs
            # only what this process holds of it.
            objective.last = None
            study.optimize(objective, n_trials=1, catch=(Exception,))
            if objective.last is not None:
                states = progress(study, *objective.last)  # the states, read for its line
                continue
        elif TrialState.RUNNING in states.values():
            if storages.heartbeat_enabled(storage):
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial is retried
            time.sleep(POLL_SECONDS)
        else:
            break
        states = storages.trial_states(study)
    if progress.failing:
        last = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL][-1]
        if last.user_attrs.get("traceback"):
            out(str(last.user_attrs["traceback"]).rstrip())
        raise StageFailed(
            f"Stage {plan.stage} stopped: {FAILURE_STREAK} trials in a row failed with"
            f" {progress.failures[-1]}"
        )
    return study


def run_stage(
    plan: StagePlan,
    storage: optuna.storages.BaseStorage,
    fn: Objective,
    budget: Budget,
    *,
    restart: bool = False,
    out: Print = print,
) -> optuna.Study:
    """Run (or resume) one stage in this process until it has ``budget.trials`` finished
    trials."""
    start_stage(plan, storage, budget, restart=restart, out=out)
    deadline = None if budget.timeout is None else time.time() + budget.timeout
    return work(plan, storage, fn, budget, deadline=deadline, out=out)


def _start(plan: StagePlan, study: optuna.Study) -> None:
    """Record the stage's plan with it, and enqueue its first trials."""
    attrs = {
        "stage": plan.stage,
        "stage_index": plan.index,
        "study": plan.study.name,
        "metric": plan.study.metric,
        "searches": list(plan.space.keys),
        "fixed": plan.fixed,
        "lineage": plan.lineage_dict(),
        "study_config": plan.study.as_dict(),
        "tuner_version": __version__,
    }
    storages.set_study_user_attrs(study, {key: _plain(value) for key, value in attrs.items()})
    if plan.space.grid:
        for point in search_spaces.grid_points(plan.space, plan.incumbent):
            study.enqueue_trial(point, skip_if_exists=True)
    else:
        # skip_if_exists: workers on other machines may start the stage at the same moment.
        params = search_spaces.params_of(plan.space, plan.incumbent)
        study.enqueue_trial(params, skip_if_exists=True)


def _refuse_if_stale(plan: StagePlan, existing: optuna.Study) -> None:
    changed = stale_keys(plan, existing.user_attrs.get("lineage", {}))
    if not changed:
        return
    stored = existing.user_attrs.get("lineage", {})
    key = changed[0]
    was = Source.from_dict(stored[key]).label if key in stored else "nothing"
    raise StageRefused(
        f"Stage {plan.stage} is stale: its {key} came from {was} when it ran, and now comes"
        f" from {plan.lineage[key].label}. Start it again with"
        f" `{rerun_command(plan.study, plan.stage, 'restart=true')}` (its"
        f" {len(existing.trials)} trials are deleted)."
    )


def _seed(plan: StagePlan, n_before: int, worker: int = 0) -> int:
    # A resumed stage must not replay the random start-up trials of its first session, and
    # parallel workers must not draw the same ones.
    base = int(plan.incumbent.get("seed", 0) or 0) * 10_007 + plan.index * 101
    return base + n_before + worker * 7_919


def _header(plan: StagePlan, budget: Budget, done: int, out: Print) -> None:
    fixed = (
        ", ".join(f"{k}={_short(v)} ({plan.lineage[k].label})" for k, v in plan.fixed.items())
        or "nothing"
    )
    limit = f", at most {budget.timeout:.0f}s" if budget.timeout else ""
    out(
        f"== stage {plan.index + 1}/{len(plan.study.stages)} {plan.stage}"
        f" ({plan.name}): {budget.trials} trials{limit}, {done} finished before"
    )
    out(f"   searches {', '.join(plan.space.keys) or 'nothing'}; fixed: {fixed}")


# --- a run -----------------------------------------------------------------------------------


def stage_budgets(
    study: StudyConfig, stages: tuple[str, ...], trials: int | None
) -> dict[str, int]:
    """Trials per stage: the study's, or a run's ``trials=`` shared as the study says."""
    if trials is None:
        return {s: study.trials[s] for s in stages}
    if len(stages) == 1:
        return {stages[0]: trials}
    total = sum(study.share[s] for s in stages)
    return {s: max(1, round(trials * study.share[s] / total)) for s in stages}


def stage_timeout(
    study: StudyConfig, stage: str, remaining_stages: tuple[str, ...], left: float | None
) -> float | None:
    """A stage's share of the time left; what a stage leaves unused flows to the next."""
    if left is None:
        return None
    total = sum(study.share[s] for s in remaining_stages)
    return max(1.0, left * study.share[stage] / total)


def run(
    study: StudyConfig,
    *,
    stage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    restart: bool = False,
    workers: int = 1,
    threads: int | None = None,
    heartbeat: float = storages.HEARTBEAT_SECONDS,
    check: bool = True,
    out: Print = print,
) -> None:
    """Run one stage, or all stages in order; nothing is written before the plan holds.

    With ``check``, the pre-flight checks (tuner.checks) run first when the run starts at
    the study's first stage or at its first unfinished one; a failed check raises CheckFailed.

    With ``workers`` > 1, each stage runs in that many processes on the same storage, sharing
    the stage's budget; the next stage is planned when all are done. Each process trains with
    ``threads`` torch threads (None: this one keeps torch's setting, the others take one).
    """
    stages = (stage,) if stage else study.stages
    storage = storages.open_existing(study.storage, heartbeat=heartbeat)
    first = plan_stage(study, stages[0], best_of(storage, study))  # may refuse: nothing written
    with _Workers(workers - 1, heartbeat, study.objective, threads or 1) as helpers:
        _set_threads(threads)  # imports torch (2 s): the workers above start beside it
        _run(study, stage, first, storage, helpers, trials, timeout, restart, check, out)


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def _run(
    study: StudyConfig,
    stage: str | None,
    first: StagePlan,
    storage: optuna.storages.BaseStorage | None,
    helpers: _Workers,
    trials: int | None,
    timeout: float | None,
    restart: bool,
    check: bool,
    out: Print,
) -> None:
    """``run`` once its worker processes are started: their imports overlap with this."""
    stages = (stage,) if stage else study.stages
    workers, heartbeat = len(helpers.processes) + 1, helpers.heartbeat
    fn = load_objective(study.objective)
    preflight(first, stages)
    from tuner import checks  # not with this module: it imports torch (see _set_threads)

    if check and checks.due(study, stages[0], storage):
        checks.preflight(first.incumbent, study.objective, out)
    if storage is None:  # a new SQLite file: made now that the plan and checks hold
        storage = storages.open_storage(study.storage, heartbeat=heartbeat)
    budgets = stage_budgets(study, stages, trials)
    if timeout is None and study.timeout is not None:
        share = 1.0 if not stage else study.share[stage] / sum(study.share.values())
        timeout = study.timeout * share
    run_deadline = None if timeout is None else time.time() + timeout
    for i, name in enumerate(stages):
        plan = plan_stage(study, name, best_of(storage, study))
        left = None if run_deadline is None else run_deadline - time.time()
        budget = Budget(budgets[name], stage_timeout(study, name, stages[i:], left))
        done = start_stage(plan, storage, budget, restart=restart, out=out)
        if done >= budget.trials:
            continue
        deadline = None if budget.timeout is None else time.time() + budget.timeout
        # The bar shares the terminal with worker processes' lines only when there are none.
        bar = StageProgress(plan.stage, budget.trials, budget.timeout, draw=workers == 1)
        bar.update(done, None)
        with bar:
            helpers.start(plan, budget, deadline)
            found = work(plan, storage, fn, budget, deadline=deadline, out=bar.wrap(out), bar=bar)
            helpers.wait()
        notes.write_stage_note(found, diagnostics.record(found, out))
        if name != stages[-1] and best_of(storage, study)(name) is None:
            raise StageFailed(_nothing_finished(study, found))


def _nothing_finished(study: StudyConfig, found: optuna.Study) -> str:
    """Why a run stops after a stage without a result: the stages after it need one."""
    trials = [t for t in found.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    trials = [t for t in trials if t.user_attrs.get("stop_reason") != SURPLUS]
    counts = ", ".join(
        f"{n} {state.name.lower()}"
        for state in (TrialState.PRUNED, TrialState.FAIL)
        if (n := sum(1 for t in trials if t.state == state))
    )
    last = trials[-1] if trials else None
    why = ""
    if last is not None:
        reason = last.user_attrs.get("error") or last.user_attrs.get("stop_reason")
        why = f"; the last one: {last.state.name} ({reason})" if reason else ""
    which = "" if study.name == DEFAULT_STUDY else f" study={study.arg}"
    return (
        f"Stage {found.user_attrs.get('stage', found.study_name)} ended with no COMPLETE trial"
        f" ({counts or 'none ran'}){why}, and the stages after it need its best values; see"
        f" `python -m tuner status{which}`."
    )


def preflight(first: StagePlan, stages: tuple[str, ...]) -> None:
    """Check what would otherwise fail trials minutes into a run, before anything is written:
    the sampler and pruner settings, and (with the objective's ``validate``) the first
    config with every categorical choice of every stage that is to run."""
    study = first.study
    make_sampler(study, 0)
    make_pruner(first, 1)
    validate = load_validator(study.objective)
    if validate is None:
        return
    configs = [first.incumbent]
    for name in stages:
        for param in load_space(study, name).params:
            for choice in param.choices or ():
                configs.append(merged(first.incumbent, {param.key: choice}))
    for config in configs:
        try:
            validate(config)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(str(exc)) from None


class _Workers:
    """Worker processes beside this one (``workers=N``), each running its share of every stage
    of a run. They start with the run, so that their imports (torch, the objective: seconds)
    overlap with its planning and checks, and serve all its stages."""

    def __init__(self, n: int, heartbeat: float, objective: str, threads: int = 1) -> None:
        context = multiprocessing.get_context("spawn")  # no forked torch or database state
        self.heartbeat = heartbeat
        self.pipes = [context.Pipe() for _ in range(n)]
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(jobs, index, heartbeat, objective, threads),
                name=f"tuner-worker-{index}",
            )
            for index, (_, jobs) in enumerate(self.pipes, start=1)
        ]
        self.busy = False  # whether they were handed a stage

    def __enter__(self) -> _Workers:
        for process, (_, jobs) in zip(self.processes, self.pipes, strict=True):
            process.start()
            jobs.close()  # the worker's end: a worker that dies is seen as the pipe's end
        return self

    def start(self, plan: StagePlan, budget: Budget, deadline: float | None) -> None:
        """Hand each worker the stage."""
        self.busy = True
        for pipe, _ in self.pipes:
            pipe.send((plan, budget, deadline))

    def wait(self) -> None:
        """Wait for each worker to be done with the stage; a worker that stopped on a failing
        stage, or died, fails the run the same way."""
        codes = []
        for (pipe, _), process in zip(self.pipes, self.processes, strict=True):
            try:
                codes.append(pipe.recv())
            except EOFError:
                process.join()
                codes.append(process.exitcode or 1)
        if any(code == signals.EXIT_STATUS for code in codes):
            raise KeyboardInterrupt
        failed = [code for code in codes if code]
        if failed:
            raise StageFailed(f"a worker process ended with exit status {failed[0]}")

    def __exit__(self, *exc: object) -> None:
        for (pipe, _), process in zip(self.pipes, self.processes, strict=True):
            if not self.busy:
                process.terminate()  # still starting up, no trial of theirs to keep
            with contextlib.suppress(OSError):
                pipe.send(None)  # the run is over; a worker in a stage finishes its share first
            process.join()


def _warm_up() -> None:
    """Pay a process's one-time cost of its first trial ahead, while a worker waits for the
    run's plan and checks: torch imports its compiler (torch._dynamo, about 1 s here) when
    the process builds its first optimizer."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _worker_main(
    jobs: Connection, index: int, heartbeat: float, objective: str, threads: int
) -> None:
    """A worker process: ``threads`` torch threads, the run's stages as they come, its own
    storage connection."""
    _set_threads(threads)
    signals.install()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        with contextlib.suppress(Exception):  # imported ahead; the run reports what fails
            load_objective(objective)
        _warm_up()
        while (job := jobs.recv()) is not None:
            plan, budget, deadline = job
            jobs.send(_work_share(plan, budget, deadline, index, heartbeat))
    except KeyboardInterrupt:
        sys.exit(signals.EXIT_STATUS)
    except EOFError:
        return  # the run is gone


def _work_share(
    plan: StagePlan, budget: Budget, deadline: float | None, index: int, heartbeat: float
) -> int:
    """A worker's share of a stage; its exit status (0: done)."""
    try:
        storage = storages.open_storage(plan.study.storage, heartbeat=heartbeat)
        fn = load_objective(plan.study.objective)
        work(plan, storage, fn, budget, deadline=deadline, worker=index,
             out=lambda line: print(line, flush=True))  # fmt: skip
    except (StageFailed, UserError) as exc:
        print(f"tuner worker {index}: {storages.mask(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0
