"""Input written by a careless user or an attacker (issue 15): a search-space override that
would be merged away, an empty dashboard host, and the like. Each is one line and exit
status 2, or it does what the user wrote, never more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

import search_spaces
from tuner import yamlio
from tuner.cli import main
from tuner.config import STUDIES_DIR, load_study
from tuner.plan import load_space


def write_study(folder: Path, name: str = "study.yaml", **changes: Any) -> Path:
    """digits_mlp's study file with some top-level keys replaced."""
    data = yamlio.load(STUDIES_DIR / "digits_mlp.yaml")
    data.update(changes)
    path = folder / name
    path.write_text(yamlio.dumps(data))
    return path


def one_line(capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    return err


# --- search spaces: an override replaces the built-in parameter --------------------------


def test_choices_over_the_files_powers_of_two_replace_them(tmp_path: Path) -> None:
    spaces = {"batch_size": {"batch_size": {"choices": [32, 64]}}}
    study = load_study(str(write_study(tmp_path, search_spaces=spaces)))
    space = load_space(study, "batch_size")
    assert [p.choices for p in space.params] == [(32, 64)]
    assert {p["batch_size"] for p in search_spaces.grid_points(space, study.config)} == {32, 64}
    sampled = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(30):
        trial = sampled.ask()
        drawn.add(search_spaces.suggest(trial, space, study.config)["batch_size"])
        sampled.tell(trial, 0.0)
    assert drawn == {32, 64}


def test_a_parameter_of_two_kinds_is_refused(tmp_path: Path) -> None:
    with pytest.raises(search_spaces.SearchSpaceError, match="names choices, powers_of_two"):
        search_spaces.load("lr", {"warm": {"choices": [1], "powers_of_two": [2, 4]}})


# --- dashboard -------------------------------------------------------------------------------


def test_an_empty_dashboard_host_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before the storage is looked at (the one here does not exist), and before a
    # server is bound: an empty host would listen on every address.
    url = f"sqlite:///{tmp_path}/none.db"
    assert main(["dashboard", "study=digits_mlp", f"storage={url}", "host="]) == 2
    one_line(capsys, "host=: an empty host listens on every address (0.0.0.0)")
    assert not (tmp_path / "none.db").exists()
