"""The closed loop: what a stage does with what it found before the next stage fixes its values.

The rules, each a plain decision with its own study-file switch (``loop:`` in the study file,
``tuner.config.LOOP_DEFAULTS``), and each recorded with the stage (user attrs, note, status):

- **widen** (the playbook: check the boundaries, then extend): a best value at a non-natural
  edge of a float range widens that range, and the stage goes on with more trials, the first
  of them the best trial moved into the new part of the range;
- **rescore** (choose through the noise): the stage's top trials are trained again on other
  seeds (another split and initialization), and the stage's best is the best mean over those
  fresh seeds (the first value is what put a trial in the top few, so it flatters it), so a
  lucky validation split does not win; the spread is stored and shown. The configs an
  earlier stage re-scored that this stage trained again (its incumbent) join the comparison
  with the values they hold (``incumbent``), so a challenger that is merely flattered does not
  replace them unseen. A stage whose every value a later stage of the run searches again (the
  lr stage, before the architecture and refinement stages re-tune the lr and its schedule) is
  provisional and is not re-scored;
- **smooth** (choose through the noise, within a trial): a trial's value is the best mean of
  its validation metric over a few consecutive epochs, not its luckiest single epoch: on a
  few hundred validation samples the maximum over a dozen noisy epochs flatters a run whose
  curve jumps (a high lr that never settles) over one that converges;
- **longer** (act on "train longer"): the run's last stage trains a best trial that peaked in
  the last 25% of its epochs once more with ``factor`` x its epochs and patience, unpruned,
  where its time was kept; the validation metric decides which stands;
- **stagnation** (stop on a stated rule): a stage stops after N finished trials without a new
  best, at least ``PER_VALUE`` per value it searches (Optuna's
  ``BestValueStagnationEvaluator``'s rule), a pruned trial counted by the share of the epochs it
  trained (24 trials pruned at epoch 3 of 12 are 6 trials' training, not 24); the time it
  leaves flows to the stages after it, the refinement stage last;
- **pruned_credit** (spend the budget): a stage's trial cap (``budget.trials``) counts a
  pruned trial as the stop rule does, by the share of the epochs it trained, so a stage of fast
  trials that are mostly pruned does not end at its cap with its time unspent.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from search_spaces._space import Param
from tuner import diagnostics
from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.nested import merged
from tuner.objective import Objective
from tuner.plan import StagePlan, load_space
from tuner.results import (
    LONGER,
    RESCORED,
    SET,
    best_trial,
    fresh_follow_up,
    fresh_from,
    fresh_mean,
    ranked,
)

Print = Callable[[str], None]
EDGE = 0.05  # a value within 5% of a range's width (in its scale) of an edge sits at it
WIDEN_ROUNDS = 2  # at most this many widenings per stage
EXTRA_TRIALS = 6  # trials a widening adds to its stage's budget
WIDENED = "widened"  # study user attr: the widenings, in order
PER_VALUE = 2  # the stop rule waits at least this many trials per value a stage searches


# --- widen --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Widening:
    """One range widened: which, at which edge, from what to what, and why."""

    key: str
    edge: str  # "low" or "high"
    value: float  # the best value that sat at the edge
    trial: int  # its trial
    before: tuple[float, float]
    after: tuple[float, float]
    around: float | None = None  # a range around the incumbent: its new factor

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "edge": self.edge, "value": self.value, "trial": self.trial,
                "before": list(self.before), "after": list(self.after), "around": self.around,
                "extra_trials": EXTRA_TRIALS}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Widening:
        return cls(
            str(data["key"]), str(data["edge"]), float(data["value"]), int(data["trial"]),
            (float(data["before"][0]), float(data["before"][1])),
            (float(data["after"][0]), float(data["after"][1])),
            None if data.get("around") is None else float(data["around"]),
        )  # fmt: skip

    def line(self) -> str:
        lo, hi = self.after
        return (
            f"widened {self.key}: the best value {self.value:.4g} (trial #{self.trial}) sat at"
            f" the {self.edge} edge of {self.before[0]:.4g} … {self.before[1]:.4g}; now"
            f" {lo:.4g} … {hi:.4g}, {EXTRA_TRIALS} more trials"
        )


def edges(plan: StagePlan, best: FrozenTrial) -> list[Widening]:
    """The float ranges whose best value sits at an edge that is not natural.

    An edge is natural where the study file says so (``natural: [low]``) or where a linear
    range starts at 0 (no dropout, no warm-up): a best value there is an answer, not a limit.
    """
    found = []
    config = best.user_attrs.get("config") or {}
    for param in plan.space.params:
        if param.choices is not None or param.integer or not param.active(config):
            continue
        value = best.params.get(param.name(config))
        # The range the stage searches now, not the one the trial was drawn from: a best value
        # at the edge of a range that has been widened since sits inside the new one.
        dist = param.distribution(config, plan.incumbent)
        if not isinstance(dist, FloatDistribution) or not isinstance(value, (int, float)):
            continue
        where = _position(dist, float(value))
        for edge, at in (("low", where <= EDGE), ("high", where >= 1 - EDGE)):
            if at and not _natural(param, dist, edge):
                found.append(_widen(param, dist, edge, float(value), best.number))
    return found


def _position(dist: FloatDistribution, value: float) -> float:
    if dist.high <= dist.low:
        return 0.5
    if dist.log:
        return (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    return (value - dist.low) / (dist.high - dist.low)


def _natural(param: Param, dist: FloatDistribution, edge: str) -> bool:
    return edge in param.natural or (edge == "low" and not dist.log and dist.low == 0.0)


def _widen(param: Param, dist: FloatDistribution, edge: str, value: float, trial: int) -> Widening:
    """Half the range again beyond the edge (in its scale); a range around the incumbent
    grows its factor to factor**1.5 (10 -> 32), both ways."""
    low, high = dist.low, dist.high
    if param.around is not None:
        around = param.around**1.5
        center = math.sqrt(low * high)
        return Widening(param.key, edge, value, trial, (low, high),
                        (center / around, center * around), around)  # fmt: skip
    if dist.log:
        factor = math.sqrt(high / low)
        after = (low / factor, high) if edge == "low" else (low, high * factor)
    else:
        half = (high - low) / 2
        after = (max(low - half, 0.0) if low >= 0 else low - half, high) if edge == "low" else (
            low, high + half)  # fmt: skip
    return Widening(param.key, edge, value, trial, (low, high), after)


def widened(plan: StagePlan, records: Sequence[Mapping[str, Any]]) -> StagePlan:
    """The plan with the stage's recorded widenings applied (the last one of a key wins)."""
    last = {str(r["key"]): Widening.from_dict(r) for r in records}
    if not last:
        return plan
    params = []
    for param in plan.space.params:
        w = last.get(param.key)
        if w is None:
            params.append(param)
        elif w.around is not None:
            params.append(replace(param, around=w.around))
        else:
            params.append(replace(param, low=w.after[0], high=w.after[1]))
    return replace(plan, space=replace(plan.space, params=tuple(params)))


