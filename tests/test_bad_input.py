"""Every mistake a user can make is one line and exit status 2, with the storage untouched;
and a password in a storage URL never shows, in any output or file."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests import fake_study
from tests.fs import tree
from tuner import yamlio
from tuner.cli import main
from tuner.config import STUDIES_DIR

DEFAULT = (STUDIES_DIR / "mnist1d_cnn.yaml").read_text()


def snapshot(url: str) -> list[tuple]:
    """What a storage holds: studies, their attrs, their trials."""
    rows = []
    for summary in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=summary.study_name, storage=url)
        rows.append((summary.study_name, sorted(study.user_attrs.items(), key=str),
                     [(t.number, t.state, t.value, t.params) for t in study.trials]))  # fmt: skip
    return rows


@pytest.fixture()
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A storage with a finished fake stage in it, and the cwd in an empty folder."""
    fake_study.write(tmp_path, trials=2, epochs=1, sleep=0.0)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "study=fake.yaml"]) == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return f"sqlite:///{tmp_path}/tuner.db"


def study_file(folder: Path, old: str, new: str) -> str:
    assert old in DEFAULT
    path = folder / "study.yaml"
    path.write_text(DEFAULT.replace(old, new, 1))
    return f"study={path}"


SPACE = "search_spaces:\n  lr:\n    lr: {}\ndefaults:"
CASES = {
    "unknown key": (["lrr=1"], "Unknown config key: lrr (did you mean lr?)"),
    "wrong type": (["epochs=many"], "epochs=many: epochs must be an integer"),
    "unknown stage": (["stage=warmup"], "Unknown stage 'warmup'"),
    "unknown optimizer": (["optimizer=adamx"], "optimizer must be one of sgd, adam"),
    "unknown model": (["model.name=resnet9"], "model.name must be one of"),
    "unknown data set": (["data.name=cifar"], "data.name must be one of"),
    "low above high": (("defaults:", SPACE.format("{low: 0.1, high: 0.01, log: true}")),
                       "low must be at most high"),
    "log range from 0": (("defaults:", SPACE.format("{low: 0.0, high: 0.1, log: true}")),
                         "a log range needs low > 0"),
    "empty choices": (("defaults:", SPACE.format("{choices: []}")), "choices must be a non-empty"),
    "malformed yaml": (("defaults:", "defaults: [unclosed"), "malformed YAML"),
    "unknown pruner": (["pruner.name=sometimes"], "pruner.name must be one of"),
    "bad pruner option": (["pruner.n_warmup_stepz=3"], "unexpected keyword argument"),
    "unknown pruner reference": (["pruner.compare_to=best"], "pruner.compare_to must be sampled"),
    "missing study file": (["study=nowhere/study.yaml"], "does not exist"),
    "storage URL unparseable": (["storage=://nothing"], "is not a database URL"),
    "storage unreachable": (["storage=postgresql://bob:hunter2@127.0.0.1:1/db"],
                            "Cannot open storage postgresql://bob:***@127.0.0.1:1/db"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: str, filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    given_, message = CASES[case]
    before = snapshot(filled)
    args = list(given_) if isinstance(given_, list) else [study_file(Path.cwd(), *given_)]
    given_keys = {a.split("=", 1)[0] for a in args}
    base = {"stage": "lr", "batch_size": "64", "storage": filled}
    args += [f"{k}={v}" for k, v in base.items() if k not in given_keys]
    code = main(["run", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tuner: ") and err.count("\n") == 1, err  # one line, no traceback
    assert message in err
    assert "hunter2" not in err
    assert snapshot(filled) == before  # the storage is untouched
    assert list(Path.cwd().iterdir()) in ([], [Path.cwd() / "study.yaml"])  # nothing written


NEEDED = {"lr", "schedule", "warmup", "batch_size", "storage", "objective", "study"}
KEYS = [
    "stage", "trials", "timeout", "restart", "workers", "threads", "heartbeat", "epochs",
    "model.width", "model.norm", "optimizer", "momentum", "seed", "metric", "direction",
    "pruner.name", "sampler.name", "data.name", "weight_decay",
]  # fmt: skip
key = st.one_of(st.sampled_from(KEYS), st.text("abcdefghijklmnopqrstuvwxyz._", min_size=1))
value = st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pairs=st.dictionaries(
        key.filter(lambda k: k not in NEEDED and "=" not in k), value, max_size=4
    )
)
def test_random_overrides_never_crash_and_never_write(
    pairs: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # Whatever the overrides, a later stage in an empty folder ends in one line and status 2.
    folder = tmp_path_factory.mktemp("random")
    monkeypatch.chdir(folder)
    args = ["run", "stage=architecture", *(f"{k}={v}" for k, v in pairs.items())]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert err.startswith("tuner: ") and err.count("\n") == 1, (args, err)
    assert list(folder.iterdir()) == [], args


def database_text(url: str) -> str:
    """Every row of every table, as text: notes, attrs, configs, all of it."""
    import psycopg

    with psycopg.connect(url) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        return "\n".join(
            str(connection.execute(f'SELECT * FROM "{name}"').fetchall()) for (name,) in tables
        )


def test_no_password_in_any_output_export_note_or_report(
    tmp_path: Path, postgres_url: str
) -> None:
    secret = "Sup3rSecretPw"
    url = postgres_url.replace("postgres@", f"postgres:{secret}@")  # trust auth ignores it
    fake_study.write(tmp_path, trials=3, epochs=2, sleep=0.0)
    outputs = []
    for args in (["run", f"storage={url}"], ["status", f"storage={url}"],
                 ["export", f"storage={url}", "out=best.yaml"],
                 ["report", f"storage={url}", "out=report.html"],
                 ["report", f"storage={url}", "out=report.csv"],
                 ["run", f"storage={url.replace('5432', '1')}"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "tuner", *args, "study=fake.yaml"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        outputs.append(done.stdout + done.stderr)
    assert "***@" in "".join(outputs)  # the URL was shown, masked
    files = [p.read_text(errors="replace") for p in tmp_path.iterdir() if p.is_file()]
    for text in [*outputs, *files, database_text(postgres_url)]:
        assert secret not in text
    assert re.search(r"validation accuracy", outputs[2])  # the export did run


# --- every option of export, report, status, dashboard, check and train --------------------
# (run's options are above and in test_cli.py.) Each case: one line, exit 2, and the
# storage's folder (which holds the exported best.yaml that train reads) and the current
# folder unchanged, byte for byte.
OPTION_CASES = {
    "export": [
        (["outt=best.yaml"], "Unknown config key: outt (did you mean out?)"),
        (["out="], "out=: out needs a file name"),
        (["out=."], "out=. is a folder"),
        (["out=/proc/best.yaml"], "out=/proc/best.yaml: cannot write in folder /proc"),
        (["out=nowhere/best.yaml"], "folder nowhere does not exist"),
        (["out=../db/fifo"], "out=../db/fifo is not a regular file"),  # (not /dev/null: a
        # code without the check renames its temporary file over the target, device or not)
        (["out=a\x00b"], "a path cannot hold a NUL character"),
        (["stag=lr"], "Unknown config key: stag (did you mean stage?)"),
        (["stage=warmup"], "Unknown stage 'warmup'; this study's stages: lr"),
        (["stage="], "Unknown stage ''"),
    ],
    "report": [
        (["outt=report.html"], "Unknown config key: outt (did you mean out?)"),
        (["out="], "out=: out needs a file name, e.g. out=report.html"),
        (["out=.", "format=csv"], "out=. is a folder; give a file name, e.g. out=report.csv"),
        (["out=/proc/report.html"], "cannot write in folder /proc"),
        (["out=nowhere/report.html"], "folder nowhere does not exist"),
        (["formatt=csv"], "Unknown config key: formatt (did you mean format?)"),
        (["format=pdf"], "format=pdf: the formats are html and csv"),
        (["format="], "format=: the formats are html and csv"),
    ],
    "status": [
        (["stage=lr"], "Unknown config key: stage"),
        (["storage=://nothing"], "storage=://nothing is not a database URL"),
    ],
    "dashboard": [
        (["prot=8080"], "Unknown config key: prot (did you mean port?)"),
        (["port=abc"], "port=abc: port must be an integer"),
        (["port=70000"], "port=70000: a port is a number from 1 to 65535"),
        (["port=-1"], "port=-1: a port is a number from 1 to 65535"),
        (["hots=127.0.0.1"], "Unknown config key: hots (did you mean host?)"),
        (["host="], "host=: an empty host listens on every address"),
        (["host=999.1.1.1", "port=0"], "Cannot listen on 999.1.1.1:0"),
        (["artifact=x"], "Unknown config key: artifact (did you mean artifacts?)"),
        (["artifacts="], "artifacts=: give the artifact folder"),
        (["artifacts=nowhere"], "artifacts=nowhere: no such folder"),
        (["artifacts=../db/fake.yaml"], "artifacts=../db/fake.yaml is a file"),
    ],
    "check": [
        (["thread=2"], "Unknown config key: thread (did you mean threads?)"),
        (["threads=0"], "threads=0: threads must be at least 1"),
        (["threads=abc"], "threads=abc: threads must be an integer"),
        (["threads="], "threads=: threads must be an integer"),
        (["epochs=many"], "epochs=many: epochs must be an integer"),
        (["lrr=1"], "Unknown config key: lrr (did you mean lr?)"),
    ],
    "train": [  # its base: config=best.yaml, exported from the storage below
        (["confg=../db/best.yaml"], "Unknown config key: confg (did you mean config?)"),
        (["outt=trained"], "Unknown config key: outt (did you mean out?)"),
        (["repeat=2"], "Unknown config key: repeat (did you mean repeats?)"),
        (["thread=2"], "Unknown config key: thread (did you mean threads?)"),
        (["lrr=1"], "Unknown config key: lrr (did you mean lr?)"),
        (["repeats=0"], "repeats=0: repeats must be at least 1"),
        (["repeats=abc"], "repeats=abc: repeats must be an integer"),
        (["threads=0"], "threads=0: threads must be at least 1"),
        (["threads=abc"], "threads=abc: threads must be an integer"),
        (["epochs=-1"], "epochs=-1: epochs must be a whole number of at least 1"),
        (["epochs=0"], "epochs=0: epochs must be a whole number of at least 1"),
        (["seed=-1"], "seed=-1: seed must be a whole number of at least 0"),
        (["lr=abc"], "lr=abc: lr must be a number"),
        (["out="], "out=: train needs a folder to write"),
        (["out=../db/fake.yaml"], "out=../db/fake.yaml is a file"),
        (["out=/proc/trained"], "out=/proc/trained: cannot write in folder /proc"),
        (["config="], "config=: train needs an exported config's file"),
        (["config=nowhere/best.yaml"], "nowhere/best.yaml: no such file"),
        (["config=../db"], "config=../db is a folder"),
        (["config=../db/fifo"], "config=../db/fifo is not a regular file"),  # (a read waits)
        (["config=../db/fake.yaml"], "not an exported config"),
        (["config=a\x00b"], "a path cannot hold a NUL character"),
        (["study=../db/fake.yaml"], "Unknown config key: study"),  # train reads no study
    ],
}
# The keys every command but train takes (train reads an exported config, not a storage).
COMMON = [
    (["storag=sqlite:///other.db"], "Unknown config key: storag (did you mean storage?)"),
    (["study=nowhere/study.yaml"], "does not exist"),
]


def option_cases(command: str) -> list[tuple[list[str], str]]:
    return [*OPTION_CASES[command], *(COMMON if command != "train" else [])]


def base_options(command: str, storage_folder: Path, url: str) -> dict[str, str]:
    """What every case of a command is given besides its mistake."""
    if command == "train":
        return {"config": str(storage_folder / "best.yaml")}
    return {"study": str(storage_folder / "fake.yaml"), "storage": url}


OPTION_IDS = [(command, i) for command in OPTION_CASES for i in range(len(option_cases(command)))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a finished fake stage in it (tuner.db) and its export (best.yaml), made
    once for the cases below."""
    folder = tmp_path_factory.mktemp("finished")
    fake_study.write(folder, trials=2, epochs=1, sleep=0.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["run", "study=fake.yaml"]) == 0
        assert main(["export", "study=fake.yaml", "out=best.yaml"]) == 0
    return folder


@pytest.fixture()
def copied(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of that folder (and a FIFO in it), and the cwd in an empty folder beside it;
    the storage URL. The copy's objective (fakeobj.py) is the one train imports, and
    importing it writes nothing there."""
    shutil.copytree(finished, tmp_path / "db")
    os.mkfifo(tmp_path / "db" / "fifo")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.syspath_prepend(str(tmp_path / "db"))
    monkeypatch.delitem(sys.modules, "fakeobj", raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return f"sqlite:///{tmp_path}/db/tuner.db"


@pytest.mark.parametrize(("command", "index"), OPTION_IDS, ids=[f"{c}-{i}" for c, i in OPTION_IDS])
def test_every_option_of_every_command_but_run_is_one_line_exit_2_and_nothing_written(
    command: str, index: int, copied: str, capsys: pytest.CaptureFixture[str]
) -> None:
    filled = copied
    given_, message = option_cases(command)[index]
    storage_folder = Path(filled.removeprefix("sqlite:///")).parent
    before = tree(storage_folder)
    given_keys = {a.split("=", 1)[0] for a in given_}
    base = base_options(command, storage_folder, filled)
    args = [*given_, *(f"{k}={v}" for k, v in base.items() if k not in given_keys)]
    code = main([command, *args])
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert err.startswith("tuner: ") and err.count("\n") == 1, err  # one line, no traceback
    assert message in err, err
    assert tree(storage_folder) == before  # the storage and its folder: untouched
    assert list(Path.cwd().iterdir()) == []  # nothing written where the command ran


def test_the_other_commands_run_with_the_cases_base_arguments(
    copied: str, capsys: pytest.CaptureFixture[str]
) -> None:
    filled = copied
    # The cases above fail for the reason they name: without the mistake, each command works.
    storage_folder = Path(filled.removeprefix("sqlite:///")).parent
    study = f"study={storage_folder / 'fake.yaml'}"
    for args in (["status"], ["export", "out=best.yaml"], ["report", "out=report.csv"]):
        assert main([*args, study, f"storage={filled}"]) == 0, capsys.readouterr().err
    config = f"config={storage_folder / 'best.yaml'}"
    assert main(["train", config, "repeats=2", "threads=1", "epochs=1"]) == 0, capsys.readouterr()
    assert (Path("trained") / "metrics.yaml").is_file()


READING_KEYS = {"export": ["out", "stage"], "report": ["out", "format"], "status": [],
                "train": ["out", "config", "repeats", "threads"]}  # fmt: skip
OPTION_KEYS = sorted({k for keys in READING_KEYS.values() for k in keys} | {"epochs"})
PATHS = ["", ".", " ", "a\x00b", "nowhere/x.yaml", "r.csv", "best.yaml", "csv", "html", "lr"]


def trains_long(command: str, pairs: dict[str, str]) -> bool:
    """A train that would run long: over 3 epochs, repeats or threads, or the fake
    objective's sleep per epoch set (the objective's own keys are its business)."""
    if command != "train":
        return False
    if "sleep" in pairs:
        return True
    for key in ("epochs", "repeats", "threads"):
        for parse in (int, yamlio.parse_value):  # as train's options and config keys read it
            try:
                number = parse(pairs.get(key, "0"))
            except ValueError:
                continue
            if isinstance(number, int) and number > 3:
                return True
    return False


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    command=st.sampled_from(sorted(READING_KEYS)),
    pairs=st.dictionaries(
        st.one_of(key, st.sampled_from(OPTION_KEYS)).filter(
            lambda k: k not in NEEDED and "=" not in k
        ),
        st.one_of(value, st.sampled_from(PATHS)), max_size=3,
    ),
)  # fmt: skip
@example(command="export", pairs={"out": ""})
@example(command="report", pairs={"out": "."})
@example(command="train", pairs={"config": ""})
@example(command="train", pairs={"out": "r.csv", "repeats": "2"})
def test_random_options_of_the_reading_commands_and_train_are_a_result_or_one_line(
    command: str, pairs: dict[str, str], copied: str, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # export, report and status on a real storage, and train on its export, with any
    # options: a result (exit 0, nothing on stderr, at most the out= file or folder written)
    # or one line and exit 2 (nothing written); never a traceback, and the storage's folder
    # is never changed.
    out = pairs.get("out", "")
    assume(not out.startswith(("/", "~")) and ".." not in out)  # stay in the test's folder
    assume(not trains_long(command, pairs))
    folder = tmp_path_factory.mktemp("random")
    monkeypatch.chdir(folder)
    storage_folder = Path(copied.removeprefix("sqlite:///")).parent
    stored = snapshot(copied)  # (which opens it: SQLite may change its -shm file)
    before = tree(storage_folder)
    base = base_options(command, storage_folder, copied)
    args = [command, *(f"{k}={v}" for k, v in {**base, **pairs}.items())]
    threads = torch.get_num_threads()
    try:
        code = main(args)
    finally:
        torch.set_num_threads(threads)  # train sets them for this process
    err = capsys.readouterr().err
    if code == 0:
        assert err == "", (args, err)
        assert len(list(folder.iterdir())) == (command != "status"), args
        assert snapshot(copied) == stored  # read: SQLite may have moved its WAL into the file
    else:
        assert code == 2, (args, err)
        assert err.startswith("tuner: ") and err.count("\n") == 1, (args, err)
        assert list(folder.iterdir()) == [], args
        assert tree(storage_folder) == before, args  # refused before it was opened
