"""The runner: incumbent first, resume to the budget, pruning vs early stopping vs divergence.

Objectives here are plain functions of the config: the decisions are the point, not training.
"""

import math
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tuner import runner, samplers
from tuner import stage as stage_loop
from tuner import storage as storages
from tuner import trial as trial_bridge
from tuner.config import apply_overrides, load_study
from tuner.errors import StageFailed, StageRefused
from tuner.plan import plan_stage
from tuner.results import best_of, best_trial
from tuner.runner import stage_budgets, stage_timeout
from tuner.samplers import CachedPercentilePruner
from tuner.stage import Budget, run_stage


@pytest.fixture()
def study(tmp_path: Path):
    base = load_study()
    return apply_overrides(base, {"storage": f"sqlite:///{tmp_path}/t.db"}, {}).study


def quadratic(config, report):
    """Peaks at lr = 1e-2; a few 'epochs' of steady values."""
    value = 1.0 - (math.log10(config["lr"]) + 2.0) ** 2 / 10
    for epoch in range(1, 4):
        report(epoch, {"accuracy": value * epoch / 3})
    return {"accuracy": value, "stop_reason": "max_epochs", "best_epoch": 3}


def run(study, stage, fn, trials, quiet=True, **kwargs):
    storage = storages.open_storage(study.storage)
    plan = plan_stage(study, stage, best_of(storage, study))
    out = (lambda line: None) if quiet else print
    return run_stage(plan, storage, fn, Budget(trials, None), out=out, **kwargs)


def with_batch(study):
    return apply_overrides(study, {"batch_size": "64"}, {}).study


def test_the_incumbent_is_the_first_trial(study) -> None:
    s = run(with_batch(study), "lr", quadratic, 3)
    first = s.trials[0]
    # Trial 0 runs the defaults (with the fixed values): the stage cannot end below it.
    assert first.params == {"lr": 0.003, "schedule": "onecycle", "warmup": 0.2}
    assert first.user_attrs["config"]["batch_size"] == 64


def test_the_batch_stage_runs_every_candidate_incumbent_first(study) -> None:
    seen = []

    def fn(config, report):
        seen.append((config["batch_size"], config["time_budget"]))
        return {"accuracy": 0.5 + config["batch_size"] / 1000}

    s = run(study, "batch_size", fn, 4)
    assert seen == [(64, 3.0), (32, 3.0), (128, 3.0), (256, 3.0)]
    assert s.best_params == {"batch_size": 256}


def test_a_stage_resumes_up_to_its_budget(study) -> None:
    fixed = with_batch(study)
    run(fixed, "lr", quadratic, 3)
    s = run(fixed, "lr", quadratic, 5)
    assert len(s.trials) == 5  # resumed: 2 more, not 5 more
    again = run(fixed, "lr", quadratic, 5)
    assert len(again.trials) == 5  # the budget is spent: nothing runs


def test_the_next_stage_carries_the_best_and_records_lineage(study) -> None:
    fixed = with_batch(study)
    lr_study = run(fixed, "lr", quadratic, 6)
    s = run(fixed, "optimizer", lambda c, r: {"accuracy": 0.5}, 2)
    assert s.user_attrs["fixed"]["lr"] == lr_study.best_params["lr"]
    assert s.user_attrs["lineage"]["lr"]["trial"] == lr_study.best_trial.number
    assert s.trials[0].params["lr[adamw]"] == lr_study.best_params["lr"]


def test_early_stopping_is_complete_and_divergence_is_pruned(study) -> None:
    def fn(config, report):
        if config["lr"] > 0.01:
            report(1, {"accuracy": 0.1})
            return {"stop_reason": "diverged", "best_epoch": 1}
        report(1, {"accuracy": 0.8})
        return {"accuracy": 0.8, "stop_reason": "patience", "best_epoch": 1}

    s = run(with_batch(study), "lr", fn, 12)
    for t in s.trials:
        if t.user_attrs["stop_reason"] == "diverged":
            # The sampler must learn to avoid the region: PRUNED, not FAIL.
            assert t.state == TrialState.PRUNED
        else:
            assert t.state == TrialState.COMPLETE and t.value == 0.8
    assert {t.user_attrs["stop_reason"] for t in s.trials} == {"diverged", "patience"}


