"""The shipped study files: a grid stage's budget holds its whole grid, and a study file
whose grid is larger than its budget is refused in one line."""

from pathlib import Path

import pytest

import search_spaces
from tuner.cli import main
from tuner.config import load_study

STUDIES = sorted(p.stem for p in (Path(__file__).parent.parent / "studies").glob("*.yaml"))


@pytest.mark.parametrize("name", STUDIES)
def test_every_batch_size_of_a_study_is_tried(name: str) -> None:
    study = load_study(name)
    if "batch_size" not in study.stages:
        return
    space = search_spaces.load("batch_size", study.spaces.get("batch_size"))
    points = search_spaces.grid_points(space, study.config)
    assert len(points) == study.trials["batch_size"]  # one trial per size, no size left out


def test_a_grid_larger_than_its_budget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (Path(__file__).parent.parent / "studies" / "digits_mlp.yaml").read_text()
    text = text.replace("search_spaces:", "search_spaces:\n  batch_size:\n"
                        "    batch_size: {powers_of_two: [16, 256]}", 1)  # fmt: skip
    (tmp_path / "five.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "study=five.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "budget.trials.batch_size is 4, but stage batch_size tries every point" in err
    assert "5 of them (batch_size: 16, 32, 64, 128, 256)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.yaml"]  # nothing written
