"""tuner's types reach its users: the package ships py.typed (PEP 561), and the types its
public functions return are public names of ``tuner``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import tuner

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_ships_py_typed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "tuner" in setuptools["packages"]
    assert "py.typed" in setuptools["package-data"]["tuner"]
    assert (ROOT / "tuner" / "py.typed").is_file()


def test_what_status_run_and_check_return_is_exported() -> None:
    names = {name: getattr(tuner, name) for name in ("StageStatus", "Check")}
    assert {"StageStatus", "Check"} <= set(tuner.__all__)
    assert typing.get_type_hints(tuner.status, localns=names)["return"] == list[tuner.StageStatus]
    assert typing.get_type_hints(tuner.check, localns=names)["return"] == list[tuner.Check]
    stages = typing.get_type_hints(tuner.RunResult, localns=names)["stages"]
    assert stages == list[tuner.StageStatus]


def test_the_result_types_load_on_first_use_only() -> None:
    # They live in modules that load Optuna and torch; ``import tuner`` loads neither.
    code = (
        "import sys, tuner; before = 'optuna' in sys.modules or 'torch' in sys.modules;"
        " tuner.StageStatus, tuner.Check; print(before, 'optuna' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