def moved(best: FrozenTrial, plan: StagePlan, w: Widening) -> dict[str, Any]:
    """The best trial's params with the widened one moved halfway into the new part of its
    range (in its scale): the first trial after a widening looks where the edge hid."""
    config = best.user_attrs.get("config") or {}
    params = dict(best.params)
    spec = next(p for p in plan.space.params if p.key == w.key)
    edge = w.before[0] if w.edge == "low" else w.before[1]
    far = w.after[0] if w.edge == "low" else w.after[1]
    log = (spec.log or spec.around is not None) and edge > 0 and far > 0
    value = math.sqrt(edge * far) if log else (edge + far) / 2
    for param in plan.space.params:
        if param.key == w.key and param.active(config):
            params[param.name(config)] = value
    return params


def record_widenings(study: optuna.Study, found: Sequence[Widening]) -> list[dict[str, Any]]:
    """Add widenings to the stage's record; the stop rule counts trials from here on."""
    n = len(study.get_trials(deepcopy=False))
    records = [
        *study.user_attrs.get(WIDENED, []),
        *({**w.as_dict(), "from_trial": n} for w in found),
    ]
    storages.set_study_user_attrs(study, {WIDENED: records})
    return records


def extra_trials(study: optuna.Study | None) -> int:
    """Trials the stage's widenings (and its follow-up with more epochs) added to its budget."""
    if study is None:
        return 0
    widened = study.user_attrs.get(WIDENED, [])
    followed = 1 if study.user_attrs.get(LONGER) else 0  # the follow-up with more epochs
    return sum(int(r.get("extra_trials", EXTRA_TRIALS)) for r in widened) + followed


