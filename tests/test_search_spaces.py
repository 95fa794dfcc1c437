"""Search spaces are data: the loader turns them into suggestions, checked on load."""

from pathlib import Path

import optuna
import pytest

import search_spaces as ss
from tuner.config import load_study

INCUMBENT = load_study().config


@pytest.mark.parametrize("stage", ["batch_size", "lr", "optimizer", "architecture", "refine"])
def test_every_stage_file_loads_and_its_keys_exist_in_the_default_config(stage: str) -> None:
    space = ss.load(stage)
    assert space.params
    for key in space.keys:
        ss._space._lookup(INCUMBENT, key)  # raises if the config has no such key


def test_every_parameter_in_the_stage_files_is_commented() -> None:
    # STYLE: a comment on every parameter says why its range is what it is.
    for path in Path(ss.__file__).parent.glob("*.yaml"):
        blocks: dict[str, list[str]] = {}
        in_params = False
        for line in path.read_text().splitlines():
            if not line.startswith(" "):
                in_params = line.startswith("params:")
            elif in_params and line.startswith("  ") and not line.startswith("   "):
                blocks[line.strip()] = [line]
            elif in_params and blocks:
                blocks[list(blocks)[-1]].append(line)
        assert blocks, path.name
        for name, lines in blocks.items():
            assert any("#" in line for line in lines), f"{path.name}: {name} has no comment"


def test_fixed_trial_draws_config_keys_from_optuna_names() -> None:
    space = ss.load("optimizer")
    trial = optuna.trial.FixedTrial(
        {"optimizer": "sgd", "lr[sgd]": 0.05, "momentum[sgd]": 0.95, "weight_decay": 1e-3}
    )
    # Conditional parameters have distinct Optuna names but write the plain config key.
    assert ss.suggest(trial, space, INCUMBENT) == {
        "optimizer": "sgd", "lr": 0.05, "momentum": 0.95, "weight_decay": 1e-3,
    }  # fmt: skip


def test_conditional_parameters_only_exist_for_their_branch() -> None:
    space = ss.load("optimizer")
    adam = ss.params_of(space, {**INCUMBENT, "optimizer": "adam"})
    assert "beta1[adam]" in adam and not any(k.startswith("momentum") for k in adam)
    sgd = ss.params_of(space, {**INCUMBENT, "optimizer": "sgd"})
    assert "momentum[sgd]" in sgd and not any(k.startswith("beta") for k in sgd)


@pytest.mark.parametrize(
    ("optimizer", "low", "high"),
    [("adamw", 0.0003, 0.03), ("adam", 0.0003, 0.03), ("sgd", 0.003, 0.3),
     ("rmsprop", 0.00009, 0.009)],
)  # fmt: skip
def test_nuisance_lr_is_narrowed_around_the_incumbent_per_optimizer(
    optimizer: str, low: float, high: float
) -> None:
    # The incumbent (adamw, lr 3e-3) centres each optimizer's range by its scale, x10 wide.
    param = next(p for p in ss.load("optimizer").params if p.key == "lr")
    dist = param.distribution({**INCUMBENT, "optimizer": optimizer}, INCUMBENT)
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log
    assert dist.low == pytest.approx(low) and dist.high == pytest.approx(high)
    assert param.name({"optimizer": optimizer}) == f"lr[{optimizer}]"


def test_architecture_lr_range_is_wide_enough_to_move_and_refine_narrower() -> None:
    # Normalization alone moves the best lr by about 10x: the architecture stage re-tunes it
    # as widely as the optimizer stage; the refinement after it, narrower.
    param = next(p for p in ss.load("architecture").params if p.key == "lr")
    dist = param.distribution(INCUMBENT, INCUMBENT)
    assert dist.low == pytest.approx(0.0003) and dist.high == pytest.approx(0.03)
    param = next(p for p in ss.load("refine").params if p.key == "lr")
    dist = param.distribution(INCUMBENT, INCUMBENT)
    assert dist.low == pytest.approx(0.00075) and dist.high == pytest.approx(0.012)


