"""Input written by a careless user or an attacker (issue 15): a report or a terminal line
built from a payload, a crafted data file, a file that is no study file, a search-space
override that would be merged away, an empty dashboard host, and the like. Each is one line
and exit status 2, or it does what the user wrote, never more; no payload runs."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import search_spaces
from tests import fake_data
from tuner import notes, yamlio
from tuner import storage as storages
from tuner.cli import main
from tuner.config import STUDIES_DIR, apply_overrides, load_study, merged
from tuner.plan import load_space
from tuner.text import printable


def write_study(folder: Path, filename: str = "study.yaml", **changes: Any) -> Path:
    """digits_mlp's study file with some top-level keys replaced."""
    data = yamlio.load(STUDIES_DIR / "digits_mlp.yaml")
    data.update(changes)
    path = folder / filename
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


# --- a file that is no study file: its lines are not quoted -----------------------------

SHADOW = "root:$6$s3cretSalt$hashhashhash:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SHADOW, "not a study file (it has none of the keys budget, defaults,"),
        ("token: s3cret-api-token\n", "not a study file"),
        (f"name: x\n{SHADOW}", "a key that is not a name; the keys are budget, defaults,"),
        ("a: *s3cretalias\n", "line 1: malformed YAML: found undefined alias (text left out)"),
    ],
    ids=["shadow", "other yaml", "a study key and a foreign line", "yaml error"],
)
def test_a_file_that_is_no_study_file_is_not_quoted(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shadow"
    path.write_text(text)
    assert main(["check", f"study={path}"]) == 2
    err = one_line(capsys, f"tuner: {path}", message)
    assert "s3cret" not in err and "20228" not in err


# --- storage URLs: every password masked; the URL from the environment -------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://bob@db/x?password=s3cret", "postgresql://bob@db/x?password=***"),
        ("postgresql://db/x?sslmode=require&PASSWORD=s3cret&user=bob",
         "postgresql://db/x?sslmode=require&PASSWORD=***&user=bob"),
        ("postgresql://bob:s3 cret@db:5432/x", "postgresql://bob:***@db:5432/x"),
        ("Cannot open storage postgresql://bob:s3 cret@db/x: refused",
         "Cannot open storage postgresql://bob:***@db/x: refused"),
        ("postgresql://bob:s3@cret@db/x", "postgresql://bob:***@db/x"),
    ],
)  # fmt: skip
def test_every_form_of_password_is_masked(url: str, masked: str) -> None:
    assert storages.mask(url) == masked


def test_the_storage_url_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    env, given = f"sqlite:///{tmp_path}/env.db", f"sqlite:///{tmp_path}/given.db"
    monkeypatch.setenv("TUNER_STORAGE", env)
    assert load_study("digits_mlp").storage == env  # over the study file's
    assert main(["status", "study=digits_mlp"]) == 2
    one_line(capsys, f"No storage at {env}:")
    assert main(["status", "study=digits_mlp", f"storage={given}"]) == 2
    one_line(capsys, f"No storage at {given}:")  # storage= wins over the environment
    monkeypatch.setenv("TUNER_STORAGE", "")
    assert load_study("digits_mlp").storage == "sqlite:///tuner.db"  # empty: the file's


# --- terminal escapes: a user's string cannot drive the terminal ------------------------

ESC = "\x1b[2J\x1b]0;owned\x07\u202e"  # clear the screen, retitle the window, flip the text


