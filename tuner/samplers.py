"""A stage's sampler and pruner, built from the study's settings; the median pruner made to
read the storage less.

Example:
    >>> sampler = make_sampler(study, seed=0)       # TPE (multivariate, grouped) or random
    >>> pruner = make_pruner(plan, max_epochs=12)   # median, Hyperband, successive halving
"""

from __future__ import annotations

import math
import time

import optuna
from optuna.pruners import _percentile
from optuna.trial import FrozenTrial, TrialState

from tuner import storage as storages
from tuner.config import StudyConfig, pruner_reference
from tuner.errors import UserError
from tuner.plan import StagePlan

COMPLETE = (TrialState.COMPLETE,)
REFRESH_SECONDS = storages.FLUSH_SECONDS  # the pruner counts other workers' trials this often
TPE_STARTUP = 10  # optuna.samplers.TPESampler's own n_startup_trials


def make_sampler(study: StudyConfig, seed: int, queued: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded. ``queued``: the trials a stage enqueues before the sampler
    draws (the incumbent, the probes); TPE's random start (``n_startup_trials``) comes after
    them, as it would count them otherwise and model a 12-value space from the incumbent and
    its probes, which differ in one value, after a single random trial."""
    options = {k: v for k, v in study.sampler.items() if k not in ("name", "seed")}
    name = study.sampler.get("name", "tpe")
    try:
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **options)
        # group=True: TPE models the conditional parameters (momentum[sgd] ...) per branch.
        options.setdefault("multivariate", True)
        options.setdefault("group", True)
        startup = options.get("n_startup_trials", TPE_STARTUP)
        options["n_startup_trials"] = int(startup) + queued
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
    options = {k: v for k, v in study.pruner.items() if k not in ("name", "compare_to")}
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


class CachedPercentilePruner(optuna.pruners.BasePruner):
    """Optuna's percentile (median) pruner, deciding as it decides, with what it reads and
    computes kept between epochs, and (``sampled_only``, ``pruner.compare_to: sampled``) its
    percentile taken over the trials the sampler drew.

    The trials a stage enqueues (the incumbent, its probes, the follow-up with more epochs, a
    widened range's move) are left out of that percentile. They are the tuned config and one
    change of it: their curves rise at once, and four of them are the architecture stage's first
    COMPLETE trials. Held against them, a new net on a warming one-cycle schedule looks behind
    at epoch 3 whatever it ends at: on a plain start they pruned 32 of the stage's 37 trials,
    and 9 of 28 of those, trained to the end, beat the stage's best; with the sampled ones the
    same start pruned 7 of 20, none of which would have (``tests/benchmarks/bench_pruned.py``,
    README "Performance"). Against the sampler's own trials, as a plain Optuna study prunes, a
    trial is stopped for being behind the search, not behind the incumbent. Where a stage has
    no COMPLETE trial the sampler drew yet (fewer than ``n_startup_trials``), nothing is pruned.

    Optuna's pruner reads the study's trials at every epoch, the running ones whole, and
    computes the percentile of the COMPLETE ones again. A COMPLETE trial no longer changes:
    this one counts them with a small query once per trial and at most once a second, reads
    them again only when their number has changed, and keeps the percentile of each step
    until then. A trial that another worker finishes while this one runs counts from this
    trial's next decision at least a second on (workers race anyway); in one process, every
    decision counts every finished trial.
    """

    def __init__(
        self, pruner: optuna.pruners.PercentilePruner, sampled_only: bool = False
    ) -> None:
        self.pruner = pruner
        self.sampled_only = sampled_only
        self._count = -1  # the stage's COMPLETE trials when last read, enqueued ones included
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
        if count != self._count:
            # The trials the sampler read as this trial started, unless one finished since.
            complete = study._get_trials(deepcopy=False, states=COMPLETE, use_cache=True)
            if len(complete) != count:
                complete = study.get_trials(deepcopy=False, states=COMPLETE)
            if self.sampled_only:
                complete = [t for t in complete if not enqueued(t)]
            self._count, self._complete, self._percentiles = count, complete, {}
        return self._complete


def enqueued(trial: FrozenTrial) -> bool:
    """Whether the trial's params were enqueued (``study.enqueue_trial``), not drawn."""
    return "fixed_params" in trial.system_attrs


def read_less(pruner: optuna.pruners.BasePruner, study: StudyConfig) -> optuna.pruners.BasePruner:
    """The pruner, or for a percentile (median) pruner one that decides the same and reads
    less, over the trials the sampler drew where the study's ``pruner.compare_to`` is
    ``sampled`` (the default; ``all`` is Optuna's own choice)."""
    if isinstance(pruner, optuna.pruners.PercentilePruner):  # the median pruner is one
        sampled = pruner_reference(study) == "sampled"
        return CachedPercentilePruner(pruner, sampled_only=sampled)
    return pruner
