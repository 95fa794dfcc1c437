"""The closed loop's rules (tuner.closed_loop): widen an edge, re-score the top trials on other
seeds, score a trial by its smoothed peak, stop on stagnation. Fake trials where the decision
is the point; one fake objective where the stage has to go on."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import tuner
from tuner import closed_loop
from tuner.config import load_study
from tuner.errors import UserError
from tuner.plan import plan_stage
from tuner.results import RESCORED, best_trial

STUDY = load_study()
CONFIG = STUDY.config


def lr_plan(**changes: Any):
    study = STUDY
    if changes:
        from dataclasses import replace

        study = replace(STUDY, **changes)
    return plan_stage(study, "lr", lambda stage: None if stage != "batch_size" else best_bs())


def best_bs():
    from tuner.plan import Best

    return Best("batch_size", 0, 0.9, CONFIG, {})


def trial(number: int, value: float, lr: float, warmup: float = 0.1, **attrs: Any):
    t = create_trial(
        value=value,
        params={"lr": lr, "schedule": "cosine", "warmup": warmup},
        distributions={
            "lr": FloatDistribution(3e-4, 3e-2, log=True),
            "schedule": CategoricalDistribution(["constant", "cosine", "onecycle"]),
            "warmup": FloatDistribution(0.0, 0.4),
        },
        user_attrs={"config": {**CONFIG, "lr": lr, "warmup": warmup}, **attrs},
    )
    t.number = number
    return t


# --- widen ----------------------------------------------------------------------------------


def test_a_best_value_at_a_guessed_edge_widens_it_by_half_the_range_in_its_scale() -> None:
    [w] = closed_loop.edges(lr_plan(), trial(3, 0.9, 2.9e-2))
    assert (w.key, w.edge, w.trial) == ("lr", "high", 3)
    # Two decades, log: a decade more above; the low edge stays.
    assert w.after == pytest.approx((3e-4, 3e-1))
    [w] = closed_loop.edges(lr_plan(), trial(3, 0.9, 3.1e-4))
    assert w.after == pytest.approx((3e-5, 3e-2))


@pytest.mark.parametrize(
    ("lr", "warmup"),
    [
        (3e-3, 0.2),  # inside both ranges
        (3e-3, 0.0),  # no warm-up: a linear range's 0 is an answer, not a limit
        (3e-3, 0.4),  # the top of warm-up: natural, as lr.yaml says
    ],
)
def test_no_widening_inside_a_range_or_at_a_natural_edge(lr: float, warmup: float) -> None:
    assert closed_loop.edges(lr_plan(), trial(1, 0.9, lr, warmup)) == []


def test_a_range_around_the_incumbent_grows_its_factor() -> None:
    plan = plan_stage(STUDY, "architecture", lambda stage: _best_all(stage))
    lr = next(p for p in plan.space.params if p.key == "lr")
    dist = lr.distribution(plan.incumbent, plan.incumbent)
    name = lr.name(plan.incumbent)
    best = create_trial(
        value=0.9, params={name: dist.high * 0.99}, distributions={name: dist},
        user_attrs={"config": plan.incumbent},
    )  # fmt: skip
    [w] = closed_loop.edges(plan, best)
    assert w.around == pytest.approx(10**1.5)
    wider = closed_loop.widened(plan, [w.as_dict()])
    new = next(p for p in wider.space.params if p.key == "lr")
    assert new.around == pytest.approx(10**1.5)
    assert new.distribution(plan.incumbent, plan.incumbent).high == pytest.approx(
        plan.incumbent["lr"] * 10**1.5
    )


def _best_all(stage: str):
    from tuner.plan import Best

    return Best(stage, 0, 0.9, CONFIG, {})


def test_the_widened_plan_searches_the_new_range_and_starts_where_the_edge_hid() -> None:
    plan = lr_plan()
    best = trial(3, 0.9, 2.9e-2)
    [w] = closed_loop.edges(plan, best)
    wider = closed_loop.widened(plan, [w.as_dict()])
    lr = next(p for p in wider.space.params if p.key == "lr")
    assert (lr.low, lr.high) == pytest.approx((3e-4, 3e-1))
    moved = closed_loop.moved(best, wider, w)
    # Halfway (in log) between the old edge and the new one; the other params stay.
    assert moved["lr"] == pytest.approx(math.sqrt(3e-2 * 3e-1))
    assert moved["schedule"] == "cosine" and moved["warmup"] == pytest.approx(0.1)


# --- rescore ----------------------------------------------------------------------------------


def test_the_best_of_a_rescored_stage_is_the_best_mean_not_the_luckiest_value() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, 0.990, 1e-3))  # flattered by its split
    study.add_trial(trial(1, 0.985, 2e-3))
    study.add_trial(trial(2, 0.980, 3e-3))
    assert best_trial(study).number == 0
    study.set_user_attr(RESCORED, {"0": [0.990, 0.970, 0.972], "1": [0.985, 0.984, 0.986]})
    assert best_trial(study).number == 1
    # A seed that failed (nan) keeps a config from winning.
    study.set_user_attr(RESCORED, {"0": [0.990, 0.988, 0.989], "1": [0.985, math.nan, 0.99]})
    assert best_trial(study).number == 0


def test_rescored_trials_are_compared_on_their_fresh_seeds_only() -> None:
    # The first value put each trial in the top few, the first-ranked most of all: #0's mean
    # over all three seeds (0.9883) beats #1's (0.9867), but on the two seeds trained after
    # the choice #1 scores 0.9875 against #0's 0.9850.
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, 0.995, 1e-3))
    study.add_trial(trial(1, 0.985, 2e-3))
    study.set_user_attr(RESCORED, {"0": [0.995, 0.985, 0.985], "1": [0.985, 0.9875, 0.9875]})
    assert best_trial(study).number == 1
    assert closed_loop.spread_text([0.995, 0.985, 0.985]) == (
        "0.9883 ± 0.0058 (3 seeds; fresh 0.9850)"
    )


def test_rescored_trials_compare_on_the_fresh_seeds_they_all_have() -> None:
    # A re-scoring cut short by the deadline: #0 has one fresh seed (seed+1), #1 two. On the
    # mean of what each has, #0 wins (0.975 against 0.970); on the seed both have, the same
    # validation split, #1 does (0.980 against 0.975), and its second, harder split no longer
    # counts against it.
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, 0.995, 1e-3))
    study.add_trial(trial(1, 0.990, 2e-3))
    study.set_user_attr(RESCORED, {"0": [0.995, 0.975], "1": [0.990, 0.980, 0.960]})
    assert best_trial(study).number == 1
    # Tied on the seed they share: the mean over all its fresh seeds breaks the tie.
    study.set_user_attr(RESCORED, {"0": [0.995, 0.980], "1": [0.990, 0.980, 0.990]})
    assert best_trial(study).number == 1
    study.set_user_attr(RESCORED, {"0": [0.995, 0.980], "1": [0.990, 0.980, 0.970]})
    assert best_trial(study).number == 0


def ten_second_trials(monkeypatch: pytest.MonkeyPatch) -> tuple[optuna.Study, list[float]]:
    """A stage of 3 finished trials (0.99, 0.98, 0.97; lr 1e-3, 2e-3, 3e-3) that took 10 s
    each, and the clock ``closed_loop`` reads, at 1000 s: an objective moves it."""
    import datetime as dt

    clock = [1000.0]
    monkeypatch.setattr(closed_loop.time, "time", lambda: clock[0])
    study = optuna.create_study(direction="maximize")
    start = dt.datetime(2026, 1, 1)
    for number, value in enumerate([0.99, 0.98, 0.97]):
        t = trial(number, value, 1e-3 * (number + 1))
        t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=10)
        study.add_trial(t)
    return study, clock


def test_spare_seeds_go_on_breadth_first_while_the_deadline_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each run takes 10 s on a clock the objective moves. Two seeds for each of 3 candidates
    # take 60 s; the deadline at 85 s holds two spare runs more: #0 and #1 on a third seed.
    study, clock = ten_second_trials(monkeypatch)
    trained: list[tuple[float, int]] = []
    # lr 1e-3 is the best on seeds +1 and +2 and the worst on +3: compared on the seeds all
    # three have, it wins; its third seed and the second candidate's count for nothing yet.
    scores = {(1e-3, 1): 0.99, (1e-3, 2): 0.99, (1e-3, 3): 0.90, (2e-3, 3): 0.99}

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        clock[0] += 10
        trained.append((config["lr"], config["seed"] - CONFIG["seed"]))
        return {"accuracy": scores.get((config["lr"], config["seed"] - CONFIG["seed"]), 0.98)}

    lines: list[str] = []
    closed_loop.rescore(study, lr_plan(), fn, 3, 2, deadline=1085.0, out=lines.append, spare=5)
    assert trained == [(1e-3, 1), (2e-3, 1), (3e-3, 1), (1e-3, 2), (2e-3, 2), (3e-3, 2),
                       (1e-3, 3), (2e-3, 3)]  # fmt: skip
    assert "then on more while the run's time lasted (2 to 3 each" in lines[-1], lines
    assert best_trial(study).number == 0
    # With the time for all of them, every candidate has its 2 + 5 fresh seeds.
    clock[0], trained[:] = 1000.0, []
    study.set_user_attr(RESCORED, {})
    closed_loop.rescore(study, lr_plan(), fn, 3, 2, deadline=2000.0, out=lines.append, spare=5)
    assert len(trained) == 3 * 7
    assert lines[-1].startswith("  rescored the top 3 on 2 more seeds (and 5 spare ones"), lines


def test_a_run_spends_its_last_stages_time_on_spare_seeds_a_stage_run_alone_does_not(
    tmp_path: Path,
) -> None:
    def quick(config: dict[str, Any], report: Any) -> dict[str, Any]:
        score = 1 - (math.log10(config["lr"]) + 2) ** 2 / 10 + 0.001 * config["seed"]
        report(1, {"accuracy": score})
        return {"accuracy": score}

    def seeds(name: str, **run: Any) -> list[int]:
        study = tuner.load(
            {"name": name, "stages": ["lr"], "budget": {"trials": {"lr": 5}},
             "storage": f"sqlite:///{tmp_path}/{name}.db",
             "loop": {"stagnation": False, "widen": False,
                      "rescore": {"top": 2, "seeds": 2, "last_seeds": 4}},
             "search_spaces": {"lr": {"schedule": None, "warmup": None}},
             "defaults": {"lr": 3e-3, "epochs": 1, "seed": 0}},
            objective=quick,
        )  # fmt: skip
        tuner.run(study, check=False, progress=lambda line: None, **run)
        found = optuna.load_study(study_name=f"{name}/lr", storage=study.storage)
        return [len(v) - 1 for v in found.user_attrs[RESCORED].values()]

    assert seeds("run", timeout=60) == [4, 4]  # its 5 trials end long before 60 s
    assert seeds("alone", timeout=60, stage="lr") == [2, 2]  # as it always has
    assert seeds("untimed") == [2, 2]  # no time to spare without a timeout


def test_rescoring_trains_the_top_trials_on_more_seeds_and_the_best_mean_wins(
    tmp_path: Path,
) -> None:
    def noisy(config: dict[str, Any], report: Any) -> dict[str, Any]:
        # The true score peaks at lr = 1e-2; seed 0's split flatters the incumbent lr = 3e-3 by
        # 0.03 (exactly it: a sampled lr near 3e-3 must not share the bonus and outscore it).
        score = 1 - (math.log10(config["lr"]) + 2) ** 2 / 10
        if config["seed"] == 0 and math.isclose(config["lr"], 3e-3, rel_tol=1e-12):
            score += 0.03
        report(1, {"accuracy": score})
        return {"accuracy": score}

    study = tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 6}},
         "storage": f"sqlite:///{tmp_path}/r.db", "loop": {"stagnation": False, "widen": False},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "sampler": {"seed": 0},  # the same 5 trials every run: some near lr = 1e-2
         "defaults": {"lr": 3e-3, "epochs": 1, "seed": 0}},
        objective=noisy,
    )  # fmt: skip
    lines: list[str] = []
    tuner.run(study, check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    scored = found.user_attrs[RESCORED]
    assert len(scored) == 3 and all(len(v) == 3 for v in scored.values())  # top 3, 2 more seeds
    best = best_trial(found)
    by_value = max(found.trials, key=lambda t: t.value or -1)
    assert by_value.number == 0  # the flattered incumbent has the best single value ...
    assert best.number != 0  # ... and loses on the mean over seeds
    assert any("rescored the top 3 on 2 more seeds" in line for line in lines)
    assert len(tuner.status(study)[0].best_seeds) == 3  # status shows the spread


def test_the_time_kept_for_rescoring_is_what_the_top_trials_took() -> None:
    import datetime as dt

    study = optuna.create_study(direction="maximize")
    start = dt.datetime(2026, 1, 1)
    for number, (value, seconds) in enumerate([(0.99, 10.0), (0.98, 2.0), (0.97, 4.0), (0.5, 60)]):
        t = trial(number, value, 1e-3 * (number + 1))
        t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=seconds)
        study.add_trial(t)
    # The top 3 (not the slow poor one) once per extra seed, 2 x (10 + 2 + 4), and one run of
    # the longest more.
    assert closed_loop.reserve(study, top=3, seeds=2) == pytest.approx(42.0)
    # The best is an earlier stage's config, on the same seed, re-scored there: re-scoring
    # reuses its values and trains only the other two, 2 x (2 + 4) and one run of 4 more.
    known = {json.dumps(study.trials[0].user_attrs["config"], sort_keys=True): [0.99, 0.98]}
    assert closed_loop.reserve(study, top=3, seeds=2, known=known) == pytest.approx(16.0)
    # Another seed-0 value there (that run was cut by its stage's deadline): the same config,
    # whose fresh value is reused all the same.
    moved = {next(iter(known)): [0.97, 0.98]}
    assert closed_loop.reserve(study, top=3, seeds=2, known=moved) == pytest.approx(16.0)


def test_a_stage_with_one_finished_trial_keeps_no_time_for_rescoring() -> None:
    # Re-scoring compares two or more: keeping a slow trial's 3 runs left a stage with that one
    # trial and 44 s of its 73 unused (a width-48 net, 28 s a trial).
    import datetime as dt

    study = optuna.create_study(direction="maximize")
    start = dt.datetime(2026, 1, 1)
    t = trial(0, 0.99, 1e-3)
    t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=28)
    study.add_trial(t)
    assert closed_loop.reserve(study, top=3, seeds=2) == 0.0
    t = trial(1, 0.98, 2e-3)
    t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=4)
    study.add_trial(t)
    assert closed_loop.reserve(study, top=3, seeds=2) == pytest.approx(2 * (28 + 4) + 28)


def test_rescoring_cut_short_gives_every_candidate_a_fresh_seed_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each run takes 10 s on a clock the objective moves; the deadline holds 3 of the 6 runs.
    study, clock = ten_second_trials(monkeypatch)
    trained: list[tuple[float, int]] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        clock[0] += 10
        trained.append((config["lr"], config["seed"]))
        return {"accuracy": 0.985 if config["lr"] == 2e-3 else 0.95}

    lines: list[str] = []
    closed_loop.rescore(study, lr_plan(), fn, 3, 2, deadline=1035.0, out=lines.append)
    seed = CONFIG["seed"] + 1
    assert trained == [(1e-3, seed), (2e-3, seed), (3e-3, seed)]  # not #0 on two seeds first
    assert "rescoring stopped: out of the stage's time" in lines[-1]
    assert best_trial(study).number == 1  # the best on the fresh seed, each compared on one


def test_a_stage_of_slow_trials_leaves_its_rescoring_the_time_it_needs(tmp_path: Path) -> None:
    import time

    def slow(config: dict[str, Any], report: Any) -> dict[str, Any]:
        time.sleep(0.5)  # every trial, and every re-scoring run, takes half a second
        score = 1 - (math.log10(config["lr"]) + 2) ** 2 / 10
        report(1, {"accuracy": score})
        return {"accuracy": score}

    study = tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 100}},
         "storage": f"sqlite:///{tmp_path}/t.db", "loop": {"stagnation": False, "widen": False},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "defaults": {"lr": 3e-3, "epochs": 1, "seed": 0}},
        objective=slow,
    )  # fmt: skip
    lines: list[str] = []
    result = tuner.run(study, timeout=12, check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    # The run says the time is spent, and how much was left where no further trial fit.
    assert re.fullmatch(r"its timeout \(12 s\) was spent(: no trial fit in the \d+ s left)?",
                        result.ended), result.ended  # fmt: skip
    # 3 trials x 2 seeds x 0.5 s is 3 s, more than a fixed fifth of the 12 s (and within the
    # third a stage keeps at most): the trials stop early enough for all of it. The run's last
    # stage then spends what time is left on spare seeds, breadth first (one at most, here).
    counts = [len(v) for v in found.user_attrs[RESCORED].values()]
    assert len(counts) == 3 and min(counts) >= 3 and max(counts) - min(counts) <= 1, lines
    assert not any("rescoring stopped" in line for line in lines), lines


def test_slow_top_trials_keep_at_most_a_third_of_the_stage_from_its_search() -> None:
    # A 40 s net in the top 3 asked for 2 x (40 + 7 + 7) + 40 = 148 s of a 128 s stage, which
    # then ended after its 5th trial: the search keeps two thirds, the re-scoring gets the rest.
    from tuner import runner

    study = optuna.create_study(direction="maximize")

    def rescoring(s: optuna.Study) -> float:
        return 148.0

    cap = runner.KEPT_SHARE * 128
    assert runner._kept(study, rescoring, 1, cap) == pytest.approx(128 / 3)
    assert runner._kept(study, lambda s: 20.0, 1, cap) == 20.0  # within the cap: all of it
    assert runner._kept(study, rescoring, 1, None) == 148.0  # no time limit: nothing to cap


def earlier_stage(storage: str, rescored: dict[float, list[float]]) -> optuna.Study:
    """An earlier stage of the run whose trials (one per lr) it re-scored: ``rescored`` maps
    each lr to its values over seeds, its first the trial's own value."""
    earlier = optuna.create_study(direction="maximize", storage=storage, study_name="earlier")
    for number, (lr, values) in enumerate(rescored.items()):
        earlier.add_trial(trial(number, values[0], lr))
    earlier.set_user_attr(RESCORED, {str(n): v for n, v in enumerate(rescored.values())})
    return earlier


