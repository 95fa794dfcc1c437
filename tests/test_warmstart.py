"""Warm start: ``start=best.yaml`` or ``start=STUDY`` makes a study's incumbent (the first
trial of every stage) the start's values, with their provenance; a key the study lacks is
refused before anything is written."""

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.tiny_study import STAGES, Tiny, run_tiny
from tuner import yamlio
from tuner.cli import main
from tuner.config import flatten
from tuner.results import best_trial


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return run_tiny(tmp_path_factory.mktemp("warm"), trials=10)


def in_folder(tiny: Tiny, args: list[str]) -> int:
    """The command line in the tiny study's folder (where its objective module is)."""
    path = list(sys.path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny.folder)
        status = main(args)
    sys.path[:] = path
    return status


def new_study(tiny: Tiny, name: str) -> Path:
    """A copy of the tiny study under another name (its stages are new Optuna studies)."""
    path = tiny.folder / f"{name}.yaml"
    path.write_text(tiny.study_file.read_text().replace("name: tiny", f"name: {name}"))
    return path


def first_trials(url: str, name: str) -> dict[str, dict[str, Any]]:
    """Each stage's first trial's config, flat."""
    out = {}
    for stage in STAGES:
        study = optuna.load_study(study_name=f"{name}/{stage}", storage=url)
        out[stage] = flatten(study.trials[0].user_attrs["config"])
    return out


def test_start_file_is_every_stages_incumbent_with_its_provenance(tiny: Tiny) -> None:
    best = tiny.folder / "best.yaml"
    assert in_folder(tiny, ["export", *tiny.args, f"out={best}"]) == 0
    exported = yamlio.load(best)
    tuned = exported["provenance"]["values"]  # the keys some stage of tiny found
    start = flatten(exported["config"])
    study = new_study(tiny, "warm")
    url = f"sqlite:///{tiny.folder}/warm.db"
    args = ["run", f"study={study}", f"storage={url}", f"start={best}", "trials=12"]
    assert in_folder(tiny, [*args, "timeout=60"]) == 0
    first = first_trials(url, "warm")
    assert {"lr", "batch_size", "optimizer", "model.width", "model.dropout"} <= set(tuned)
    retuned: set[str] = set()  # keys an earlier stage of this study searched again
    for stage in STAGES:
        for key in set(tuned) - retuned:  # the start's, until a stage finds better
            assert first[stage][key] == start[key], (stage, key)
        found = optuna.load_study(study_name=f"warm/{stage}", storage=url)
        retuned |= set(found.user_attrs["searches"])
    assert first["architecture"]["model.width"] == start["model.width"]
    # The stages still search: later trials draw other values.
    lr = optuna.load_study(study_name="warm/lr", storage=url)
    assert {t.params["lr"] for t in lr.trials} != {start["lr"]}
    # Provenance: the first stage's lineage says each start value's file, study and trial.
    size = optuna.load_study(study_name="warm/batch_size", storage=url)
    lineage = size.user_attrs["lineage"]
    arch = exported["provenance"]["stages"]["architecture"]
    assert lineage["model.width"]["origin"] == f"{best} ({arch['study']}#{arch['trial']})"
    assert lineage["model.width"]["origin"].startswith(f"{best} (tiny/architecture#")
    out = tiny.folder / "warm_best.yaml"
    assert in_folder(tiny, ["export", f"study={study}", f"storage={url}", f"out={out}"]) == 0
    again = yamlio.load(out)["provenance"]
    assert again["start"]["lr"].startswith(f"{best} (tiny/")
    assert set(again["start"]) == set(tuned)


def test_start_study_begins_from_another_studys_best_in_the_same_storage(tiny: Tiny) -> None:
    # The other study's best: its last stage's (refine), as its export would say.
    best = best_trial(optuna.load_study(study_name="tiny/refine", storage=tiny.url))
    assert best is not None
    config = flatten(best.user_attrs["config"])
    study = new_study(tiny, "fromstudy")
    args = ["run", f"study={study}", f"storage={tiny.url}", "start=tiny", "trials=8"]
    assert in_folder(tiny, [*args, "stage=batch_size"]) == 0
    first = optuna.load_study(study_name="fromstudy/batch_size", storage=tiny.url).trials[0]
    got = flatten(first.user_attrs["config"])
    for key in ("lr", "batch_size", "optimizer", "model.width"):
        assert got[key] == config[key], key
    lineage = optuna.load_study(study_name="fromstudy/batch_size", storage=tiny.url).user_attrs
    origin = lineage["lineage"]["model.width"]["origin"]
    # model.width is the architecture stage's: the refine stage fixed it from there.
    source = optuna.load_study(study_name="tiny/refine", storage=tiny.url).user_attrs["lineage"]
    width = source["model.width"]
    assert origin == f"study tiny (tiny/{width['stage']}#{width['trial']})"
    # The start holds for later runs of the study, without start= again.
    later = ["run", f"study={study}", f"storage={tiny.url}", "stage=lr", "trials=2"]
    assert in_folder(tiny, later) == 0
    lr = optuna.load_study(study_name="fromstudy/lr", storage=tiny.url)
    assert flatten(lr.trials[0].user_attrs["config"])["model.width"] == config["model.width"]
    assert lr.user_attrs["lineage"]["model.width"]["origin"] == origin


def test_a_value_set_by_hand_wins_over_the_start(tiny: Tiny) -> None:
    study = new_study(tiny, "hand")
    args = ["run", f"study={study}", f"storage={tiny.url}", "start=tiny", "stage=batch_size"]
    assert in_folder(tiny, [*args, "model.width=8", "trials=1"]) == 0
    stage = optuna.load_study(study_name="hand/batch_size", storage=tiny.url)
    assert stage.trials[0].user_attrs["config"]["model"]["width"] == 8
    assert "model.width" not in stage.user_attrs["lineage"]  # not the start's
    assert "origin" in stage.user_attrs["lineage"]["model.depth"]  # the start's


@pytest.mark.parametrize(
    ("start", "message"),
    [
        ("bogus.yaml", "start=bogus.yaml: no such file"),
        ("nosuch", "start=nosuch: no study nosuch in"),
        ("extra.yaml", "start=extra.yaml: key model.colour is not in study miss"),
        ("plain.yaml", "start=plain.yaml: not an exported config"),
    ],
)
def test_a_start_that_does_not_fit_is_one_line_and_writes_nothing(
    tiny: Tiny, capsys: pytest.CaptureFixture[str], start: str, message: str
) -> None:
    (tiny.folder / "extra.yaml").write_text("config: {lr: 0.01, model: {colour: red}}\n")
    (tiny.folder / "plain.yaml").write_text("lr: 0.01\n")
    study = new_study(tiny, "miss")
    url = f"sqlite:///{tiny.folder}/miss.db"
    args = ["run", f"study={study}", f"storage={url}", f"start={start}"]
    assert in_folder(tiny, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1 and message in err, err
    assert not (tiny.folder / "miss.db").exists()