def test_the_pruner_prunes_a_trial_below_the_median(study) -> None:
    s = run(with_batch(study), "lr", quadratic, 1)
    for value in (0.9, 0.9, 0.9, 0.9, 0.9):  # history: others did well at every epoch
        s.add_trial(optuna.trial.create_trial(
            value=value, intermediate_values={1: value, 2: value, 3: value, 4: value, 5: value},
            params={"lr": 0.01, "schedule": "cosine", "warmup": 0.1},
            distributions=s.trials[0].distributions, user_attrs={"config": {}},
        ))  # fmt: skip

    def poor(config, report):
        for epoch in range(1, 6):
            report(epoch, {"accuracy": 0.1})
        return {"accuracy": 0.1}

    s = run(with_batch(study), "lr", poor, 7)
    last = s.trials[-1]
    assert last.state == TrialState.PRUNED
    assert last.user_attrs["stop_reason"] == "pruned"
    assert last.last_step == 3  # n_warmup_steps=3: epochs 1 and 2 are never pruned


def test_a_stage_whose_trials_keep_failing_stops_with_the_error(study) -> None:
    def broken(config, report):
        raise RuntimeError("no such layer")

    with pytest.raises(StageFailed, match="5 trials in a row failed with RuntimeError: no such"):
        run(with_batch(study), "lr", broken, 20)


def test_a_missing_metric_fails_the_trial_with_a_reason(study) -> None:
    fixed = with_batch(study)
    with pytest.raises(StageFailed):  # failed trials do not count: the streak ends it
        run(fixed, "lr", lambda c, r: {"acc": 1.0}, 1)
    storage = storages.open_storage(fixed.storage)
    trial = optuna.load_study(study_name="mnist1d_cnn/lr", storage=storage).trials[0]
    assert trial.state == TrialState.FAIL
    assert "returned no finite 'accuracy'" in trial.user_attrs["error"]


def test_a_stage_is_refused_when_upstream_changed_and_restart_runs_it_anew(study) -> None:
    fixed = with_batch(study)
    run(fixed, "lr", quadratic, 2)
    run(fixed, "optimizer", lambda c, r: {"accuracy": 0.5}, 1)
    storage = storages.open_storage(fixed.storage)
    lr_stage = optuna.load_study(study_name="mnist1d_cnn/lr", storage=storage)
    lr_stage.enqueue_trial({"lr": 1e-2})  # quadratic's peak: more lr trials find a better lr
    run(fixed, "lr", quadratic, 3)  # (the sampler's draws differ from run to run)
    assert best_trial(optuna.load_study(study_name="mnist1d_cnn/lr", storage=storage)).number > 1
    with pytest.raises(StageRefused, match=r"stale.*restart=true"):
        run(fixed, "optimizer", lambda c, r: {"accuracy": 0.5}, 2)
    s = run(fixed, "optimizer", lambda c, r: {"accuracy": 0.5}, 2, restart=True)
    assert len(s.trials) == 2


def test_run_budgets_share_trials_and_time_as_the_study_says(study) -> None:
    stages = study.stages
    assert stage_budgets(study, stages, None) == study.trials
    assert stage_budgets(study, stages, 24) == {
        "batch_size": 2, "lr": 4, "optimizer": 2, "architecture": 10, "refine": 6,
    }  # fmt: skip
    assert stage_budgets(study, ("lr",), 20) == {"lr": 20}
    # 110 s left for lr, optimizer, architecture, refine (shares 2, 1, 5, 3): 2/11 for lr.
    assert stage_timeout(study, "lr", stages[1:], 110.0) == pytest.approx(20.0)
    assert stage_timeout(study, "lr", stages[1:], None) is None