def test_a_config_an_earlier_stage_rescored_is_not_trained_again(tmp_path: Path) -> None:
    # A real SQLite storage: an in-memory one keeps the dict it is given, and would show
    # values that were never written.
    storage = f"sqlite:///{tmp_path}/e.db"
    earlier = earlier_stage(storage, {1e-3: [0.95, 0.94, 0.96]})
    now = optuna.create_study(direction="maximize", storage=storage, study_name="now")
    now.add_trial(trial(0, 0.95, 1e-3))  # the incumbent: the earlier stage's best, ranked last
    now.add_trial(trial(1, 0.96, 2e-3))
    trained: list[float] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        trained.append(config["lr"])
        return {"accuracy": 0.9}

    plan = lr_plan()
    closed_loop.rescore(now, plan, fn, 2, 2, deadline=None, out=lambda line: None,
                        known=closed_loop.known_values([earlier]))  # fmt: skip
    assert trained == [2e-3, 2e-3]  # only the new config, on its two more seeds
    stored = optuna.load_study(study_name="now", storage=storage)
    assert stored.user_attrs[RESCORED] == {"0": [0.95, 0.94, 0.96], "1": [0.96, 0.9, 0.9]}
    assert best_trial(stored).number == 0  # the reused incumbent's mean (0.95) wins


