"""Study files and key=value overrides: strict, typed, and YAML 1.2 floats."""

from pathlib import Path

import pytest

from tuner import yamlio
from tuner.coerce import parse_pairs
from tuner.config import apply_overrides, load_study
from tuner.errors import UserError
from tuner.nested import flatten, get_path, merged

RUN_OPTIONS = {"stage": str, "trials": int, "timeout": (float, int), "restart": bool}


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 0.001), ("3.0e-4", 0.0003), ("1E5", 100000.0), ("-2e-2", -0.02), ("64", 64),
     ("true", True), ("null", None), ("adamw", "adamw"), ("[16, 32]", [16, 32])],
)  # fmt: skip
def test_parse_value_reads_yaml_1_2_numbers(text: str, value: object) -> None:
    # PyYAML alone reads "1e-3" as a string; ours reads it as the float a user means.
    assert yamlio.parse_value(text) == value
    assert type(yamlio.parse_value(text)) is type(value)


def test_study_files_read_exponent_floats() -> None:
    # A study file may write lr: 1e-3 as well.
    assert yamlio.loads("lr: 1e-3\nwd: 5e-2\n") == {"lr": 0.001, "wd": 0.05}


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndefaults: {a: 1\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+: malformed YAML"):
        load_study(str(bad))


def test_default_study_loads_with_the_four_stages_and_the_refinement() -> None:
    study = load_study()
    assert study.stages == ("batch_size", "lr", "optimizer", "architecture", "refine")
    assert study.name == "mnist1d_cnn"
    assert study.config["metric"] == "accuracy"  # the objective learns what to early-stop on


def test_unknown_study_suggests_the_close_one() -> None:
    with pytest.raises(UserError, match="did you mean mnist1d_cnn"):
        load_study("mnist1d_cn")


def test_missing_study_file_is_one_line() -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_study("nowhere/study.yaml")


def test_overrides_are_typed_like_the_defaults() -> None:
    study = load_study()
    resolved = apply_overrides(study, parse_pairs(["lr=1e-3", "batch_size=32", "trials=5"]),
                               RUN_OPTIONS)  # fmt: skip
    assert resolved.options == {"trials": 5}
    assert resolved.study.overrides == {"lr": 0.001, "batch_size": 32}
    assert resolved.study.config["lr"] == 0.001


def test_an_int_widens_to_a_float_key() -> None:
    resolved = apply_overrides(load_study(), {"lr": "1"}, RUN_OPTIONS)
    # lr=1 is the float 1.0, not a type error.
    assert resolved.study.config["lr"] == 1.0
    assert isinstance(resolved.study.config["lr"], float)


def test_nested_keys_override_by_dotted_path() -> None:
    resolved = apply_overrides(load_study(), {"model.width": "64"}, RUN_OPTIONS)
    assert get_path(resolved.study.config, "model.width") == 64


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (("lr", "abc"), "lr=abc: lr must be a number"),
        (("batch_size", "2.5"), "batch_size must be an integer"),
        (("trials", "many"), "trials must be an integer"),
        (("restart", "maybe"), "restart must be true or false"),
        (("lrr", "1"), r"Unknown config key: lrr \(did you mean lr\?\)"),
        (("width", "64"), "did you mean model.width?"),
        (("pruner.name", "sometimes"), "pruner.name must be one of"),
        (("pruner.compare_to", "enqueued"), "pruner.compare_to must be sampled .* or all"),
        (("direction", "up"), "direction must be maximize or minimize"),
    ],
)
def test_bad_overrides_are_one_clear_line(pair: tuple[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        apply_overrides(load_study(), dict([pair]), RUN_OPTIONS)
    assert "\n" not in str(info.value)


def test_arguments_must_be_pairs_and_unique() -> None:
    with pytest.raises(UserError, match="key=value"):
        parse_pairs(["lr"])
    with pytest.raises(UserError, match="given twice"):
        parse_pairs(["lr=1", "lr=2"])


def test_merged_layers_flat_and_nested_values_without_touching_the_base() -> None:
    base = {"a": 1, "m": {"w": 1, "d": 2}}
    out = merged(base, {"m.w": 5}, {"m": {"d": 7}})
    assert out == {"a": 1, "m": {"w": 5, "d": 7}}
    assert base == {"a": 1, "m": {"w": 1, "d": 2}}  # the base is not changed
    assert flatten(out) == {"a": 1, "m.w": 5, "m.d": 7}