def test_a_trials_results_and_epochs_are_stored_with_it(study) -> None:
    s = run(with_batch(study), "lr", quadratic, 2)
    trial = s.trials[1]
    result = quadratic(trial.user_attrs["config"], lambda epoch, metrics: None)
    # Every key the objective returned is a user attr, beside the config and the timing.
    assert {k: trial.user_attrs[k] for k in result} == result
    assert {"config", "trial_seconds"} <= set(trial.user_attrs)
    # Every epoch's validation metric is an intermediate value, as the dashboard plots it.
    assert trial.intermediate_values == {e: result["accuracy"] * e / 3 for e in (1, 2, 3)}


def test_a_failed_trial_keeps_its_error_and_traceback(study) -> None:
    calls = []

    def flaky(config, report):
        calls.append(config)
        if len(calls) == 2:  # the second trial fails; a failed trial does not count
            raise RuntimeError("no such layer")
        return {"accuracy": 0.5}

    s = run(with_batch(study), "lr", flaky, 2)
    failed = [t for t in s.trials if t.state == TrialState.FAIL]
    assert failed and failed[0].user_attrs["error"] == "RuntimeError: no such layer"
    assert "raise RuntimeError" in failed[0].user_attrs["traceback"]  # where it came from


def test_progress_lines_count_finished_trials_and_name_the_best(study) -> None:
    lines: list[str] = []
    storage = storages.open_storage(study.storage)
    fixed = with_batch(study)
    plan = plan_stage(fixed, "lr", best_of(storage, fixed))
    s = run_stage(plan, storage, quadratic, Budget(4, None), out=lines.append)
    best = best_trial(s)
    assert best is not None
    trial_lines = [line for line in lines if line.startswith("[lr ")]
    # One line per trial, n of N finished, and the best so far as best_trial picks it.
    assert [line.split("]")[0] for line in trial_lines] == [f"[lr {n}/4" for n in (1, 2, 3, 4)]
    assert f"best {best.value:.4f} (#{best.number})" in trial_lines[-1]