def test_the_incumbent_an_earlier_stage_rescored_defends_its_place_below_the_top(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path}/d.db"
    earlier = earlier_stage(storage, {1e-3: [0.95, 0.97, 0.96]})  # fresh mean 0.965
    trained: list[tuple[float, int]] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        trained.append((config["lr"], config["seed"]))
        return {"accuracy": 0.94}  # the flattered challengers, on fresh seeds

    def stage(name: str, incumbent: bool) -> optuna.Study:
        now = optuna.create_study(direction="maximize", storage=storage, study_name=name)
        now.add_trial(trial(0, 0.95, 1e-3))  # the incumbent, trained again: ranked last
        now.add_trial(trial(1, 0.99, 2e-3))
        now.add_trial(trial(2, 0.98, 3e-3))
        known = closed_loop.known_values([earlier])
        closed_loop.rescore(now, lr_plan(), fn, 2, 2, deadline=None, out=lines.append,
                            known=known, incumbent=incumbent)  # fmt: skip
        return optuna.load_study(study_name=name, storage=storage)

    lines: list[str] = []

    on = stage("on", incumbent=True)
    seed = CONFIG["seed"]
    # Only the two challengers train, each on the same two fresh seeds; the incumbent's values
    # are those it holds.
    assert trained == [(2e-3, seed + 1), (3e-3, seed + 1), (2e-3, seed + 2), (3e-3, seed + 2)]
    assert on.user_attrs[RESCORED]["0"] == [0.95, 0.97, 0.96]
    assert best_trial(on).number == 0  # 0.965 on fresh seeds against 0.94
    assert lines[-1].startswith("  rescored the top 2 on 2 more seeds, with #0 (the incumbent): ")
    assert lines[-1].endswith("best: #0")
    trained.clear()
    off = stage("off", incumbent=False)  # the switch: the top 2 alone, as before
    assert "0" not in off.user_attrs[RESCORED] and best_trial(off).number == 1


