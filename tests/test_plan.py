"""The stage plan: carry-over of the best values, lineage, hand-fixed values, refusal."""

import pytest

from tuner.config import apply_overrides, load_study
from tuner.errors import StageRefused
from tuner.plan import Best, Source, plan_stage, stale_keys

STUDY = load_study()


def best(stage: str, number: int, value: float, lineage=None, **changes) -> Best:
    config = STUDY.config
    for key, v in changes.items():
        node = config
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = v
    return Best(stage, number, value, config, lineage or {})


def bests(*items: Best):
    table = {b.stage: b for b in items}
    return lambda stage: table.get(stage)


def test_first_stage_fixes_nothing_and_starts_from_the_defaults() -> None:
    plan = plan_stage(STUDY, "batch_size", bests())
    assert plan.fixed == {} and plan.lineage == {}
    # The batch stage trains on a time budget: the stage's own setting is in the incumbent.
    assert plan.incumbent["time_budget"] == 3.0
    assert plan.incumbent["batch_size"] == 64


def test_a_stage_fixes_the_best_values_of_the_stage_before() -> None:
    plan = plan_stage(STUDY, "lr", bests(best("batch_size", 3, 0.9, batch_size=32)))
    assert plan.fixed == {"batch_size": 32}
    assert plan.lineage["batch_size"] == Source("batch_size", 3, 0.9)
    assert plan.incumbent["batch_size"] == 32
    # Values a stage sets for itself do not leak into the next stage.
    assert plan.incumbent["time_budget"] is None


def test_lineage_reaches_back_through_the_stages() -> None:
    lr = best("lr", 7, 0.98, {"batch_size": Source("batch_size", 3, 0.9)},
              batch_size=32, lr=0.01, schedule="cosine")  # fmt: skip
    plan = plan_stage(STUDY, "optimizer", bests(best("batch_size", 3, 0.9, batch_size=32), lr))
    assert plan.fixed["lr"] == 0.01 and plan.fixed["schedule"] == "cosine"
    assert plan.lineage["lr"].label == "lr#7"
    # batch_size came into lr's best from the batch stage; its lineage says so.
    assert plan.lineage["batch_size"].label == "batch_size#3"


def test_the_latest_searcher_of_a_key_is_its_source() -> None:
    # lr is tuned in the lr stage, and again (nuisance) in the optimizer stage.
    opt = best("optimizer", 4, 0.99, {}, lr=0.05, optimizer="sgd")
    plan = plan_stage(STUDY, "architecture", bests(opt, best("lr", 7, 0.98, lr=0.01)))
    assert plan.fixed["lr"] == 0.05
    assert plan.lineage["lr"].label == "optimizer#4"


def test_a_stage_without_an_earlier_result_refuses_naming_the_command() -> None:
    with pytest.raises(StageRefused) as info:
        plan_stage(STUDY, "optimizer", bests(best("batch_size", 0, 0.9)))
    message = str(info.value)
    assert "stage lr, which has no finished trial" in message
    assert "`python -m tuner run stage=lr`" in message
    assert "\n" not in message  # one line


def test_the_refusal_names_the_earliest_missing_stage() -> None:
    with pytest.raises(StageRefused, match="from stage batch_size"):
        plan_stage(STUDY, "architecture", bests())


def test_values_set_by_hand_replace_a_missing_stage() -> None:
    study = apply_overrides(STUDY, {"batch_size": "128"}, {}).study
    plan = plan_stage(study, "lr", bests())
    assert plan.fixed == {"batch_size": 128}
    assert plan.lineage["batch_size"].label == "set by hand"


def test_a_key_set_by_hand_is_not_searched() -> None:
    study = apply_overrides(STUDY, {"schedule": "cosine", "batch_size": "32"}, {}).study
    plan = plan_stage(study, "lr", bests())
    assert plan.space.keys == ("lr", "warmup")
    assert plan.incumbent["schedule"] == "cosine"


def test_stale_keys_compare_the_stored_lineage() -> None:
    plan = plan_stage(STUDY, "lr", bests(best("batch_size", 3, 0.9, batch_size=32)))
    same = {"batch_size": {"stage": "batch_size", "trial": 3, "value": 0.9}}
    moved = {"batch_size": {"stage": "batch_size", "trial": 1, "value": 0.8}}
    assert stale_keys(plan, same) == []
    assert stale_keys(plan, moved) == ["batch_size"]


def test_the_architecture_stage_probes_each_normalization_on_the_incumbent(tmp_path) -> None:
    # The incumbent is the first trial; then the same config with each other normalization,
    # before the sampler draws: at random lr and optimizer values a normalized net can look
    # worse than a tuned plain one, and TPE would stop looking (the default study's incumbent
    # has batch norm; a plain start's has none, and gets batch, group and layer).
    import optuna

    from tuner import storage as storages
    from tuner.stage import Budget, start_stage

    opt = best("optimizer", 4, 0.99, {}, optimizer="adam", lr=0.01)
    plan = plan_stage(STUDY, "architecture", bests(opt))
    storage = storages.open_storage(f"sqlite:///{tmp_path}/p.db")
    start_stage(plan, storage, Budget(10, None), out=lambda line: None)
    study = optuna.load_study(study_name=plan.name, storage=storage)
    queued = [t.system_attrs["fixed_params"] for t in study.trials]
    assert [q["model.norm"] for q in queued] == ["batch", "group", "layer", "none"]
    for q in queued[1:]:  # nothing else changed: the incumbent's values
        assert {k: v for k, v in q.items() if k != "model.norm"} == {
            k: v for k, v in queued[0].items() if k != "model.norm"
        }
    assert queued[0]["lr[adam]"] == pytest.approx(0.01)


def test_the_samplers_random_start_comes_after_the_enqueued_trials() -> None:
    # The architecture stage enqueues the incumbent and three probes; TPE counts finished
    # trials, so with 5 random ones (the study's n_startup_trials) it would model 12 values
    # after one draw, from four configs that differ in the normalization alone.
    from tuner.samplers import make_sampler
    from tuner.stage import first_trials

    opt = best("optimizer", 4, 0.99, {}, optimizer="adam", lr=0.01)
    plan = plan_stage(STUDY, "architecture", bests(opt))
    assert len(first_trials(plan)) == 4 and STUDY.sampler["n_startup_trials"] == 5
    sampler = make_sampler(STUDY, 0, queued=len(first_trials(plan)))
    assert sampler._n_startup_trials == 9  # type: ignore[attr-defined]
    race = plan_stage(STUDY, "batch_size", bests())
    assert first_trials(race) == []  # a grid stage queues its own points