def test_status_escapes_a_study_named_with_escape_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, name=f"evil{ESC}")
    study = load_study(str(path))
    url = f"sqlite:///{tmp_path}/t.db"
    stage = optuna.create_study(
        study_name=study.stage_name("batch_size"), storage=url, direction="maximize"
    )
    stage.add_trial(optuna.trial.create_trial(
        value=0.5, params={"batch_size": f"64{ESC}"},
        distributions={"batch_size": CategoricalDistribution([f"64{ESC}"])},
        user_attrs={"config": {}},  # what makes it a stage's best trial
    ))  # fmt: skip
    assert main(["status", f"study={path}", f"storage={url}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "study evil\\x1b[2J\\x1b]0;owned\\x07\\u202e (" in out
    assert "batch_size=64\\x1b[2J" in out


def test_an_error_escapes_the_value_it_quotes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "study=digits_mlp", f"lr={ESC}"]) == 2
    err = one_line(capsys, "lr=\\x1b[2J\\x1b]0;owned\\x07\\u202e: lr must be a number")
    assert "\x1b" not in err and "\u202e" not in err


def test_printable_keeps_plain_text_and_escapes_the_rest() -> None:
    assert printable("lr=0.001 · ünïcode") == "lr=0.001 · ünïcode"
    assert printable("a\tb\r\nc\x9b\u2028") == "a\\tb\\r\\nc\\x9b\\u2028"
    assert printable("two\nlines\x1b", keep_newlines=True) == "two\nlines\\x1b"


# --- the HTML report: a user's string is text, never markup -----------------------------

XSS = "<img src=x onerror=alert(1)>"


class Elements(HTMLParser):
    """Every element and attribute of a page, and its text (a script's body is text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_no_element_or_attribute_of_the_report_comes_from_a_users_string(
    tmp_path: Path,
) -> None:
    """Study name, metric, parameter names, choices, notes, error text: all payloads."""
    url = f"sqlite:///{tmp_path}/x.db"
    path = write_study(tmp_path, name=f"s{XSS}", metric=f"m{XSS}")
    study = apply_overrides(load_study(str(path)), {"storage": url}, {}).study
    choice = CategoricalDistribution([f"a{XSS}", f"b{XSS}"])
    lr = FloatDistribution(1e-4, 1e-1, log=True)
    stage = optuna.create_study(
        study_name=study.stage_name("batch_size"), storage=url, direction="maximize"
    )
    stage.set_user_attr("metric", study.metric)
    for i in range(4):
        params = {f"p{XSS}": choice.choices[i % 2], "lr": 10.0 ** -(i + 1)}
        stage.add_trial(create_trial(
            value=0.5 + i / 10, params=params, distributions={f"p{XSS}": choice, "lr": lr},
            intermediate_values={1: 0.4, 2: 0.5 + i / 10},
            user_attrs={"config": merged(study.config, {"lr": params["lr"]}),
                        "error": f"e{XSS}"},
        ))  # fmt: skip
    stage.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": f"e{XSS}"}))
    stage.set_user_attr("fixed", {f"k{XSS}": f"v{XSS}"})
    notes.write_stage_note(stage, [f"note{XSS}"])
    out = tmp_path / "r.html"
    assert main(["report", f"study={path}", f"storage={url}", f"out={out}"]) == 0
    page = Elements()
    page.feed(out.read_text())
    assert not [tag for tag, _ in page.tags if tag == "img"]
    attrs = [(name, value or "") for _, attrs in page.tags for name, value in attrs]
    assert not [a for a in attrs if a[0].startswith("on") or "alert(" in a[1] or "<" in a[1]]
    text = "".join(page.text)
    for shown in (f"s{XSS}", f"m{XSS}", f"p{XSS}", f"b{XSS}", f"note{XSS}", f"k{XSS}", f"v{XSS}"):
        assert shown in text  # as text: escaped in the file, the text itself on the page


# --- the CSV report: no cell is a formula ---------------------------------------------

FORMULAS = ["=HYPERLINK(\"http://x\",\"y\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
            "\t=1", "\r=1"]  # fmt: skip


def test_csv_cells_that_start_a_formula_are_neutralised(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    study = apply_overrides(load_study("digits_mlp"), {"storage": url}, {}).study
    choice = CategoricalDistribution([*FORMULAS, "-3", "plain"])
    stage = optuna.create_study(
        study_name=study.stage_name("batch_size"), storage=url, direction="minimize"
    )
    for i, value in enumerate([*FORMULAS, "-3", "plain"]):
        stage.add_trial(create_trial(
            value=-0.5 - i, params={"opt": value}, distributions={"opt": choice},
            user_attrs={"config": study.config, "error": FORMULAS[i % len(FORMULAS)]},
        ))  # fmt: skip
    out = tmp_path / "r.csv"
    assert main(["report", "study=digits_mlp", f"storage={url}", f"out={out}"]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["params_opt"] for r in rows] == [*(f"'{v}" for v in FORMULAS), "-3", "plain"]
    assert all(r["error"].startswith("'") for r in rows)
    assert [float(r["value"]) for r in rows] == [-0.5 - i for i in range(len(rows))]  # numbers


# --- a data file cannot run code -------------------------------------------------------


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


ROOT = Path(__file__).resolve().parent.parent


def test_a_crafted_cifar10_batch_is_refused_without_running_it(tmp_path: Path) -> None:
    folder = fake_data.write_cifar10(tmp_path / "data")
    marker = tmp_path / "ran"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": _RunsCode(f"touch {marker}"), "labels": [0]}, f)
    command = ["check", "study=cifar10", f"data.root={tmp_path / 'data'}"]
    done = subprocess.run(
        [sys.executable, "-m", "tuner", *command],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert not marker.exists()
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert err.count("\n") == 1 and "data_batch_1 is not a CIFAR-10 batch" in err
    assert "it asks for posix.system" in err and "refused without running it" in err


# --- a classification study on a continuous target -------------------------------------


def test_a_classification_of_a_continuous_target_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    fake_data.write_csv(tmp_path / "t.csv", regression=True)  # a float target
    assert main(["check", "study=csv_classification", "data.path=t.csv"]) == 2
    err = one_line(
        capsys, "data.target target: task is classification, but the column holds continuous"
        " numbers: 239 distinct values in 240 rows", "use study=csv_regression or task=regression"
    )  # fmt: skip
    assert len(err) < 300, len(err)


# --- a study file is checked whole before its objective is imported ---------------------

IMPORTED = """\
from pathlib import Path

Path("imported").write_text("the objective module ran")


def train(config, report, test=False):
    return {"accuracy": 0.5}
"""


@pytest.mark.parametrize("command", ["run", "check"])
def test_nothing_of_the_objective_is_imported_before_the_file_is_checked(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    module = f"objective_{command}_{os.getpid()}"  # a fresh module: nothing cached
    (tmp_path / f"{module}.py").write_text(IMPORTED)
    spaces = {"architecture": {"model.width": {"choicez": [8]}}}  # the last stage's space
    path = write_study(tmp_path, objective=f"{module}:train", search_spaces=spaces)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main([command, f"study={path}"]) == 2
    one_line(capsys, "architecture.model.width: unknown fields ['choicez']")
    assert not (tmp_path / "imported").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{module}.py", "study.yaml"]


def test_the_dashboards_lines_escape_a_path_with_escape_sequences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def ctrl_c(self: WSGIServer, poll_interval: float = 0.5) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WSGIServer, "serve_forever", ctrl_c)
    url = f"sqlite:///{tmp_path}/e{ESC}.db"
    optuna.create_study(study_name="digits_mlp/batch_size", storage=url)
    folder = tmp_path / f"a{ESC}"
    folder.mkdir()  # artifacts= must name a folder that exists
    assert main(["dashboard", f"storage={url}", "port=0", f"artifacts={folder}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "e\\x1b[2J\\x1b]0;owned\\x07\\u202e.db" in out and "a\\x1b[2J" in out