def test_an_incumbent_rescored_on_fewer_seeds_is_trained_on_the_ones_it_lacks(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path}/f.db"
    earlier = earlier_stage(storage, {1e-3: [0.95, 0.97]})  # its re-scoring was cut short
    now = optuna.create_study(direction="maximize", storage=storage, study_name="now")
    now.add_trial(trial(0, 0.95, 1e-3))
    now.add_trial(trial(1, 0.99, 2e-3))
    trained: list[tuple[float, int]] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        trained.append((config["lr"], config["seed"]))
        return {"accuracy": 0.96}

    closed_loop.rescore(now, lr_plan(), fn, 1, 2, deadline=None, out=lambda line: None,
                        known=closed_loop.known_values([earlier]))  # fmt: skip
    seed = CONFIG["seed"]
    # Compared on the same seeds: the challenger on both, the incumbent on the one it lacks.
    assert trained == [(2e-3, seed + 1), (2e-3, seed + 2), (1e-3, seed + 2)]
    stored = optuna.load_study(study_name="now", storage=storage)
    assert stored.user_attrs[RESCORED] == {"1": [0.99, 0.96, 0.96], "0": [0.95, 0.97, 0.96]}
    assert best_trial(stored).number == 0


def test_a_config_cut_short_by_an_earlier_stage_reuses_the_fresh_values_it_holds(
    tmp_path: Path,
) -> None:
    # The earlier stage's deadline cut the config at some epoch (0.93); its re-scoring trained
    # it in full on two more seeds. Trained in full here it scores 0.95 on its own seed: the
    # same config all the same, so it keeps its fresh values and defends its place on them.
    storage = f"sqlite:///{tmp_path}/g.db"
    earlier = earlier_stage(storage, {1e-3: [0.93, 0.97, 0.96]})
    now = optuna.create_study(direction="maximize", storage=storage, study_name="now")
    now.add_trial(trial(0, 0.95, 1e-3))  # ranked last by its value here
    now.add_trial(trial(1, 0.99, 2e-3))
    now.add_trial(trial(2, 0.98, 3e-3))
    trained: list[float] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        trained.append(config["lr"])
        return {"accuracy": 0.94}

    lines: list[str] = []
    closed_loop.rescore(now, lr_plan(), fn, 2, 2, deadline=None, out=lines.append,
                        known=closed_loop.known_values([earlier]))  # fmt: skip
    assert trained == [2e-3, 3e-3, 2e-3, 3e-3]  # not the incumbent: its fresh values are held
    stored = optuna.load_study(study_name="now", storage=storage)
    assert stored.user_attrs[RESCORED]["0"] == [0.95, 0.97, 0.96]  # its own first value here
    assert "with #0 (the incumbent)" in lines[-1]
    assert best_trial(stored).number == 0


def test_a_rescoring_cut_short_names_the_best_by_the_values_it_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    storage = f"sqlite:///{tmp_path}/c.db"
    earlier = earlier_stage(storage, {1e-3: [0.95, 0.97, 0.96], 4e-3: [0.95, 0.93, 0.93]})
    now = optuna.create_study(direction="maximize", storage=storage, study_name="now")
    start = dt.datetime(2026, 1, 1)
    for number, value, lr in [(0, 0.95, 1e-3), (1, 0.99, 2e-3), (2, 0.98, 3e-3), (3, 0.95, 4e-3)]:
        t = trial(number, value, lr)
        t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=10)
        now.add_trial(t)
    clock = [1000.0]
    monkeypatch.setattr(closed_loop.time, "time", lambda: clock[0])
    trained: list[float] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        trained.append(config["lr"])
        return {"accuracy": 0.94}

    lines: list[str] = []
    closed_loop.rescore(now, lr_plan(), fn, 2, 2, deadline=1005.0, out=lines.append,
                        known=closed_loop.known_values([earlier]))  # fmt: skip
    # No challenger fits before the deadline; the two configs the earlier stage re-scored
    # compare on the values they hold, and the line names the best as the stage reads it back.
    assert trained == []
    assert lines[-1].startswith("  rescoring stopped: out of the stage's time"), lines
    assert lines[-1].endswith("best: #0)"), lines
    assert best_trial(optuna.load_study(study_name="now", storage=storage)).number == 0


def test_a_run_keeps_the_rescored_incumbent_over_a_challenger_flattered_by_its_seed(
    tmp_path: Path,
) -> None:
    # The refinement stage searches label smoothing; the optimizer stage trains every trial at
    # the default 0.1. On seed 0 any other value looks 0.05 better; on every other seed it is
    # 0.05 worse: the refinement stage's challengers are flattered, its incumbent is not.
    def flattered(config: dict[str, Any], report: Any) -> dict[str, Any]:
        default = config["label_smoothing"] == 0.1
        score = (0.9 if default else 0.95) if config["seed"] == 0 else (0.95 if default else 0.9)
        report(1, {"accuracy": score})
        return {"accuracy": score}

    def run(name: str, incumbent: bool) -> dict[str, Any]:
        study = tuner.load(
            {"name": name, "stages": ["optimizer", "refine"],
             "budget": {"trials": {"optimizer": 3, "refine": 4}},
             "storage": f"sqlite:///{tmp_path}/{name}.db",
             "loop": {"stagnation": False, "widen": False, "longer": False, "smooth": False,
                      "rescore": {"top": 2, "seeds": 1, "incumbent": incumbent}},
             "defaults": {"lr": 1e-3, "epochs": 1, "seed": 0, "label_smoothing": 0.1,
                          "optimizer": "adam", "momentum": 0.9, "beta1": 0.9, "beta2": 0.999,
                          "weight_decay": 1e-4, "schedule": "cosine", "warmup": 0.1}},
            objective=flattered,
        )  # fmt: skip
        tuner.run(study, check=False, progress=lambda line: None)
        return tuner.best_config(study)["config"]

    assert run("on", incumbent=True)["label_smoothing"] == 0.1
    assert run("off", incumbent=False)["label_smoothing"] != 0.1