def mean_trial_seconds(study: optuna.Study) -> float | None:
    """How long a finished trial of the stage took, on average."""
    took = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    return statistics.fmean(took) if took else None


# --- smooth ------------------------------------------------------------------------------------


def smoothed_peak(values: Sequence[float], window: int, maximize: bool = True) -> float | None:
    """The best mean of ``window`` consecutive values of a trial's curve (its epochs' validation
    metric, in order): a peak that holds for a few epochs, not one lucky epoch. A curve shorter
    than the window is averaged whole; non-finite values (an epoch that diverged) count as the
    worst; None for an empty curve.

    Example:
        >>> smoothed_peak([0.90, 0.99, 0.93, 0.96, 0.97, 0.97], 3)  # not 0.99
        0.9666666666666667
    """
    worst = -math.inf if maximize else math.inf
    curve = [v if math.isfinite(v) else worst for v in values]
    if not curve:
        return None
    width = max(1, min(window, len(curve)))
    means = [statistics.fmean(curve[i : i + width]) for i in range(len(curve) - width + 1)]
    return max(means) if maximize else min(means)


class Curve:
    """A ``report(epoch, metrics)`` that keeps one metric's curve (for re-scoring runs)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.values: list[float] = []

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is not None:
            self.values.append(float(value))


def trial_value(
    result: Mapping[str, Any], curve: Sequence[float], metric: str, window: int, maximize: bool
) -> float:
    """A trial's value: its curve's smoothed peak (``loop.smooth`` epochs), or where it
    reported no curve (or smoothing is off) the metric it returned."""
    smoothed = smoothed_peak(curve, window, maximize) if window > 1 else None
    return float(result[metric]) if smoothed is None else smoothed


# --- rescore ------------------------------------------------------------------------------------


def rescore(
    study: optuna.Study,
    plan: StagePlan,
    fn: Objective,
    top: int,
    seeds: int,
    *,
    deadline: float | None,
    out: Print,
    known: Mapping[str, list[float]] | None = None,
    incumbent: bool = True,
    spare: int = 0,
) -> None:
    """Train the stage's ``top`` trials again on ``seeds`` more seeds (seed+1, seed+2, ...),
    breadth first (every candidate on seed+1, then on seed+2), each run recorded at once;
    stop where the next would end after ``deadline``. Then on up to ``spare`` seeds more, in
    the same order, while the deadline allows: the run's last stage, whose time left has no
    later stage to flow to, spends it on choosing its best through the noise (digits: a run
    that its stop rule ended after 54 s of 300 chose between two configs tied on 2 seeds).

    A trial whose config an earlier stage re-scored already (``known``, from
    ``known_values``: the incumbent, mostly, the best of the stage before) takes those values
    instead of training again. With ``incumbent``, such a trial is a candidate even where its
    single value ranks it below the top few: the top few were chosen by that value, which
    flatters them, while its own values are fresh already (``defenders``)."""
    config0 = plan.incumbent
    if not isinstance(config0.get("seed"), int) or isinstance(config0.get("seed"), bool):
        return  # the objective has no integer seed to vary
    scored: dict[str, list[float]] = {
        k: list(v) for k, v in study.user_attrs.get(RESCORED, {}).items()
    }
    each = mean_trial_seconds(study) or 0.0
    metric = plan.study.metric
    window, maximize = int(plan.study.loop["smooth"]), plan.study.direction == "maximize"
    known = known or {}
    finished = ranked(study)
    candidates = finished[:top]
    shown = len(candidates)
    attrs = study.user_attrs
    follow = _fresh_follow_up(study, attrs)
    also = ""
    if follow is not None and follow.number not in {t.number for t in candidates}:
        candidates.append(follow)  # it duels the best it follows up, on the same fresh seeds
        also += f", with #{follow.number} (the follow-up)"
    for trial in defenders(finished, candidates, known) if incumbent else []:
        candidates.append(trial)
        also += f", with #{trial.number} (the incumbent)"
    if len(candidates) < 2:
        return
    start = {t.number: fresh_from(attrs, t.number) for t in candidates}
    for trial in candidates:  # values an earlier stage holds for the same config: reused
        values = scored.setdefault(str(trial.number), [float(trial.value)])  # type: ignore[arg-type]
        again = _reused(known, trial.user_attrs["config"], values[0])
        if len(values) == 1 and again is not None:
            values[:] = again[: seeds + spare + 1]
    # Breadth first: each candidate gets its next seed before any gets the one after, so a
    # re-scoring cut short by the deadline still compares every candidate on a fresh seed.
    for count in range(2, seeds + spare + 2):
        for trial in candidates:
            config = trial.user_attrs["config"]
            values = scored[str(trial.number)]
            if len(values) - start[trial.number] >= count - 1:  # its fresh values: enough
                continue
            took = _seconds(trial) or each  # this config's own time, not the stage's mean
            if deadline is not None and time.time() + took > deadline:
                # Written first: the summary names the best as read back (values reused from an
                # earlier stage are not written before).
                storages.set_study_user_attrs(study, {RESCORED: scored})
                summary = _summary(study, scored)
                if count > seeds + 1:  # the spare seeds end with the time, as they are meant to
                    n = sorted({len(scored[str(t.number)]) - start[t.number] for t in candidates})
                    held = f"{n[0]}" if len(n) == 1 else f"{n[0]} to {n[-1]}"
                    out(f"  rescored the top {shown} on {seeds} more seeds{also}, then on more"
                        f" while the run's time lasted ({held} each, compared on the ones all"
                        f" have): {summary}")  # fmt: skip
                else:
                    out(f"  rescoring stopped: out of the stage's time ({summary})")
                return
            seed = int(config["seed"]) + len(values)
            try:
                curve = Curve(metric)
                result = fn(merged(config, {"seed": seed}), curve)
                value = trial_value(result, curve.values, metric, window, maximize)
            except Exception as exc:  # a seed that fails counts as the worst value
                out(f"  rescoring #{trial.number} on seed {seed} failed: {exc}")
                value = math.nan
            values.append(value)
            storages.set_study_user_attrs(study, {RESCORED: scored})
    # Written once more at the end: values reused from an earlier stage need no training run,
    # and a reused config ranked last would otherwise never be recorded (nor win).
    storages.set_study_user_attrs(study, {RESCORED: scored})
    more = f" (and {spare} spare ones: the run's time allowed)" if spare else ""
    out(f"  rescored the top {shown} on {seeds} more seeds{more}{also}: {_summary(study, scored)}")


def _fresh_follow_up(study: optuna.Study, attrs: Mapping[str, Any]) -> FrozenTrial | None:
    """The stage's follow-up with more epochs, where it trained on a fresh seed and finished."""
    number = fresh_follow_up(attrs)
    if number is None:
        return None
    trials = study.get_trials(deepcopy=False)
    trial = trials[number] if number < len(trials) else None
    ok = trial is not None and trial.state == TrialState.COMPLETE and trial.value is not None
    return trial if ok and "config" in trial.user_attrs else None  # type: ignore[union-attr]


