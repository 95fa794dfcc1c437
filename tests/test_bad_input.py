"""Every mistake a user can make is one line and exit status 2, with the storage untouched;
and a password in a storage URL never shows, in any output or file."""

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fake_study
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