# --- smooth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("curve", "window", "maximize", "expected"),
    [
        ([0.90, 0.99, 0.93, 0.96, 0.97, 0.97], 3, True, (0.96 + 0.97 + 0.97) / 3),  # not 0.99
        ([0.90, 0.99, 0.93, 0.96, 0.97, 0.97], 1, True, 0.99),  # window 1: the best epoch
        ([0.80, 0.90], 3, True, 0.85),  # shorter than the window: the whole curve's mean
        ([0.5, 0.2, 0.3, 0.25], 2, False, 0.25),  # a loss: the lowest mean
        ([0.9, math.nan, 0.95, 0.95, 0.96], 3, True, (0.95 + 0.95 + 0.96) / 3),
        ([0.9, math.nan, 0.95], 3, True, -math.inf),  # a diverged epoch is the worst value
        ([], 3, True, None),
    ],
)  # fmt: skip
def test_a_smoothed_peak_is_the_best_mean_of_consecutive_epochs(
    curve: list[float], window: int, maximize: bool, expected: float | None
) -> None:
    value = closed_loop.smoothed_peak(curve, window, maximize)
    assert value == (None if expected is None else pytest.approx(expected))


def test_a_steady_curve_beats_one_lucky_epoch(tmp_path: Path) -> None:
    def curves(config: dict[str, Any], report: Any) -> dict[str, Any]:
        # The incumbent's curve has one lucky epoch on its split; every other lr converges.
        lucky = math.isclose(config["lr"], 3e-3, rel_tol=1e-12)
        curve = [0.90, 0.99, 0.90, 0.90] if lucky else [0.95, 0.96, 0.96, 0.96]
        for epoch, value in enumerate(curve, 1):
            report(epoch, {"accuracy": value})
        return {"accuracy": max(curve), "best_epoch": curve.index(max(curve)) + 1}

    def best_of(smooth: int) -> optuna.trial.FrozenTrial:
        study = tuner.load(
            {"stages": ["lr"], "budget": {"trials": {"lr": 3}},
             "storage": f"sqlite:///{tmp_path}/s{smooth}.db",
             "loop": {"stagnation": False, "rescore": False, "widen": False, "smooth": smooth},
             "search_spaces": {"lr": {"schedule": None, "warmup": None}},
             "pruner": {"name": "none"}, "sampler": {"seed": 0},
             "defaults": {"lr": 3e-3, "epochs": 4, "seed": 0}},
            objective=curves,
        )  # fmt: skip
        tuner.run(study, check=False)
        found = optuna.load_study(study_name="study/lr", storage=study.storage)
        return best_trial(found)

    steady = best_of(3)
    assert steady.number != 0 and steady.value == pytest.approx(0.96)  # the best 3-epoch mean
    assert steady.user_attrs["accuracy"] == 0.96  # what the objective returned, kept
    lucky = best_of(1)  # smoothing off: the trial's value is its best epoch's
    assert lucky.number == 0 and lucky.value == pytest.approx(0.99)


# --- stagnation --------------------------------------------------------------------------------


def test_a_stage_stagnates_after_n_trials_without_a_new_best() -> None:
    plan = lr_plan(loop={"widen": True, "rescore": False, "stagnation": 3})
    # 3 is the setting; the lr stage searches 3 values, 2 trials each: 6.
    assert closed_loop.patience(plan) == 6
    assert "its last 6 finished trials" in closed_loop.stop_text(plan)
    assert closed_loop.patience(lr_plan(loop={"stagnation": 8})) == 8
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, 0.9, 1e-3))
    for i in range(1, 7):
        study.add_trial(trial(i, 0.8, 1e-3))
        assert not closed_loop.stagnated(plan, study), i  # 6 without a new best: not yet more
    study.add_trial(trial(7, 0.8, 1e-3))
    assert closed_loop.stagnated(plan, study)
    # A widening restarts the count: the stage has new ground to cover.
    study.set_user_attr(closed_loop.WIDENED, [{"from_trial": 8}])
    assert not closed_loop.stagnated(plan, study)
    off = lr_plan(loop={"widen": True, "rescore": False, "stagnation": False})
    study.set_user_attr(closed_loop.WIDENED, [])
    assert not closed_loop.stagnated(off, study)


def test_pruned_trials_count_by_the_epochs_they_trained() -> None:
    # Most trials of a stage are pruned: counting only COMPLETE ones, a stage whose best came
    # first would not stop (seen: 30 trials, 25 pruned, no new best after the third); counting
    # each as a whole trial, 24 trials pruned at epoch 3 (a quarter of 12 epochs each) ended a
    # 12-value stage after 6 trials' worth of training, with half its time left.
    plan = lr_plan(loop={"widen": True, "rescore": False, "stagnation": 3})
    assert plan.incumbent["epochs"] == 12 and closed_loop.patience(plan) == 6  # 3 values x 2
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, 0.9, 1e-3))

    def pruned(number: int, epoch: int = 3) -> optuna.trial.FrozenTrial:
        lr = FloatDistribution(3e-4, 3e-2, log=True)
        t = create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.5, epoch: 0.6},
                         params={"lr": 2e-3}, distributions={"lr": lr})  # fmt: skip
        t.number = number
        return t

    for i in range(1, 25):  # 24 trials pruned at epoch 3: 6 trials' training, not more
        study.add_trial(pruned(i))
    assert not closed_loop.stagnated(plan, study)
    study.add_trial(trial(25, 0.8, 1e-3))  # a complete one more: 7 > 6
    assert closed_loop.stagnated(plan, study)
    # Pruned late, a trial trained about as much as a complete one: 7 of them end the stage.
    late = optuna.create_study(direction="maximize")
    late.add_trial(trial(0, 0.9, 1e-3))
    for i in range(1, 7):
        late.add_trial(pruned(i, epoch=12))
    assert not closed_loop.stagnated(plan, late)
    late.add_trial(pruned(7, epoch=12))
    assert closed_loop.stagnated(plan, late)
    # A pruned trial that reported nothing did not train: it is not counted.
    fresh = optuna.create_study(direction="maximize")
    fresh.add_trial(trial(0, 0.9, 1e-3))
    for _ in range(1, 9):
        fresh.add_trial(create_trial(state=TrialState.PRUNED))
    assert not closed_loop.stagnated(plan, fresh)