def reserve(
    study: optuna.Study, top: int, seeds: int, known: Mapping[str, list[float]] | None = None
) -> float:
    """Seconds the re-scoring of a stage will need as it stands: its top ``top`` trials' own
    durations once per extra seed (a wide net trains longer than the stage's mean trial), and
    one run of the longest of them more, for what is recorded between the runs. A trial whose
    values over seeds an earlier stage holds (``known``: see ``known_values``) needs none, and
    a stage with a single finished trial keeps nothing: re-scoring compares two or more, and
    keeping a slow trial's re-scoring time left a stage with one trial and its time unused."""
    candidates = ranked(study)[:top]
    if len(candidates) < 2:
        return 0.0  # nothing to compare yet: the stage's next trial is worth more
    took = [
        _seconds(t) or 0.0
        for t in candidates
        if _fingerprint(t.user_attrs.get("config", {})) not in (known or {})
    ]
    return seeds * sum(took) + max(took, default=0.0)


def defenders(
    finished: Sequence[FrozenTrial],
    candidates: Sequence[FrozenTrial],
    known: Mapping[str, list[float]],
) -> list[FrozenTrial]:
    """The stage's ``finished`` trials (as ``ranked`` gives them), beside ``candidates``, whose
    config an earlier stage re-scored (``known``): the incumbent, mostly. They defend their
    place on the values over seeds they hold, at no cost where those cover the seeds of the
    re-scoring. Seen on a plain SGD start (MNIST-1D, seed 0): the refinement stage's top 3 by
    one value (0.994-0.996 on validation) scored 0.85 to 0.988 on a fresh seed, the best of
    them 0.9875, against the 0.9883 of the incumbent, which ranked 4th by its 0.9925 and so
    was never compared; the one chosen scored 98.8% test, the incumbent 99.0%."""
    seen = {_fingerprint(t.user_attrs["config"]) for t in candidates}
    found: list[FrozenTrial] = []
    for trial in finished:
        key = _fingerprint(trial.user_attrs["config"])
        if key in seen or key not in known:
            continue
        seen.add(key)
        found.append(trial)
    return found


