"""One stage: create or resume its Optuna study, record its plan, enqueue its first trials,
and run trials until the stage has its budget of finished ones, however many workers share it.

The incumbent (the defaults with the values the stages before fixed) is the first trial, so
a stage never ends worse than the one before it; a stage whose trials keep failing with the
same error stops; a stale stage (an upstream value changed since it ran) refuses to mix.
"""

from __future__ import annotations

import datetime
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import search_spaces
from tuner import __version__, closed_loop, retry
from tuner import storage as storages
from tuner.closed_loop import count
from tuner.errors import StageFailed, StageRefused, UserError
from tuner.nested import merged
from tuner.objective import Objective
from tuner.plan import Source, StagePlan, rerun_command, stale_keys
from tuner.progress import StageProgress
from tuner.results import SURPLUS
from tuner.samplers import make_pruner, make_sampler, read_less
from tuner.trial import LIVE, Pace, make_objective, plain

Print = Callable[[str], None]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 1.0  # how often a worker with nothing to start looks for retried trials
OUT_OF_TIME = "out of time: the next trial would end after the stage's deadline"
FAILURE_STREAK = 5  # this many failed trials in a row stop a stage: the error is not bad luck


@dataclass
class Budget:
    """A stage's budget: finished trials, and seconds (None: no limit). With ``credit`` (and
    the study's ``loop.pruned_credit``), a pruned trial counts by the share of the epochs it
    trained (tuner.closed_loop.credit)."""

    trials: int
    timeout: float | None
    credit: bool = True


def spent(
    plan: StagePlan,
    budget: Budget,
    study: optuna.Study,
    finished: int,
    states: dict[int, TrialState] | None = None,
) -> float:
    """How much of ``budget.trials`` a stage's ``finished`` trials have taken: one each, a
    pruned one less its credit (tuner.closed_loop.credit); ``states`` as ``_credit`` takes it."""
    return finished - _credit(plan, budget, study, states)


def _credit(
    plan: StagePlan,
    budget: Budget,
    study: optuna.Study,
    states: dict[int, TrialState] | None = None,
) -> float:
    """The pruned trials' credit; none read where ``states`` (every trial's) holds none."""
    if not budget.credit or (states is not None and TrialState.PRUNED not in states.values()):
        return 0.0
    return closed_loop.credit(plan, study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))


class TrialLines:
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
        finished = sum(1 for state in states.values() if state in FINISHED)
        done = spent(self.plan, self.budget, study, finished, states)
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
            f"[{self.plan.stage} {count(done)}/{self.budget.trials}] #{ended.number} {state:<8} "
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
) -> float:
    """Create (or reopen) a stage's study, record its plan, enqueue its first trials, and
    print its header; returns how much of its budget its finished trials have taken already
    (a pruned one less its credit: tuner.closed_loop.credit)."""
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
    if storages.heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(study)  # a trial whose worker died: retried
    again = retry.queue(study)  # the cut-off trials' values first, then what was queued
    if plan.space.grid:
        _queue_grid(plan, study)
    trials = study.get_trials(deepcopy=False)
    done = spent(plan, budget, study, sum(1 for t in trials if t.state in FINISHED))
    _header(plan, budget, done, out)
    if again and done < budget.trials:
        cut = [t for t in trials if t.number in again]
        out(
            f"   runs {len(cut)} cut-off trial(s) again first: "
            + ", ".join(f"#{t.number} ({_why(t)})" for t in cut)
        )
    if done >= budget.trials:
        out(
            f"  stage {plan.stage} has {count(done)}/{budget.trials} finished trials already"
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
    reserve: Callable[[optuna.Study], float] | None = None,
) -> optuna.Study:
    """One worker's share of a stage: run trials until the stage has ``budget.trials``
    finished ones, however many workers (here or on other machines) run beside it.

    ``reserve`` gives the seconds to keep free before ``deadline`` as the stage stands (the
    re-scoring of its top trials): no trial runs past ``deadline`` less that, read anew
    before each trial.

    A worker with nothing to start waits while other trials run: if one of them fails, or
    its worker dies (its heartbeat stops and the trial is retried), this worker takes it.
    """
    seed = sampler_seed(plan, storage, worker)
    study = optuna.load_study(
        study_name=plan.name,
        storage=storage,
        sampler=make_sampler(plan.study, seed, queued=len(first_trials(plan))),
        pruner=read_less(make_pruner(plan, int(plan.incumbent.get("epochs", 1) or 1)), plan.study),
    )
    progress = TrialLines(plan, budget, out, bar)
    pace = Pace()
    objective = make_objective(plan, fn, budget.trials, deadline, pace, sampler_seed=seed)
    states = storages.trial_states(study)  # one small query, not every trial read whole
    while not progress.failing:
        until = deadline
        if reserve is not None and deadline is not None:
            until = deadline - reserve(study)
            objective.deadline = until  # the trial's epochs stop there too
        if pace.too_late(until):
            if worker == 0:
                storages.set_study_user_attrs(study, {"ended": OUT_OF_TIME})
            break
        live = sorted(number for number, state in states.items() if state in LIVE)
        # The places the cap leaves: its trials, and what the pruned ones gave back.
        places = budget.trials + _credit(plan, budget, study, states)
        objective.budget = places  # workers racing for the last place: one gets it
        waiting = any(states[n] == TrialState.WAITING for n in live[: math.ceil(places)])
        if not waiting and closed_loop.stagnated(plan, study):
            if worker == 0:
                out(f"  {closed_loop.stop_text(plan)}")
                storages.set_study_user_attrs(study, {"ended": closed_loop.stop_text(plan)})
            break
        if len(live) < places or waiting:
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
            retry.finish(study)  # the budget is met: nothing is left queued
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
    storages.set_study_user_attrs(study, {key: plain(value) for key, value in attrs.items()})
    # skip_if_exists: workers on other machines may start the stage at the same moment.
    for params in first_trials(plan):
        study.enqueue_trial(params, skip_if_exists=True)