class FakeClock:
    """The runner's clock, advanced only by the objective's epochs: timing without waiting."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    perf_counter = monotonic = time

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("curve", "decisions"),
    [
        ([0.1, 0.1, 0.1, 0.1], [True, True, True, True]),  # below every other trial
        ([0.9, 0.9, 0.9, 0.9], [False, False, False, False]),  # above them
        ([0.56, 0.58, 0.62, 0.64], [False, True, True, True]),  # overtaken as others finish
    ],
)
def test_the_cached_median_pruner_decides_as_optunas(
    tmp_path: Path, curve: list[float], decisions: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    for module in (samplers, stage_loop, trial_bridge):
        monkeypatch.setattr(module, "time", clock)
    study = optuna.create_study(
        storage=storages.open_storage(f"sqlite:///{tmp_path}/t.db"), direction="maximize"
    )

    def finish(value: float) -> None:
        study.add_trial(optuna.trial.create_trial(
            value=value, intermediate_values={step: value for step in (1, 2, 3, 4)}
        ))  # fmt: skip

    for value in (0.3, 0.5, 0.6, 0.7):
        finish(value)
    plain = optuna.pruners.MedianPruner(n_startup_trials=3)
    cached = CachedPercentilePruner(optuna.pruners.MedianPruner(n_startup_trials=3))
    seen = []
    for step in (1, 2, 3, 4):
        running = optuna.trial.create_trial(
            state=TrialState.RUNNING, intermediate_values=dict(enumerate(curve[:step], 1))
        )
        # Same trials, same decision: reading COMPLETE trials less often changes nothing.
        assert cached.prune(study, running) == plain.prune(study, running)
        seen.append(cached.prune(study, running))
        finish(0.8)  # another worker finishes a trial: a decision a second later counts it
        clock.sleep(samplers.REFRESH_SECONDS)
    assert seen == decisions


def test_the_pruner_holds_a_trial_against_the_sampled_trials_not_the_enqueued_ones(
    tmp_path: Path,
) -> None:
    """The incumbent and its probes (enqueued, tuned, ahead at once) are no bar for a new
    config: the median is taken over the trials the sampler drew (``pruner.compare_to``)."""
    study = optuna.create_study(
        storage=storages.open_storage(f"sqlite:///{tmp_path}/t.db"), direction="maximize"
    )

    def finish(curve: list[float], enqueue: bool) -> None:
        if enqueue:
            study.enqueue_trial({"x": 0.5})
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
        study.tell(trial, curve[-1])

    median = {"n_startup_trials": 4, "n_warmup_steps": 2}
    sampled = CachedPercentilePruner(optuna.pruners.MedianPruner(**median), sampled_only=True)
    every = CachedPercentilePruner(optuna.pruners.MedianPruner(**median))
    behind = optuna.trial.create_trial(  # behind the tuned four, ahead of what the search drew
        state=TrialState.RUNNING, intermediate_values={1: 0.5, 2: 0.7, 3: 0.8}
    )
    for tuned in ([0.9, 0.95, 0.97], [0.92, 0.96, 0.98], [0.88, 0.94, 0.96], [0.9, 0.95, 0.97]):
        finish(tuned, enqueue=True)
    assert every.prune(study, behind)  # Optuna's own: four COMPLETE trials, all ahead
    assert not sampled.prune(study, behind)  # no drawn trial finished yet: nothing is pruned
    for drawn in ([0.3, 0.5, 0.6], [0.4, 0.6, 0.75], [0.5, 0.7, 0.85], [0.6, 0.8, 0.9]):
        finish(drawn, enqueue=False)
    every, sampled = (CachedPercentilePruner(p.pruner, sampled_only=p.sampled_only)
                      for p in (every, sampled))  # fmt: skip
    assert every.prune(study, behind)  # the median of all eight at step 3: 0.875
    assert not sampled.prune(study, behind)  # the drawn four's: 0.8, and it is at 0.8
    worse = optuna.trial.create_trial(
        state=TrialState.RUNNING, intermediate_values={1: 0.3, 2: 0.5, 3: 0.7}
    )
    assert sampled.prune(study, worse)  # behind the search itself: pruned


def test_the_study_file_says_what_the_pruner_compares_to(study) -> None:
    plan = plan_stage(with_batch(study), "lr", lambda stage: None)
    made = samplers.read_less(samplers.make_pruner(plan, 12), plan.study)
    assert isinstance(made, CachedPercentilePruner) and made.sampled_only  # the default
    optuna_own = apply_overrides(study, {"pruner.compare_to": "all"}, {}).study
    made = samplers.read_less(samplers.make_pruner(plan, 12), optuna_own)
    assert isinstance(made, CachedPercentilePruner) and not made.sampled_only


def test_each_progress_line_says_what_optuna_stored_of_its_trial(study) -> None:
    def fn(config, report):
        if config["lr"] > 0.01:  # diverges: PRUNED, its value Optuna's (the last report)
            report(1, {"accuracy": 0.3})
            report(2, {"accuracy": 0.2})
            return {"stop_reason": "diverged", "best_epoch": 1}
        if config["warmup"] > 0.35:  # one trial in eight: five in a row (a stop) are unlikely
            raise RuntimeError("no such layer")
        report(1, {"accuracy": 0.8})
        return {"accuracy": 0.8, "stop_reason": "patience", "best_epoch": 1}

    lines: list[str] = []
    storage = storages.open_storage(study.storage)
    # A fixed sampler seed (each process draws its own otherwise), and no stop rule: the
    # twelve trials are the point.
    fixed = replace(
        with_batch(study),
        sampler={**study.sampler, "seed": 0},
        loop={**study.loop, "stagnation": False},
    )
    s = run_stage(
        plan_stage(fixed, "lr", best_of(storage, fixed)), storage, fn, Budget(12, None),
        out=lines.append,
    )  # fmt: skip
    trial_lines = [line for line in lines if line.startswith("[lr ")]
    assert len(trial_lines) == len(s.trials)
    for line, t in zip(trial_lines, s.trials, strict=True):
        # The line is built from what this process holds, not read back: it must agree.
        assert f"#{t.number} {t.state.name}" in line
        if t.value is not None:
            assert f"accuracy={t.value:.4f}" in line
        else:
            assert "accuracy=" not in line.split("best")[0]
        if t.state == TrialState.PRUNED:
            assert t.value == 0.2 and "diverged" in line
        if t.state == TrialState.FAIL:
            assert "RuntimeError: no such layer" in line
    # The seeded sampler draws all three endings here.
    assert {t.state for t in s.trials} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # Optuna's, on the NaN curve
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"n_warmup_steps": 2}, {"interval_steps": 2}, {"n_min_trials": 5},
     {"n_startup_trials": 7}],
)  # fmt: skip
def test_the_cached_pruner_decides_as_optunas_whatever_its_settings(
    tmp_path: Path, direction: str, settings: dict[str, int]
) -> None:
    study = optuna.create_study(
        storage=storages.open_storage(f"sqlite:///{tmp_path}/t.db"), direction=direction
    )
    for i in range(6):  # six finished curves; the first two skip step 3
        curve = {step: 0.1 * i + 0.02 * step for step in range(1, 6) if i > 1 or step != 3}
        study.add_trial(optuna.trial.create_trial(value=0.1 * i, intermediate_values=curve))
    curves = [[0.35, 0.4, 0.42, 0.5, 0.55], [0.05, 0.1, 0.6, 0.7, 0.9], [math.nan] * 5]
    plain = optuna.pruners.MedianPruner(**settings)
    cached = CachedPercentilePruner(optuna.pruners.MedianPruner(**settings))
    for curve in curves:
        for step in range(1, 6):
            running = optuna.trial.create_trial(
                state=TrialState.RUNNING, intermediate_values=dict(enumerate(curve[:step], 1))
            )
            # Every check of Optuna's pruner, in its order: the same decision at every step.
            assert cached.prune(study, running) == plain.prune(study, running), (curve, step)


def test_the_cached_pruner_counts_other_workers_trials_once_a_second_and_per_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    for module in (samplers, stage_loop, trial_bridge):
        monkeypatch.setattr(module, "time", clock)
    study = optuna.create_study(
        storage=storages.open_storage(f"sqlite:///{tmp_path}/t.db"), direction="maximize"
    )
    for value in (0.3, 0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: value}))
    cached = CachedPercentilePruner(optuna.pruners.MedianPruner(n_startup_trials=3))
    running = study.ask()
    running.report(0.55, 1)  # above the median of 0.3, 0.5, 0.6
    assert not cached.prune(study, running._get_latest_trial())
    for _ in range(2):  # two trials of other workers finish well above it
        study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.9}))
    clock.sleep(samplers.REFRESH_SECONDS / 2)
    # Within the second the count is not read again: the decision stands on what it read ...
    assert not cached.prune(study, running._get_latest_trial())
    clock.sleep(samplers.REFRESH_SECONDS / 2)
    # ... a second after it was read, it is, and the median (0.6) is now above the trial.
    assert cached.prune(study, running._get_latest_trial())
    # A new trial's first decision always reads it.
    study.add_trial(optuna.trial.create_trial(value=0.95, intermediate_values={1: 0.95}))
    fresh = study.ask()
    fresh.report(0.7, 1)  # above the median of five (0.6), below that of the six (0.75)
    assert cached.prune(study, fresh._get_latest_trial())


def test_a_trial_still_running_when_time_is_up_keeps_its_best_epoch(study, monkeypatch) -> None:
    clock = FakeClock()
    for module in (samplers, stage_loop, trial_bridge):
        monkeypatch.setattr(module, "time", clock)

    def slow(config, report):
        for epoch, value in enumerate([0.5, 0.8, 0.7, 0.9, 0.95], start=1):
            clock.sleep(0.3)
            report(epoch, {"accuracy": value, "loss": 1.0 - value})
        return {"accuracy": 0.95, "stop_reason": "max_epochs"}

    storage = storages.open_storage(study.storage)
    plan = plan_stage(with_batch(study), "lr", best_of(storage, study))
    s = run_stage(plan, storage, slow, Budget(3, 0.7), out=lambda line: None)
    first = s.trials[0]
    # At 0.6 s a third 0.3 s epoch would end after the 0.7 s deadline: stopped after epoch 2,
    # COMPLETE with its best epoch so far (not PRUNED), so a short run still gives the next
    # stage a value to fix.
    assert first.state == TrialState.COMPLETE
    # Its value is its curve so far, smoothed (loop.smooth: 3 epochs, 2 of them run) ...
    assert first.value == pytest.approx((0.5 + 0.8) / 2)
    attrs = first.user_attrs
    assert attrs["accuracy"] == 0.8  # ... and the best epoch's metrics are kept
    assert (attrs["stop_reason"], attrs["best_epoch"], attrs["epochs_run"]) == (
        "out_of_time",
        2,
        2,
    )
    assert attrs["loss"] == pytest.approx(0.2)  # the best epoch's other metrics come along
    assert len(s.trials) == 1  # no trial starts that could not report once in time


def test_a_trial_whose_last_epoch_ends_past_the_deadline_trained_them_all(
    study, monkeypatch
) -> None:
    # The deadline falls during the trial's last epoch: no epoch follows it, so nothing was
    # cut. It ends on max_epochs (a follow-up asks for that), not "out of time at epoch 5".
    clock = FakeClock()
    for module in (samplers, stage_loop, trial_bridge):
        monkeypatch.setattr(module, "time", clock)

    def slow(config, report):
        for epoch in range(1, config["epochs"] + 1):
            clock.sleep(0.3)
            report(epoch, {"accuracy": 0.1 * epoch, "loss": 1.0 - 0.1 * epoch})
        return {"accuracy": 0.5, "best_epoch": 5, "epochs_run": 5, "stop_reason": "max_epochs"}

    storage = storages.open_storage(study.storage)
    five = apply_overrides(with_batch(study), {"epochs": "5"}, {}).study
    plan = plan_stage(five, "lr", best_of(storage, five))
    # After epoch 4 (1.2 s) a fifth ends at 1.5 s, before the 1.6 s deadline; after epoch 5
    # another would end too late, but there is none.
    s = run_stage(plan, storage, slow, Budget(3, 1.6), out=lambda line: None)
    attrs = s.trials[0].user_attrs
    assert (attrs["stop_reason"], attrs["epochs_run"]) == ("max_epochs", 5)
    # Where the config does not fix its epochs (a time budget), the check stands after each.
    assert trial_bridge.last_epoch({"epochs": 5, "time_budget": 30}) is None
    assert trial_bridge.last_epoch({"epochs": 5}) == 5


def test_a_run_stops_after_a_stage_without_a_result_and_says_why(study, monkeypatch) -> None:
    def diverges(config, report):
        return {"stop_reason": "diverged"}  # every trial is PRUNED

    monkeypatch.setattr(runner, "load_objective", lambda spec: diverges)
    with pytest.raises(StageFailed) as caught:
        runner.run(study, stage=None, trials=None, check=False, out=lambda line: None)
    # The run stops at the stage with no result, naming it and why its trials ended,
    # rather than refusing the next stage for want of a batch size.
    assert str(caught.value) == (
        "Stage batch_size ended with no COMPLETE trial (4 pruned); the last one: PRUNED"
        " (diverged), and the stages after it need its best values; see `python -m tuner status`."
    )