def test_a_pruned_trial_gives_back_the_share_of_the_cap_it_did_not_train() -> None:
    # Seen: a stage of 1-2 s trials at its cap of 40 trials, 28 of them pruned at epoch 3 of
    # 12, long before its time; the run ended at 63% of its budget. Those 28 trained 7
    # trials' worth: the cap counts them so, as the stop rule does.
    plan = lr_plan()
    assert plan.incumbent["epochs"] == 12
    lr = FloatDistribution(3e-4, 3e-2, log=True)

    def pruned(epoch: int | None) -> optuna.trial.FrozenTrial:
        values = {} if epoch is None else {1: 0.5, epoch: 0.6}
        return create_trial(state=TrialState.PRUNED, intermediate_values=values,
                            params={"lr": 2e-3}, distributions={"lr": lr})  # fmt: skip

    trials = [trial(0, 0.9, 1e-3), *(pruned(3) for _ in range(28)), pruned(12)]
    assert closed_loop.credit(plan, trials) == pytest.approx(28 * 0.75)  # 12 of 12: none
    # One that reported nothing takes a whole place: a stage whose every trial is cut at once
    # must still end at its cap.
    assert closed_loop.credit(plan, [pruned(None), pruned(None)]) == 0.0
    assert closed_loop.credit(lr_plan(loop={**STUDY.loop, "pruned_credit": False}), trials) == 0
    # A grid stage runs its candidates, however they end.
    batch = plan_stage(STUDY, "batch_size", lambda stage: None)
    assert batch.space.grid and closed_loop.credit(batch, trials) == 0.0


def rising(config: dict[str, Any], report: Any) -> dict[str, Any]:
    """Four epochs whose metric grows with the lr: the median pruner cuts the low ones."""
    value = 0.0
    for epoch in range(1, 5):
        value = 0.5 + 0.01 * epoch + 0.05 * math.log10(config["lr"] / 3e-4)
        report(epoch, {"accuracy": value})
    return {"accuracy": value, "best_epoch": 4, "epochs_run": 4, "stop_reason": "max_epochs"}


def credit_study(tmp_path: Path, **loop: Any) -> Any:
    return tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 8}},
         "storage": f"sqlite:///{tmp_path}/c.db",
         "loop": {"stagnation": False, "widen": False, "rescore": False, **loop},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "sampler": {"seed": 0, "n_startup_trials": 3},
         "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
         "defaults": {"lr": 1e-3, "epochs": 4, "patience": 4, "seed": 0}},
        objective=rising,
    )  # fmt: skip


def test_a_stage_runs_until_its_trials_trained_its_cap_a_pruned_one_by_its_share(
    tmp_path: Path,
) -> None:
    study = credit_study(tmp_path)
    lines: list[str] = []
    tuner.run(study, stage="lr", check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    trials = found.trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.state.is_finished() for t in trials)
    weight = {t.number: (t.last_step or 0) / 4 if t in pruned else 1.0 for t in trials}
    spent = sum(weight.values())
    # More trials than the cap, and exactly as many as it takes to train 8 trials' worth.
    assert len(trials) > 8
    assert spent >= 8 > spent - weight[trials[-1].number]
    assert spent == pytest.approx(len(trials) - closed_loop.credit(study_plan(study), trials))
    shown = [line for line in lines if line.startswith("[lr ")]
    assert len(shown) == len(trials) and shown[-1].startswith(f"[lr {closed_loop.count(spent)}/8]")
    assert any("." in line.split()[1] for line in shown)  # a pruned trial's share: 2.5/8
    # status counts them so too: the budget's share taken, not the trials that ran.
    from tuner._status import render

    table = render(study, tuner.status(study)).splitlines()
    assert any(line.split()[:2] == ["lr", f"{closed_loop.count(spent)}/8"] for line in table)
    # Resumed, the stage holds its budget already and runs nothing.
    again: list[str] = []
    tuner.run(study, stage="lr", check=False, progress=again.append)
    assert len(optuna.load_study(study_name="study/lr", storage=study.storage).trials) == len(
        trials
    )
    assert any("finished trials already" in line for line in again)


def test_with_the_credit_off_every_trial_takes_a_whole_place(tmp_path: Path) -> None:
    study = credit_study(tmp_path, pruned_credit=False)
    tuner.run(study, stage="lr", check=False, progress=lambda line: None)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    assert len(found.trials) == 8
    assert any(t.state == TrialState.PRUNED for t in found.trials)


def study_plan(study: Any) -> Any:
    return plan_stage(study, "lr", lambda stage: None)


def test_a_widened_range_is_not_widened_again_for_the_same_best_value() -> None:
    # The best trial was drawn from the first range; once that range is widened, its value
    # sits inside the new one and must not widen it again (seen: the same widening twice,
    # and the same "moved" trial run twice).
    plan = lr_plan()
    best = trial(3, 0.9, 2.9e-2)
    [w] = closed_loop.edges(plan, best)
    records = [{**w.as_dict(), "from_trial": 4}]
    assert closed_loop.edges(closed_loop.widened(plan, records), best) == []


def test_a_stage_whose_values_later_stages_search_again_is_not_rescored() -> None:
    from tuner.closed_loop import provisional

    plan = lr_plan()
    # lr and schedule come back in architecture, warmup in refine: the lr stage is provisional.
    assert provisional(STUDY, plan, ("optimizer", "architecture", "refine")) == plan.space.keys
    assert provisional(STUDY, plan, ("optimizer", "architecture")) == ()  # warmup is final
    assert provisional(STUDY, plan, ()) == ()  # stage=lr alone: re-scored
    # The optimizer stage: the architecture stage searches the optimizer, its lr and the weight
    # decay again; momentum and the betas are conditional on the optimizer it picks then.
    from tuner.plan import Best

    optimizer = plan_stage(STUDY, "optimizer", lambda stage: Best(stage, 0, 0.9, CONFIG, {}))
    assert provisional(STUDY, optimizer, ("architecture",)) == ("optimizer", "lr", "weight_decay")
    assert provisional(STUDY, optimizer, ("refine",)) == ()  # refine keeps the optimizer