def _reused(
    known: Mapping[str, list[float]], config: Mapping[str, Any], value: float
) -> list[float] | None:
    """The values over seeds an earlier stage holds for this config, with this trial's value
    first: the same config on the same seed. The two first values differ where one run was cut
    by its stage's deadline (``out_of_time``); the fresh values, trained in full by a
    re-scoring, hold all the same. Seen (MNIST-1D, a plain Adam start, seed 0): the
    architecture stage's pick, cut at epoch 9 there (0.9925) and re-scored, trained in full
    in the refinement stage (0.9933), where it was then taken for a new config with one value
    and did not defend its place."""
    again = known.get(_fingerprint(config))
    return None if again is None else [value, *again[1:]]


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def provisional(study: StudyConfig, plan: StagePlan, after: Sequence[str]) -> tuple[str, ...]:
    """The keys a stage searches when the stages after it in the run search every one of them
    again (its choice is provisional: re-scoring it on more seeds would buy nothing the later
    stages keep); empty when the stage fixes a key no later stage searches.

    A conditional parameter (``when:``, as momentum for SGD) does not count: it tunes a choice
    that the later stage makes again (the optimizer), and goes with whatever that choice is."""
    later = {key for name in after for key in load_space(study, name).keys}
    keys = tuple(dict.fromkeys(p.key for p in plan.space.params if not p.when))
    return keys if keys and all(key in later for key in keys) else ()


