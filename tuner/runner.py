"""A run: one stage, or every stage in order, each planned from the best results of the stages
before it, with the run's trials and time shared among them and the pre-flight checks first.

Data flows config → plan (tuner.plan) → stage (tuner.stage) → trial (tuner.trial) →
objective → storage; the workers of ``workers=N`` are a pool (tuner.pool) serving every stage.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import TrialState

from tuner import closed_loop, diagnostics, notes, results
from tuner import devices as gpus
from tuner import storage as storages
from tuner.config import DEFAULT_STUDY, StudyConfig
from tuner.errors import StageFailed, UserError
from tuner.nested import flatten, merged
from tuner.objective import Objective, load_objective, load_validator
from tuner.plan import StagePlan, load_space, plan_stage
from tuner.pool import Pool, set_threads
from tuner.progress import StageProgress
from tuner.results import SURPLUS, best_of
from tuner.samplers import make_pruner, make_sampler
from tuner.stage import OUT_OF_TIME, Budget, spent, start_stage, work

Print = Callable[[str], None]
RESCORE_SHARE = 0.2  # of a stage's time, kept by worker processes for re-scoring the top trials
# At most this share of a stage's time is kept from its trials (for re-scoring and the
# follow-up): one 40 s net in the top 3 asked for 148 s of a 128 s stage, which then ended
# after its 5th trial; what the kept time does not hold is cut short (breadth first).
KEPT_SHARE = 1 / 3


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
    devices: Sequence[str | None] = (),
    out: Print = print,
    draw: bool = True,
) -> str:
    """Run one stage, or all stages in order; nothing is written before the plan holds.
    Return why the run ended, in words.

    With ``check``, the pre-flight checks (tuner.checks) run first when the run starts at
    the study's first stage or at its first unfinished one; a failed check raises CheckFailed.

    With ``workers`` > 1, each stage runs in that many processes on the same storage, sharing
    the stage's budget; the next stage is planned when all are done. Each process trains with
    ``threads`` torch threads (None: this one keeps torch's setting, the others take one);
    ``devices`` holds each worker process's ``CUDA_VISIBLE_DEVICES`` (tuner.devices), this
    process's first (set before torch loads here, and put back as it was after the run).
    The worker processes' trial lines come to ``out`` too.
    """
    stages = (stage,) if stage else study.stages
    storage = storages.open_existing(study.storage, heartbeat=heartbeat)
    first = plan_stage(study, stages[0], best_of(storage, study))  # may refuse: nothing written
    out = serialized(out)  # the workers' lines arrive on another thread
    here, others = (devices[0], devices[1:]) if devices else (None, ())
    with (
        gpus.used(here),
        Pool(workers - 1, heartbeat, study.objective, threads or 1, others, out) as helpers,
    ):
        set_threads(threads)  # imports torch (2 s): the workers above start beside it
        return _run(
            study, stage, first, storage, helpers, trials, timeout, restart, check, out, draw
        )


def serialized(out: Print) -> Print:
    """``out``, called by one thread at a time."""
    lock = threading.Lock()

    def locked(line: str) -> None:
        with lock:
            out(line)

    return locked


def _run(
    study: StudyConfig,
    stage: str | None,
    first: StagePlan,
    storage: optuna.storages.BaseStorage | None,
    helpers: Pool,
    trials: int | None,
    timeout: float | None,
    restart: bool,
    check: bool,
    out: Print,
    draw: bool,
) -> str:
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
    ended = ""
    for i, name in enumerate(stages):
        plan = plan_stage(study, name, best_of(storage, study))
        existing = None if restart else storages.load(storage, plan.name)
        if existing is not None:  # a resumed stage searches the ranges it had widened
            plan = closed_loop.widened(plan, existing.user_attrs.get(closed_loop.WIDENED, []))
        left = None if run_deadline is None else run_deadline - time.time()
        extra = closed_loop.extra_trials(existing)
        budget = Budget(budgets[name] + extra, stage_timeout(study, name, stages[i:], left))
        done = start_stage(plan, storage, budget, restart=restart, out=out)
        if done >= budget.trials:
            continue
        deadline = None if budget.timeout is None else time.time() + budget.timeout
        rescore: dict[str, int] | None = None if plan.space.grid else study.loop["rescore"] or None
        again = closed_loop.provisional(study, plan, stages[i + 1 :]) if rescore else ()
        if again:
            rescore = None
            out(f"   not re-scored: the stages after it search {', '.join(again)} again")
        # The trials stop early enough to leave the re-scoring the time it will need: the top
        # trials' own durations once per seed, read anew before each trial, with the
        # follow-up's and at most KEPT_SHARE of the stage (worker processes keep a fixed share
        # of the stage's time instead).
        trials_until = deadline
        if rescore and deadline is not None and budget.timeout is not None:
            trials_until = deadline - RESCORE_SHARE * budget.timeout
        reserve, known = None, {}
        if rescore:  # what the earlier stages re-scored: re-scoring reuses it, not trains it
            before = study.stages[: study.stages.index(name)]
            earlier = [s for b in before if (s := storages.load(storage, study.stage_name(b)))]
            known = closed_loop.known_values(earlier)
        rescoring: Callable[[optuna.Study], float] | None = None
        if rescore and deadline is not None:
            top, seeds = rescore["top"], rescore["seeds"]
            rescoring = functools.partial(closed_loop.reserve, top=top, seeds=seeds, known=known)
        # The run's last stage follows its best up with more epochs where that best peaked
        # late (closed_loop.follow_up), and re-scores on spare seeds while its time lasts; a
        # stage run alone (stage=) runs as it always has.
        last = not stage and i == len(stages) - 1
        longer = int(study.loop["longer"]) if last else 1
        set_by_hand = {"epochs", "patience"} & set(flatten(study.overrides))
        longer = 1 if plan.space.grid or set_by_hand else longer  # epochs=3: what the user set
        if deadline is not None and (rescoring is not None or longer > 1):
            cap = None if budget.timeout is None else KEPT_SHARE * budget.timeout
            reserve = functools.partial(_kept, rescoring=rescoring, factor=longer, cap=cap)
        runs = Stage(plan, storage, fn, helpers, draw and workers == 1, out, reserve, deadline)
        found = runs.trials(budget, trials_until, done)
        if study.loop["widen"] and not plan.space.grid:
            found, plan = _widen(runs, found, budget, trials_until, out)
        if longer > 1:
            found = _follow_up(runs, found, budget, longer, deadline, out, bool(rescore))
        if rescore:
            # Spare seeds need a deadline: an untimed run has no time left to spend.
            timed = last and deadline is not None
            spare = max(0, rescore["last_seeds"] - rescore["seeds"]) if timed else 0
            closed_loop.rescore(found, plan, fn, rescore["top"], rescore["seeds"],
                                deadline=deadline, out=out, known=known,
                                incumbent=bool(rescore["incumbent"]), spare=spare)  # fmt: skip
        longer_line = closed_loop.follow_up_line(found)
        found_lines = diagnostics.record(found, out)
        notes.write_stage_note(found, [*found_lines, *([longer_line] if longer_line else [])])
        ended = str(found.user_attrs.get("ended") or "")
        if name != stages[-1] and best_of(storage, study)(name) is None:
            raise StageFailed(_nothing_finished(study, found))
    if run_deadline is not None and (ended == OUT_OF_TIME or time.time() >= run_deadline - 1):
        left = run_deadline - time.time()
        if left < 1:
            return f"its timeout ({timeout:.0f} s) was spent"
        # The last trials stopped where the next would not fit, or to leave re-scoring its time.
        return f"its timeout ({timeout:.0f} s) was spent: no trial fit in the {left:.0f} s left"
    return ended or "every stage ran its budget of trials"


class Stage:
    """One stage's trials, run here and in the worker processes, with its progress bar."""

    def __init__(
        self,
        plan: StagePlan,
        storage: optuna.storages.BaseStorage,
        fn: Objective,
        helpers: Pool,
        draw: bool,
        out: Print,
        reserve: Callable[[optuna.Study], float] | None = None,
        until: float | None = None,
    ) -> None:
        self.plan, self.storage, self.fn, self.helpers = plan, storage, fn, helpers
        self.draw, self.out = draw, out
        # With re-scoring: this process's trials end by ``until`` less what ``reserve`` keeps.
        self.reserve, self.until = reserve, until

    def trials(self, budget: Budget, deadline: float | None, done: float) -> optuna.Study:
        """Run trials until the stage has ``budget.trials`` finished ones, or time is up."""
        storages.set_study_user_attrs(
            optuna.load_study(study_name=self.plan.name, storage=self.storage), {"ended": None}
        )
        # The bar shares the terminal with worker processes' lines only when there are none.
        bar = StageProgress(self.plan.stage, budget.trials, budget.timeout, draw=self.draw)
        bar.update(done, None)
        with bar:
            self.helpers.start(self.plan, budget, deadline)
            mine = deadline if self.reserve is None else self.until
            found = work(self.plan, self.storage, self.fn, budget, deadline=mine,
                         out=bar.wrap(self.out), bar=bar, reserve=self.reserve)  # fmt: skip
            self.helpers.wait()
        return found


def _widen(
    stage: Stage, found: optuna.Study, budget: Budget, deadline: float | None, out: Print
) -> tuple[optuna.Study, StagePlan]:
    """The widening rule (tuner.closed_loop): while the best value sits at a non-natural edge
    and the stage has time for a few more trials, widen the range and go on."""
    plan = stage.plan
    for _ in range(closed_loop.WIDEN_ROUNDS):
        if found.user_attrs.get("ended"):  # the stop rule ended the stage
            break
        ranked = results.ranked(found)
        each = closed_loop.mean_trial_seconds(found) or 0.0
        if not ranked:
            break
        widenings = closed_loop.edges(plan, ranked[0])
        if not widenings:
            break
        if deadline is not None and deadline - time.time() < 3 * each:
            out(f"  {widenings[0].key} sits at an edge, but the stage has no time to widen it")
            break
        records = closed_loop.record_widenings(found, widenings)
        plan = closed_loop.widened(plan, records)
        for w in widenings:
            out(f"  {w.line()}")
            found.enqueue_trial(closed_loop.moved(ranked[0], plan, w))
        budget = Budget(budget.trials + closed_loop.EXTRA_TRIALS * len(widenings), budget.timeout)
        stage.plan = plan
        finished = sum(1 for t in found.get_trials(deepcopy=False) if t.state.is_finished())
        found = stage.trials(budget, deadline, spent(plan, budget, found, finished))
    return found, plan


def _kept(
    study: optuna.Study,
    rescoring: Callable[[optuna.Study], float] | None,
    factor: int,
    cap: float | None,
) -> float:
    """Seconds a stage's trials leave free before its deadline: its re-scoring's, and its
    follow-up's where its best asks for one (both read anew before each trial), at most
    ``cap`` (a share of the stage's time: slow top trials must not end the search)."""
    kept = 0.0 if rescoring is None else rescoring(study)
    kept += closed_loop.follow_up_seconds(study, factor)
    return kept if cap is None else min(kept, cap)


def _follow_up(
    stage: Stage,
    found: optuna.Study,
    budget: Budget,
    factor: int,
    deadline: float | None,
    out: Print,
    fresh: bool = False,
) -> optuna.Study:
    """The longer rule (tuner.closed_loop.follow_up): where the stage's best peaked in the
    last 25% of its epochs, train it once more with ``factor`` x its epochs, if it fits
    before the deadline; the validation metric decides. It runs before the re-scoring, which
    takes what is left of the time kept (breadth first): with the re-scoring's own time
    kept first, the follow-up never fit in a stage whose kept time was capped. ``fresh`` (a
    stage that re-scores): it trains on a fresh seed and duels its best there."""
    pending = closed_loop.pending_follow_up(found, factor, fresh)
    if pending is None:
        return found
    wanted, need = pending
    left = None if deadline is None else deadline - time.time()
    if left is not None and need > left:
        out(f"  {wanted.no_time(need, left)}")
        return found
    ended = found.user_attrs.get("ended")
    wanted = closed_loop.queue_follow_up(found, wanted)
    out(f"  {wanted.line()}")
    counted = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget counts: one more
    done = sum(1 for t in found.get_trials(deepcopy=False) if t.state in counted)
    # It trains up to the stage's deadline: the time kept is its (kept before each trial
    # above, it would otherwise stop where the other trials stopped, after one epoch).
    kept, stage.reserve = stage.reserve, None
    try:
        # One more trial, exactly: the pruned trials' credit is the search's, not the follow-up's.
        found = stage.trials(Budget(done + 1, budget.timeout, credit=False), deadline, done)
    finally:
        stage.reserve = kept
    if ended and not found.user_attrs.get("ended"):  # why the stage's search ended stands
        storages.set_study_user_attrs(found, {"ended": ended})
    return found


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