def test_the_loop_switches_are_checked(tmp_path: Path) -> None:
    base = {"stages": ["lr"], "defaults": {"lr": 1e-3, "epochs": 1},
            "search_spaces": {"lr": {"schedule": None, "warmup": None}}}  # fmt: skip
    assert tuner.load({**base, "loop": {"widen": False}}).loop["widen"] is False
    assert tuner.load({**base, "loop": {"smooth": False}}).loop["smooth"] == 1  # off
    assert tuner.load({**base, "loop": {"longer": False}}).loop["longer"] == 1  # off
    assert tuner.load({**base, "loop": {"longer": True}}).loop["longer"] == 2
    assert tuner.load({**base, "loop": {"longer": 3}}).loop["longer"] == 3
    assert tuner.load({**base, "loop": {"rescore": {"top": 2}}}).loop["rescore"] == {
        "top": 2, "seeds": 2, "incumbent": True, "last_seeds": 10}  # fmt: skip
    off = tuner.load({**base, "loop": {"rescore": {"incumbent": False}}}).loop["rescore"]
    assert off == {"top": 3, "seeds": 2, "incumbent": False, "last_seeds": 10}
    same = {"seeds": 3, "last_seeds": False}  # the last stage re-scores as the others do
    assert tuner.load({**base, "loop": {"rescore": same}}).loop["rescore"]["last_seeds"] == 3
    for loop, message in [
        ({"widen": "yes"}, "loop.widen must be true or false"),
        ({"rescore": {"top": 0}}, "loop.rescore.top must be a whole number of at least 1"),
        ({"stagnation": -1}, "loop.stagnation must be a whole number of at least 1"),
        ({"smooth": 0}, "loop.smooth must be a whole number of at least 1"),
        ({"smooth": 2.5}, "loop.smooth must be a whole number of at least 1"),
        ({"longer": 0}, "loop.longer must be a whole number of at least 1"),
        ({"pruned_credit": 1}, "loop.pruned_credit must be true or false"),
        ({"rescore": {"incumbent": "no"}}, "loop.rescore.incumbent must be true or false"),
        ({"rescore": {"last_seeds": 0}}, "loop.rescore.last_seeds must be a whole number"),
        ({"rescore": {"last": 4}}, "unknown key 'last'"),
        ({"widn": True}, "unknown key 'widn' (did you mean widen?)"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            tuner.load({**base, "loop": loop})


# --- the stage goes on ---------------------------------------------------------------------------


def test_a_stage_whose_best_sits_at_an_edge_widens_it_and_finds_what_lay_beyond(
    tmp_path: Path,
) -> None:
    def beyond(config: dict[str, Any], report: Any) -> dict[str, Any]:
        score = 1 - (math.log10(config["lr"]) + 1) ** 2 / 10  # peaks at lr = 0.1, above 3e-2
        report(1, {"accuracy": score})
        return {"accuracy": score}

    study = tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 6}},
         "storage": f"sqlite:///{tmp_path}/w.db",
         "loop": {"stagnation": False, "rescore": False},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "defaults": {"lr": 2.9e-2, "epochs": 1, "seed": 0}},
        objective=beyond,
    )  # fmt: skip
    lines: list[str] = []
    tuner.run(study, check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    [first, *_] = found.user_attrs[closed_loop.WIDENED]
    assert (first["key"], first["edge"]) == ("lr", "high")
    assert any(line.strip().startswith("widened lr:") for line in lines)
    assert len([t for t in found.trials if t.state == TrialState.COMPLETE]) > 6  # it went on
    assert best_trial(found).params["lr"] > 3e-2  # beyond the old edge
    row = tuner.status(study)[0]
    assert row.widened and row.widened[0].startswith("widened lr:")


# --- longer -----------------------------------------------------------------------------------


def late(number: int, best_epoch: int, epochs: int = 12, stop: str = "max_epochs", **config: Any):
    t = trial(number, 0.99, 1e-3, best_epoch=best_epoch, stop_reason=stop)
    t.user_attrs["config"] = {**t.user_attrs["config"], "epochs": epochs, **config}
    return t


@pytest.mark.parametrize(
    ("best_epoch", "stop", "factor", "asks"),
    [
        (12, "max_epochs", 2, True),  # peaked at the end of its schedule
        (10, "max_epochs", 2, True),  # in the last 25%
        (9, "max_epochs", 2, False),  # at 75%: not late
        (12, "out_of_time", 2, False),  # cut short by the deadline: its epochs were not all run
        (8, "patience", 2, False),  # early-stopped: it had peaked
        (12, "max_epochs", 1, False),  # the rule is off
    ],
)
def test_a_best_that_peaked_late_is_followed_up_with_more_epochs(
    best_epoch: int, stop: str, factor: int, asks: bool
) -> None:
    found = closed_loop.follow_up(late(3, best_epoch, stop=stop, patience=4), factor)
    assert (found is not None) == asks
    if found is not None:
        assert found.set == {"epochs": 24, "patience": 8}  # patience would cut the decay short
        assert found.line().startswith("train longer: the best trial (#3) peaked at epoch")


def test_the_time_kept_for_the_follow_up_is_its_best_trial_twice() -> None:
    import datetime as dt

    study = optuna.create_study(direction="maximize")
    t = late(0, 12)
    start = dt.datetime(2026, 1, 1)
    t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=7)
    study.add_trial(t)
    assert closed_loop.follow_up_seconds(study, 2) == pytest.approx(14.0)
    assert closed_loop.follow_up_seconds(study, 1) == 0.0  # off
    study.set_user_attr(closed_loop.LONGER, {"trial": 0})
    assert closed_loop.follow_up_seconds(study, 2) == 0.0  # run already


def growing(config: dict[str, Any], report: Any) -> dict[str, Any]:
    """A run whose metric climbs to its last epoch, and higher the longer it trains; on its
    way up, a longer run stays below a shorter one (its schedule decays later), which is
    what a pruner comparing epoch by epoch would hold against it."""
    epochs = int(config["epochs"])
    lift = 0.01 * math.log10(config["lr"] / 1e-4)  # a small lr effect, for the ranking
    best = 0.0
    for epoch in range(1, epochs + 1):
        value = 0.5 + 0.4 * epoch / epochs + 0.02 * (epochs > 4) * (epoch == epochs) + lift
        best = max(best, value)
        report(epoch, {"accuracy": value})
    return {
        "accuracy": best,
        "best_epoch": epochs,
        "epochs_run": epochs,
        "stop_reason": "max_epochs",
    }


def longer_study(tmp_path: Path, **loop: Any) -> Any:
    return tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 6}},
         "storage": f"sqlite:///{tmp_path}/l.db",
         "loop": {"stagnation": False, "widen": False, "rescore": False, "smooth": False,
                  "pruned_credit": False, **loop},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "sampler": {"seed": 0}, "pruner": {"name": "median", "n_startup_trials": 2},
         "defaults": {"lr": 3e-3, "epochs": 4, "patience": 2, "seed": 0}},
        objective=growing,
    )  # fmt: skip