def known_values(studies: Sequence[optuna.Study]) -> dict[str, list[float]]:
    """Values over seeds of the configs earlier stages re-scored, by config."""
    known: dict[str, list[float]] = {}
    for study in studies:
        scored = study.user_attrs.get(RESCORED) or {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            values = scored.get(str(t.number))
            if values and len(values) > 1 and "config" in t.user_attrs:
                known[_fingerprint(t.user_attrs["config"])] = list(values)
    return known


def _fingerprint(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _summary(study: optuna.Study, scored: Mapping[str, list[float]]) -> str:
    attrs = study.user_attrs
    parts = [f"#{k} {spread_text(v, fresh_from(attrs, int(k)))}" for k, v in scored.items()]
    best = best_trial(study)
    chosen = f"; best: #{best.number}" if best is not None else ""
    return ", ".join(parts) + chosen


def spread(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard deviation (n-1) and count of a trial's values over seeds; a seed that
    failed (nan) makes the mean nan: a config that fails on some seeds does not win."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 and math.isfinite(mean) else 0.0
    return mean, std, len(values)


def spread_text(values: Sequence[float], start: int = 1) -> str:
    """``0.9912 ± 0.0021 (3 seeds; fresh 0.9900)``: the mean and spread over every seed, and
    the mean over the fresh ones (all but the first; all of a follow-up's on a fresh seed:
    ``start`` 0), by which the stage's best is chosen."""
    mean, std, n = spread(values)
    if n <= start:  # cut short before its fresh seed: it is not compared
        return f"{mean:.4f} ({n} seed; no fresh one)"
    seeds = "1 seed" if n == 1 else f"{n} seeds"
    return f"{mean:.4f} ± {std:.4f} ({seeds}; fresh {fresh_mean(list(values), start):.4f})"


# --- longer -----------------------------------------------------------------------------------


LATE = diagnostics.LATE_EPOCHS  # a best epoch past 75% of the epochs is late


@dataclass(frozen=True)
class FollowUp:
    """The best trial trained again for ``factor`` x its epochs: what and why."""

    trial: int  # the best trial it follows up
    best_epoch: int  # where that trial peaked ...
    epochs: int  # ... of its epochs
    schedule: str | None
    set: dict[str, Any]  # what the follow-up trains with: epochs (and patience) x factor
    number: int | None = None  # the follow-up's own trial, once queued

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FollowUp:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def no_time(self, need: float, left: float) -> str:
        """Why it did not run: ``need`` seconds, ``left`` in the stage."""
        factor = self.set["epochs"] // self.epochs
        return (
            f"train longer: the best trial (#{self.trial}) peaked at epoch {self.best_epoch} of"
            f" {self.epochs}, but {factor}x its epochs need about {need:.0f} s and the stage"
            f" has {max(left, 0.0):.0f} s left"
        )

    def line(self) -> str:
        then = "" if self.number is None else f" as trial #{self.number}"
        trained = ", ".join(f"{k}={v}" for k, v in self.set.items())
        schedule = f" of its {self.schedule} schedule" if self.schedule else ""
        judge = (
            f"the two compare on fresh seeds (#{self.trial} trains on seed {self.set['seed']} too)"
            if "seed" in self.set
            else "the validation metric decides which stands"
        )
        return (
            f"train longer: the best trial (#{self.trial}) peaked at epoch {self.best_epoch} of"
            f" {self.epochs}{schedule}, so it trains again{then} with {trained}; {judge}"
        )


def follow_up(best: FrozenTrial, factor: int, fresh: bool = False) -> FollowUp | None:
    """The follow-up a stage's best asks for, or None: a trial that trained all its epochs
    and peaked in the last 25% of them (still improving, or a decaying schedule's end) is
    trained again with ``factor`` x its epochs, and its patience scaled alike (else patience
    would end the longer run in the middle of its decay).

    ``fresh`` (a stage that re-scores): the follow-up trains on the next seed, on which the
    re-scoring trains the best too, and the two compare there (``results.best_trial``). The
    best's own value is the luckiest of the stage's trials, chosen for it; against it, the
    follow-up lost 6 of 8 times in a benchmark round where it scored the better test accuracy
    in 6 of 8 (+0.19 points on average)."""
    config = best.user_attrs.get("config") or {}
    epoch, epochs = best.user_attrs.get("best_epoch"), config.get("epochs")
    if factor < 2 or best.user_attrs.get("stop_reason") != "max_epochs":
        return None  # pruned, out of time, early-stopped or trained for a budget: not late
    if not isinstance(epoch, int) or not isinstance(epochs, int) or isinstance(epochs, bool):
        return None
    if epochs < 2 or epoch <= LATE * epochs:
        return None
    patience = config.get("patience")
    changes: dict[str, Any] = {"epochs": factor * epochs}
    if isinstance(patience, int) and not isinstance(patience, bool) and patience > 0:
        changes["patience"] = factor * patience
    seed = config.get("seed")
    if fresh and isinstance(seed, int) and not isinstance(seed, bool):
        changes["seed"] = seed + 1
    schedule = config.get("schedule")
    return FollowUp(best.number, epoch, epochs, str(schedule) if schedule else None, changes)


def pending_follow_up(
    study: optuna.Study, factor: int, fresh: bool = False
) -> tuple[FollowUp, float] | None:
    """The follow-up the stage's best asks for and has not had, with the seconds it needs
    (``factor`` x that trial's own duration), or None."""
    if factor < 2 or study.user_attrs.get(LONGER):
        return None
    top = ranked(study)[:1]
    wanted = follow_up(top[0], factor, fresh) if top else None
    return None if wanted is None else (wanted, factor * (_seconds(top[0]) or 0.0))


def follow_up_seconds(study: optuna.Study, factor: int) -> float:
    """Seconds to keep for the follow-up as the stage stands (``pending_follow_up``'s)."""
    pending = pending_follow_up(study, factor)
    return 0.0 if pending is None else pending[1]


def follow_up_line(study: optuna.Study) -> str | None:
    """The stage's follow-up, and how it came out, for ``status`` and the stage's note."""
    stored = study.user_attrs.get(LONGER)
    if not isinstance(stored, Mapping):
        return None
    found = FollowUp.from_dict(stored)
    line = found.line()
    trials = study.get_trials(deepcopy=False)
    if found.number is None or found.number >= len(trials):
        return line
    trial, best = trials[found.number], best_trial(study)
    if trial.state != TrialState.COMPLETE:
        return f"{line}: it ended {trial.state.name}"
    won = best is not None and best.number == trial.number
    return f"{line}: {trial.value:.4f}, {'the best now' if won else 'not the best'}"


def queue_follow_up(study: optuna.Study, found: FollowUp) -> FollowUp:
    """Record the follow-up with the stage and queue it: the best's params, with ``SET``."""
    best = study.get_trials(deepcopy=False)[found.trial]
    study.enqueue_trial(dict(best.params), user_attrs={SET: dict(found.set)})
    number = max(t.number for t in study.get_trials(deepcopy=False))
    found = replace(found, number=number)
    storages.set_study_user_attrs(study, {LONGER: found.as_dict()})
    return found


# --- stagnation --------------------------------------------------------------------------------


def stagnated(plan: StagePlan, study: optuna.Study) -> bool:
    """The stop rule: no new best in the stage's last ``patience(plan)`` finished trials, with
    at least that many since its last widening. It is the rule of Optuna's
    ``BestValueStagnationEvaluator`` (trials since the best > n), which counts COMPLETE trials
    only, with the pruned ones counted too: each by the share of the epochs it trained, so a
    trial pruned at epoch 3 of 12 counts a quarter (a weight Optuna's evaluator has no place
    for). Never for a grid stage (it tries every candidate) or where it is off."""
    n = patience(plan)
    if not n or plan.space.grid:
        return False
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return False  # nothing to improve on yet
    epochs = plan.incumbent.get("epochs")
    finished = _as_complete(trials, int(epochs) if isinstance(epochs, int) else 0)
    since = max((int(r.get("from_trial", 0)) for r in study.user_attrs.get(WIDENED, [])),
                default=0)  # fmt: skip
    if sum(w for t, w in finished if t.number >= since) <= n:
        return False
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    best = max(range(len(finished)), key=lambda i: (sign * float(finished[i][0].value), -i))  # type: ignore[arg-type]
    return sum(w for _, w in finished[best + 1 :]) > n


def patience(plan: StagePlan) -> int:
    """Trials without a new best that end a stage: ``loop.stagnation``, and at least
    ``PER_VALUE`` per value the stage searches (a stage of 11 values has more ground to cover
    than one of 3: TPE's random start alone takes ``n_startup_trials``); 0 where it is off."""
    n = plan.study.loop.get("stagnation")
    if not n:
        return 0
    return max(int(n), PER_VALUE * len(plan.space.params))


def _as_complete(trials: Sequence[FrozenTrial], epochs: int) -> list[tuple[FrozenTrial, float]]:
    """Finished trials as the stop rule counts them, each with its weight: a COMPLETE trial
    counts 1; a pruned one is a trial without a new best (its value, its last report, is below
    the median it was pruned at) that counts the share of the ``epochs`` it trained (1 where
    the trials have no epoch budget); one that reported nothing did not train, and is left out."""
    out = []
    for t in trials:
        weight = 1.0
        if t.state == TrialState.PRUNED:
            last = t.last_step
            if last is None or not math.isfinite(t.intermediate_values[last]):
                continue  # nothing reported: it did not train, it does not count
            t = copy.copy(t)
            t.state, t.value = TrialState.COMPLETE, t.intermediate_values[last]
            weight = min(1.0, max(last, 1) / epochs) if epochs > 0 else 1.0
        elif t.value is None or not math.isfinite(t.value):
            continue
        out.append((t, weight))
    return out


def credit(plan: StagePlan, trials: Sequence[FrozenTrial]) -> float:
    """The pruned-credit rule: how many places of a stage's trial cap its pruned ``trials``
    give back, each 1 less the share of the epochs it trained (its weight in the stop rule): 28
    trials pruned at epoch 3 of 12 take 7 places, not 28. The cap bounds how much searching
    the validation split is asked to judge; a pruned trial is judged at one early epoch, and
    its time (a quarter of a trial's) buys the next one. A pruned trial that reported nothing
    takes a whole place (so a stage whose every trial is cut at once still ends). 0 where
    it is off, for a grid stage (it runs its candidates) and where trials have no epochs."""
    if not credits(plan):
        return 0.0
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    epochs = int(plan.incumbent["epochs"])
    # Rounded: float sums must not decide whether one more trial fits.
    return round(sum(1.0 - w for _, w in _as_complete(pruned, epochs)), 6)


def count(n: float) -> str:
    """A count of trials that the pruned trials' credit may have made fractional: 30, 30.2."""
    return f"{n:.1f}".removesuffix(".0")


def credits(plan: StagePlan) -> bool:
    """Whether a stage's pruned trials count by their share of its epochs (``credit``)."""
    epochs = plan.incumbent.get("epochs")
    number = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0
    return bool(plan.study.loop.get("pruned_credit")) and not plan.space.grid and number


def stop_text(plan: StagePlan) -> str:
    n, setting = patience(plan), plan.study.loop.get("stagnation")
    rule = f"loop.stagnation={setting}" + (
        "" if n == setting else f", {PER_VALUE} per searched value"
    )
    return (
        f"stage {plan.stage} stopped: no new best in its last {n} finished trials, a pruned one"
        f" counted by the epochs it trained (the stop rule {rule})"
    )