def first_trials(plan: StagePlan) -> list[dict[str, Any]]:
    """The params of the trials a stage enqueues before its sampler draws: the incumbent,
    then the probes (the incumbent with each other choice of a ``probe: true`` parameter).
    Empty for a grid stage: it queues its points in ``_queue_grid``."""
    if plan.space.grid:
        return []
    first = [search_spaces.params_of(plan.space, plan.incumbent)]
    for change in search_spaces.probes(plan.space, plan.incumbent):
        config = merged(plan.incumbent, change)
        first.append(search_spaces.params_of(plan.space, config, plan.incumbent))
    return first


def _queue_grid(plan: StagePlan, study: optuna.Study) -> None:
    """Queue each point of a grid stage that no trial holds (a point queued once and left
    over at the end of a stage whose budget was smaller runs when the budget grows)."""
    held = {
        json.dumps(t.params or t.system_attrs.get("fixed_params") or {}, sort_keys=True)
        for t in study.get_trials(deepcopy=False)
        if not (t.state == TrialState.FAIL and t.user_attrs.get("stop_reason") == SURPLUS)
    }
    for point in search_spaces.grid_points(plan.space, plan.incumbent):
        if json.dumps(point, sort_keys=True) not in held:
            study.enqueue_trial(point)
    retry.drop_duplicates(study)  # commands that start the stage at once queue it each


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


def sampler_seed(plan: StagePlan, storage: optuna.storages.BaseStorage, worker: int = 0) -> int:
    """The seed of this process's sampler for a stage: drawn afresh, so that commands that
    run one stage side by side (on many machines) do not draw the same trials; ``seed=``
    fixes the data split and the init, not the sampler's draws. Each trial records it
    (``sampler_seed``). A study file's ``sampler.seed`` fixes it instead, and so does
    ``deterministic=true`` (from ``seed``), for runs that must repeat their draws (one command
    at a time: commands side by side would draw alike)."""
    fixed = plan.study.sampler.get("seed")
    if fixed is None and plan.study.deterministic:  # a repeatable run: seed= fixes the draws
        fixed = int(plan.incumbent.get("seed", 0) or 0)
    if fixed is None:
        return secrets.randbelow(2**31)
    if isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 0:
        raise UserError(f"sampler.seed={fixed}: the sampler's seed is an integer, 0 or more.")
    # A resumed stage must not replay the draws of its first session, nor workers each other's.
    n_before = storage.get_n_trials(storage.get_study_id_from_name(plan.name))
    return (fixed * 10_007 + plan.index * 101 + n_before + worker * 7_919) % 2**32


def _header(plan: StagePlan, budget: Budget, done: float, out: Print) -> None:
    fixed = (
        ", ".join(f"{k}={_short(v)} ({plan.lineage[k].label})" for k, v in plan.fixed.items())
        or "nothing"
    )
    limit = f", at most {budget.timeout:.0f}s" if budget.timeout else ""
    credit = budget.credit and closed_loop.credits(plan)
    share = " (a pruned one counts the share of its epochs it trained)" if credit else ""
    out(
        f"== stage {plan.index + 1}/{len(plan.study.stages)} {plan.stage}"
        f" ({plan.name}): {budget.trials} trials{share}{limit}, {count(done)} finished before"
    )
    out(f"   searches {', '.join(plan.space.keys) or 'nothing'}; fixed: {fixed}")
    if plan.space.grid:
        points = len(search_spaces.grid_points(plan.space, plan.incumbent))
        if points > budget.trials:
            out(
                f"   its grid has {points} points and the stage {budget.trials} trials: the"
                f" first {budget.trials} run, the incumbent first (trials= raises it)"
            )