def test_the_last_stage_trains_its_late_best_longer_and_the_longer_run_wins(
    tmp_path: Path,
) -> None:
    study = longer_study(tmp_path)
    lines: list[str] = []
    tuner.run(study, check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    assert len(found.trials) == 7  # its 6, and the follow-up
    follow = found.trials[-1]
    assert follow.state == TrialState.COMPLETE  # not pruned: its epochs are not the others'
    assert follow.user_attrs["config"]["epochs"] == 8
    assert follow.user_attrs["config"]["patience"] == 4
    best = best_trial(found)
    assert best.number == follow.number
    assert follow.params == found.trials[found.user_attrs[closed_loop.LONGER]["trial"]].params
    assert any(line.startswith("  train longer: the best trial") for line in lines)
    shown = "\n".join(tuner.status(study)[0].widened)
    assert f"as trial #{follow.number} with epochs=8, patience=4" in shown
    assert "the best now" in shown
    exported = tuner.best_config(study)
    assert exported["config"]["epochs"] == 8
    assert exported["provenance"]["values"]["epochs"] == f"lr#{follow.number}"


def test_a_stage_run_alone_or_with_the_rule_off_is_not_followed_up(tmp_path: Path) -> None:
    study = longer_study(tmp_path)
    tuner.run(study, stage="lr", check=False, progress=lambda line: None)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    assert len(found.trials) == 6 and closed_loop.LONGER not in found.user_attrs
    off = longer_study(tmp_path / "off", longer=False)
    (tmp_path / "off").mkdir()
    tuner.run(off, check=False, progress=lambda line: None)
    found = optuna.load_study(study_name="study/lr", storage=off.storage)
    assert len(found.trials) == 6 and closed_loop.LONGER not in found.user_attrs


def test_a_follow_up_at_the_deadline_trains_all_its_epochs_in_the_time_kept_for_it(
    tmp_path: Path,
) -> None:
    # The stage's trials run into its deadline, less the time kept for re-scoring and the
    # follow-up; the follow-up must then get that time, not stop where the others stopped.
    import time

    def timed(config: dict[str, Any], report: Any) -> dict[str, Any]:
        def slow(epoch: int, metrics: dict[str, float]) -> None:
            time.sleep(0.05)
            report(epoch, metrics)

        return growing(config, slow)

    study = tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 1000}},
         "storage": f"sqlite:///{tmp_path}/d.db",
         "loop": {"stagnation": False, "widen": False, "smooth": False},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "sampler": {"seed": 0}, "pruner": {"name": "none"},
         "defaults": {"lr": 3e-3, "epochs": 4, "patience": 2, "seed": 0}},
        objective=timed,
    )  # fmt: skip
    lines: list[str] = []
    tuner.run(study, timeout=6, check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    assert closed_loop.LONGER in found.user_attrs, lines
    follow = found.trials[found.user_attrs[closed_loop.LONGER]["number"]]
    assert follow.user_attrs["epochs_run"] == 8, follow.user_attrs  # all of them
    assert follow.user_attrs["stop_reason"] == "max_epochs"


def test_a_follow_up_on_a_fresh_seed_duels_its_best_on_the_same_seeds() -> None:
    # #0 won the stage on a lucky first run (0.995); on seed 1 it scores 0.980. Its follow-up
    # trained on seed 1 (0.985) is fresh: against #0's raw value it would lose, against #0's
    # own run on seed 1 it wins. Without the seed it trained on #0's seed: flattered alike.
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, 0.995, 1e-3))
    study.add_trial(trial(1, 0.985, 1e-3))  # the follow-up, trial #1
    longer = {"trial": 0, "best_epoch": 12, "epochs": 12, "schedule": "cosine", "number": 1}
    study.set_user_attr(closed_loop.LONGER, {**longer, "set": {"epochs": 24, "seed": 1}})
    assert best_trial(study).number == 0  # #0 not re-scored yet: nothing to compare
    study.set_user_attr(RESCORED, {"0": [0.995, 0.980]})
    assert best_trial(study).number == 1
    assert closed_loop.spread_text([0.985, 0.987], start=0).endswith("fresh 0.9860)")
    assert closed_loop.spread_text([0.985], start=0) == "0.9850 ± 0.0000 (1 seed; fresh 0.9850)"
    assert closed_loop.spread_text([0.990]) == "0.9900 (1 seed; no fresh one)"  # not compared
    study.set_user_attr(closed_loop.LONGER, {**longer, "set": {"epochs": 24}})
    assert best_trial(study).number == 0  # the same seed as #0: its first value is no fresher


def test_the_follow_up_of_a_rescored_stage_asks_for_the_next_seed() -> None:
    found = closed_loop.follow_up(late(3, 12, patience=4, seed=5), 2, fresh=True)
    assert found is not None and found.set == {"epochs": 24, "patience": 8, "seed": 6}
    assert "the two compare on fresh seeds (#3 trains on seed 6 too)" in found.line()


def lucky_growing(config: dict[str, Any], report: Any) -> dict[str, Any]:
    """``growing``, with every run on seed 0 lucky by 0.05: the stage's first runs."""
    luck = 0.05 if config["seed"] == 0 else 0.0
    result = growing(config, lambda epoch, m: report(epoch, {"accuracy": m["accuracy"] + luck}))
    return {**result, "accuracy": result["accuracy"] + luck}


def test_a_rescored_stage_follows_its_best_up_on_a_fresh_seed_and_keeps_the_longer_run(
    tmp_path: Path,
) -> None:
    study = tuner.load(
        {"stages": ["lr"], "budget": {"trials": {"lr": 5}},
         "storage": f"sqlite:///{tmp_path}/f.db",
         "loop": {"stagnation": False, "widen": False, "rescore": {"top": 2, "seeds": 2},
                  "smooth": False},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "sampler": {"seed": 0}, "pruner": {"name": "none"},
         "defaults": {"lr": 3e-3, "epochs": 4, "patience": 2, "seed": 0}},
        objective=lucky_growing,
    )  # fmt: skip
    lines: list[str] = []
    tuner.run(study, check=False, progress=lines.append)
    found = optuna.load_study(study_name="study/lr", storage=study.storage)
    stored = found.user_attrs[closed_loop.LONGER]
    follow, best = found.trials[stored["number"]], found.trials[stored["trial"]]
    assert follow.user_attrs["config"]["seed"] == 1 and follow.user_attrs["config"]["epochs"] == 8
    assert follow.value < best.value  # the unlucky seed: ranked by value, it would lose
    scored = found.user_attrs[RESCORED]
    assert len(scored[str(best.number)]) == 3  # seeds 0, 1, 2
    assert len(scored[str(follow.number)]) == 2  # seeds 1, 2: both fresh
    assert best_trial(found).number == follow.number
    shown = "\n".join(tuner.status(study)[0].widened)
    assert "the two compare on fresh seeds" in shown and "the best now" in shown, shown
    exported = tuner.best_config(study)
    assert exported["config"]["seed"] == 1 and exported["config"]["epochs"] == 8
    assert exported["provenance"]["values"]["seed"] == f"lr#{follow.number}"