def test_the_architecture_stage_re_tunes_the_optimizer_and_its_nuisance_knobs() -> None:
    # The optimizer stage chose for the start's net; a normalized or wider net may train best
    # with another optimizer, at that optimizer's own lr, and another weight decay.
    space = ss.load("architecture")
    keys = space.keys
    assert {"optimizer", "lr", "weight_decay", "schedule", "label_smoothing"} <= set(keys)
    assert keys.index("optimizer") < keys.index("lr")  # lr[<optimizer>] reads the draw
    lr = next(p for p in space.params if p.key == "lr")
    dist = lr.distribution({**INCUMBENT, "optimizer": "sgd"}, INCUMBENT)
    # adamw at 3e-3 is the incumbent: SGD's lr is centred 10x higher, as in the optimizer stage
    assert dist.low == pytest.approx(0.003) and dist.high == pytest.approx(0.3)
    assert lr.name({"optimizer": "sgd"}) == "lr[sgd]"


def test_probes_are_the_incumbent_with_each_other_choice_of_a_probed_parameter() -> None:
    space = ss.load("architecture")
    assert [p.key for p in space.params if p.probe] == ["model.norm"]
    assert ss.probes(space, INCUMBENT) == [  # the default study's incumbent: batch norm
        {"model.norm": "group"}, {"model.norm": "layer"}, {"model.norm": "none"}]  # fmt: skip
    with pytest.raises(ss.SearchSpaceError, match="probe is true or false, and for choices"):
        ss.load("lr", {"lr": {"probe": True}})


def test_the_incumbent_lies_inside_every_range() -> None:
    # Enqueuing the incumbent must not hit a value outside its stage's distributions.
    for stage in ("lr", "optimizer", "architecture"):
        space = ss.load(stage)
        for name, value in ss.params_of(space, INCUMBENT).items():
            param = next(p for p in space.params if p.name(INCUMBENT) == name)
            dist = param.distribution(INCUMBENT, INCUMBENT)
            assert dist._contains(dist.to_internal_repr(value)), (stage, name, value)


def test_grid_stage_lists_powers_of_two_incumbent_first() -> None:
    space = ss.load("batch_size")
    points = ss.grid_points(space, INCUMBENT)
    assert [p["batch_size"] for p in points] == [64, 32, 128, 256]
    assert space.settings == {"time_budget": 3.0}


def test_study_changes_merge_replace_and_drop_params() -> None:
    space = ss.load("architecture", {
        "model.width": {"choices": [64, 128]},  # replaces the kind
        "model.depth": {"high": 3},  # merges into the range
        "model.kernel_size": None,  # drops the parameter
        "model.extra": {"low": 1, "high": 2},  # adds one
    })  # fmt: skip
    params = {p.key: p for p in space.params}
    assert params["model.width"].choices == (64, 128)
    assert (params["model.depth"].low, params["model.depth"].high) == (2, 3)
    assert "model.kernel_size" not in params
    assert params["model.extra"].integer


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"low": 1.0, "high": 0.1}, "low must be at most high"),
        ({"low": 0.0, "high": 1.0, "log": True}, "a log range needs low > 0"),
        ({"choices": []}, "choices must be a non-empty list"),
        ({"low": "a", "high": 1}, "low must be a number"),
        ({"around": 0.5}, "around must be a factor above 1"),
        ({"powers_of_two": [3, 64]}, "powers_of_two takes"),
        ({"low": 1, "high": 2, "colour": "red"}, "unknown fields"),
    ],
)
def test_bad_spaces_are_refused_with_the_parameter_named(spec: dict, message: str) -> None:
    with pytest.raises(ss.SearchSpaceError, match=message) as info:
        ss.load("lr", {"lr": spec})
    assert "lr.lr" in str(info.value)


def test_suggest_with_a_real_study_stays_inside_the_ranges() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = ss.load("lr")
    for _ in range(20):
        drawn = ss.suggest(study.ask(), space, INCUMBENT)
        assert 3e-4 <= drawn["lr"] <= 3e-2
        assert drawn["schedule"] in ("constant", "cosine", "onecycle")
        assert 0.0 <= drawn["warmup"] <= 0.4
