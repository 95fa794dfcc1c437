"""pyproject.toml declares what the code imports, and pins Optuna to what the suite runs on
(tuner.rows and tuner.retry use Optuna's private tables, which may change in any minor
version)."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import optuna
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
OWN = {"tuner", "objectives", "search_spaces", "studies"}


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(text) for text in project["dependencies"]]
    return {metadata.distribution(r.name).metadata["Name"].lower(): r for r in reqs}


def imported_top_levels() -> set[str]:
    names: set[str] = set()
    for folder in OWN - {"studies"}:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names)


def test_every_imported_package_is_declared() -> None:
    declared = requirements()
    by_module = metadata.packages_distributions()
    for module in sorted(imported_top_levels()):
        dists = {d.lower() for d in by_module.get(module, [])}
        assert dists & set(declared), f"{module} is imported but no dependency provides it"


def test_the_optuna_pin_admits_the_tested_version_only() -> None:
    pin = requirements()["optuna"].specifier
    tested = Version(optuna.__version__)
    assert tested in pin
    assert Version(f"{tested.major}.{tested.minor + 1}") not in pin  # the next minor: untested
    assert Version(f"{tested.major}.{tested.minor}") in pin
    assert Version(f"{tested.major - 1}.9") not in pin  # the major before: untested
