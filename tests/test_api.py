"""tuner from Python: each command's twin, called without a subprocess, with the command
line's checks and messages; the README's examples as written."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import optuna
import pytest

import tuner
from tests import fake_study
from tuner.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def peaked(config: dict[str, Any], report: Any, *, test: bool = False) -> dict[str, Any]:
    """Peaks at lr = 1e-2; an objective passed as a function, not a module:function string."""
    score = 1 - (math.log10(config["lr"]) + 2) ** 2 / 10
    for epoch in range(1, config["epochs"] + 1):
        report(epoch, {"accuracy": score * epoch / config["epochs"]})
    metrics: dict[str, Any] = {"accuracy": score, "best_epoch": config["epochs"]}
    return {**metrics, "test": {"accuracy": score}} if test else metrics


def small(folder: Path, **overrides: Any) -> tuner.StudyConfig:
    return tuner.load(
        {
            "name": "small",
            "stages": ["lr"],
            "budget": {"trials": {"lr": 5}},
            "storage": f"sqlite:///{folder}/small.db",
            "search_spaces": {"lr": {"schedule": None, "warmup": None}},
            # The same draws every run: tests count trials, and a draw at the range's edge
            # would widen it and add trials.
            "sampler": {"seed": 0},
            "defaults": {"lr": 1e-3, "epochs": 3, "seed": 0},
        },
        **{"objective": peaked, **overrides},
    )


def tree(folder: Path) -> dict[str, str]:
    """Every file under a folder and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_import_tuner_loads_neither_torch_nor_optuna() -> None:
    code = (
        "import sys, tuner; print(sorted(m for m in ('torch', 'optuna', 'sqlalchemy', 'pandas')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_public_names_stay_functions_after_the_modules_behind_them_load() -> None:
    # The modules behind status, export, report, train and dashboard are private: importing
    # one sets an attribute of the package, which must not hide the function of that name.
    import tuner._dashboard
    import tuner._export
    import tuner._report
    import tuner._status
    import tuner._train

    for name in tuner.__all__:
        assert getattr(tuner, name) is not None, name
    for name in ("status", "export", "report", "train", "dashboard", "run", "check"):
        assert callable(getattr(tuner, name)) and getattr(tuner, name).__module__ == "tuner.api"


def test_run_status_best_export_report_and_train_from_python(tmp_path: Path) -> None:
    study = small(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        result = tuner.run(study, check=False)
    assert out.getvalue() == ""  # quiet unless asked
    assert [r.stage for r in result.stages] == ["lr"]
    assert (
        result.stages[0].complete == 5 and result.ended == "every stage ran its budget of trials"
    )
    rows = tuner.status(study)
    assert rows == result.stages
    best = tuner.best_config(study)
    assert best["config"]["lr"] == pytest.approx(rows[0].best_params["lr"])
    assert best["objective"] == f"{__name__}:peaked"
    assert result.best["config"] == best["config"]
    path = tuner.export(study, tmp_path / "best.yaml")
    assert path.is_file() and "provenance" in path.read_text()
    assert tuner.report(study, tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert "lr" in tuner.report(study, tmp_path / "r.csv").read_text().splitlines()[0]
    for config in (best, path):  # the document itself, or the file export wrote
        metrics = tuner.train(config, tmp_path / "trained", epochs=2)
        assert metrics["config"]["epochs"] == 2
        assert metrics["test"]["accuracy"] == pytest.approx(peaked(metrics["config"], print)[
            "accuracy"])  # fmt: skip
    assert (tmp_path / "trained" / "metrics.yaml").is_file()


def test_progress_is_a_callable_or_true(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    tuner.run(small(tmp_path), trials=2, check=False, progress=lines.append)
    assert sum(line.startswith("[lr ") for line in lines) == 2
    tuner.run(small(tmp_path), trials=3, check=False, progress=True)
    assert capsys.readouterr().out.count("[lr ") == 1  # two were done: the third ran


def test_optuna_logging_is_quiet_during_a_run_and_restored_after(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.INFO)
    seen: list[int] = []
    study = small(tmp_path, objective=lambda c, r: seen.append(optuna.logging.get_verbosity())
                  or peaked(c, r))  # fmt: skip
    tuner.run(study, trials=1, check=False)
    assert seen == [optuna.logging.ERROR]
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_check_runs_the_probe_and_says_when_there_is_none(tmp_path: Path) -> None:
    lines: list[str] = []
    assert tuner.check(small(tmp_path), progress=lines.append) == []
    assert "offers no probe(config)" in lines[0]


def test_dashboard_refuses_a_storage_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(tuner.UserError, match="No storage at sqlite:///"):
        tuner.dashboard(small(tmp_path), port=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": "fast"}, "lr=fast: lr must be a number (like 0.001)."),
        ({"epochz": 3}, "Unknown config key: epochz (did you mean epochs?)."),
        ({"model": {"widht": 3}}, "Unknown config key: model.widht (did you mean model.width?)."),
        ({"model.width": 2.5}, "model.width=2.5: model.width must be an integer."),
        ({"sampler": {"n_startup_trials": -1}},
         "sampler.n_startup_trials=-1: sampler.n_startup_trials must be a whole number of at"
         " least 0."),
        ({"pruner": {"n_startup_trials": "abc"}},
         "pruner.n_startup_trials=abc: pruner.n_startup_trials must be a whole number"),
        ({"sampler.seed": "abc"}, "sampler.seed=abc: sampler.seed must be a whole number"),
        ({"direction": "up"}, "direction must be maximize or minimize, got 'up'."),
    ],
)  # fmt: skip
def test_load_checks_overrides_as_the_command_line_does(
    overrides: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    with pytest.raises(tuner.UserError) as caught:
        tuner.load("mnist1d_cnn", **overrides)
    assert message in str(caught.value)
    # The same mistake on the command line: the same line, exit status 2.
    flat = {
        f"{k}.{kk}" if isinstance(v, dict) else k: vv if isinstance(v, dict) else v
        for k, v in overrides.items()
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
    }
    monkeypatch.chdir(tmp_path)
    assert main(["status", *(f"{k}={v}" for k, v in flat.items())]) == 2
    assert capsys.readouterr().err == f"tuner: {caught.value}\n"


def test_load_takes_nested_and_dotted_overrides_and_a_study_file(tmp_path: Path) -> None:
    study = tuner.load("mnist1d_cnn", lr=1e-3, model={"width": 64}, **{"model.depth": 2})
    assert (study.config["lr"], study.config["model"]["width"]) == (1e-3, 64)
    assert study.config["model"]["depth"] == 2
    fake_study.write(tmp_path, trials=2, epochs=1, sleep=0.0)
    assert tuner.load(tmp_path / "fake.yaml").name == "fake"
    with pytest.raises(tuner.UserError, match="Unknown study 'mnist1d_cn' \\(did you mean"):
        tuner.load("mnist1d_cn")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trials": 0}, "trials=0: trials must be at least 1."),
        ({"trials": -1}, "trials=-1: trials must be at least 1."),
        ({"trials": 2.5}, "trials=2.5: trials must be an integer."),
        ({"timeout": 0}, "timeout=0: timeout must be a number of seconds above 0."),
        ({"timeout": -1}, "timeout=-1: timeout must be a number of seconds above 0."),
        ({"timeout": math.nan}, "timeout=nan: timeout must be a number of seconds above 0."),
        ({"stage": ""}, "Unknown stage ''; this study's stages: lr"),
        ({"stage": "warmup"}, "Unknown stage 'warmup'; this study's stages: lr"),
        ({"workers": 0}, "workers=0: workers must be at least 1."),
        ({"threads": 0}, "threads=0: threads must be at least 1."),
        ({"heartbeat": 0}, "heartbeat=0: heartbeat must be a number of seconds above 0."),
    ],
)
def test_run_refuses_bad_options_before_anything_is_written(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    study = small(tmp_path)
    with pytest.raises(tuner.UserError) as caught:
        tuner.run(study, check=False, **options)
    assert message in str(caught.value)
    assert tree(tmp_path) == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trials=0"], "trials=0: trials must be at least 1."),
        (["timeout=0"], "timeout=0: timeout must be a number of seconds above 0."),
        (["timeout=-1"], "timeout=-1: timeout must be a number of seconds above 0."),
        (["stage="], "Unknown stage ''"),
        (["sampler.n_startup_trials=-1"], "sampler.n_startup_trials must be a whole number"),
        (["pruner.n_startup_trials=abc"], "pruner.n_startup_trials must be a whole number"),
        (["sampler.seed=abc"], "sampler.seed must be a whole number"),
        (["epochs=0"], "epochs=0: epochs must be a whole number of at least 1."),
        (["seed=-1"], "seed=-1: seed must be a whole number of at least 0."),
    ],
)
def test_the_command_line_refuses_them_too_with_nothing_written(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake_study.write(tmp_path, trials=2, epochs=1, sleep=0.0)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert main(["run", "study=fake.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert tree(tmp_path) == before  # no database, nothing else


def test_a_function_that_workers_cannot_import_is_refused_for_workers(tmp_path: Path) -> None:
    def local(config: dict[str, Any], report: Any) -> dict[str, Any]:
        return peaked(config, report)

    for fn in (local, lambda config, report: peaked(config, report)):
        with pytest.raises(tuner.UserError) as caught:
            tuner.run(small(tmp_path, objective=fn), workers=2, check=False)
        assert "worker processes import their objective" in str(caught.value)
        assert "use workers=1" in str(caught.value)
    assert tree(tmp_path) == {}
    # One process: any function will do.
    result = tuner.run(small(tmp_path, objective=local), trials=1, check=False)
    assert result.stages[0].complete == 1


def test_a_module_function_runs_in_worker_processes(tmp_path: Path) -> None:
    from objectives import train

    study = tuner.load(
        "digits_mlp", objective=train, epochs=1, storage=f"sqlite:///{tmp_path}/d.db"
    )
    assert study.objective == "objectives.loop:train"  # where the function is defined
    result = tuner.run(study, stage="batch_size", trials=2, workers=2, check=False)
    assert result.stages[0].complete == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"repeats": 0}, "repeats=0: repeats must be at least 1."),
        ({"threads": 0}, "threads=0: threads must be at least 1."),
        ({"out": ""}, "out=: train needs a folder to write"),
        ({"lr": -1.0}, "lr must be positive but got -1.0."),
        ({"lr": "abc"}, "lr=abc: lr must be a number (like 0.001)."),
        ({"epochs": -1}, "epochs must be at least 1 but got -1."),
        ({"lrr": 1.0}, "Unknown config key: lrr (did you mean lr?)."),
    ],
)
def test_train_refuses_bad_options_before_it_trains(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    document = {
        "objective": "objectives:train",
        "metric": "accuracy",
        "config": tuner.load("digits_mlp").config,
    }
    with pytest.raises(tuner.UserError) as caught:
        tuner.train(document, **{"out": tmp_path / "trained", **options})
    assert message in str(caught.value)
    assert tree(tmp_path) == {}


def readme_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## From Python") : text.index("## Bring your own objective")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_the_readme_python_examples_run_as_written_in_a_fresh_folder(tmp_path: Path) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        (tmp_path / f"example{i}.py").write_text(block)
        done = subprocess.run(
            [sys.executable, f"example{i}.py"], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        if i == 1:
            assert 0.003 < float(done.stdout.split()[-1]) < 0.03  # it found the peak's region
    for name in ("best.yaml", "report.html", "trained/metrics.yaml", "digits.db", "mine.db"):
        assert (tmp_path / name).is_file(), name


def test_train_names_the_key_of_a_hand_edited_export(tmp_path: Path) -> None:
    from tuner.config import STUDIES_DIR

    config = tuner.load("digits_mlp").config
    document = {
        "objective": "objectives:train",
        "metric": "accuracy",
        "config": {**config, "lr": "abc"},  # best.yaml edited by hand
        "provenance": {"study_file": str(STUDIES_DIR / "digits_mlp.yaml")},
    }
    with pytest.raises(tuner.UserError, match=re.escape("lr=abc: lr must be a number")):
        tuner.train(document, out=tmp_path / "trained")
    assert tree(tmp_path) == {}


def test_deterministic_devices_and_a_warm_start_from_python(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = small(tmp_path / "a")
    tuner.run(first, check=False, devices="cpu")
    start = tuner.export(first, tmp_path / "best.yaml")
    lines: list[str] = []
    second = tuner.load(
        {"name": "second", "stages": ["lr"], "budget": {"trials": {"lr": 2}},
         "storage": f"sqlite:///{tmp_path}/b.db", "loop": {"rescore": False},
         "search_spaces": {"lr": {"schedule": None, "warmup": None}},
         "defaults": {"lr": 1e-4, "epochs": 3, "seed": 0}},
        objective=peaked,
    )  # fmt: skip
    result = tuner.run(second, check=False, deterministic=True, start=start,
                       progress=lines.append)  # fmt: skip
    assert any(line.startswith("deterministic:") for line in lines)
    assert any(line.startswith("warm start from") for line in lines)
    found = optuna.load_study(study_name="second/lr", storage=result.study.storage)
    # The start's lr is the first trial's, not the study's own default of 1e-4.
    assert found.trials[0].params["lr"] == pytest.approx(tuner.best_config(first)["config"]["lr"])
    with pytest.raises(tuner.UserError, match="devices="):
        tuner.run(second, check=False, devices="nonsense")


# --- what a run from Python leaves behind in the caller's process, as the command line does ---


def test_an_interrupted_run_puts_back_the_signal_handlers_it_found(tmp_path: Path) -> None:
    def callers(signum: int, frame: Any) -> None:  # a notebook's own handler, say
        raise KeyboardInterrupt

    def interrupted(config: dict[str, Any], report: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-trial
        time.sleep(10)  # the interrupt ends this
        return peaked(config, report)

    study = small(tmp_path, objective=interrupted)
    saved = {signum: signal.signal(signum, callers) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            tuner.run(study, check=False)
        # The caller's handlers, not the run's "end at once" that an interrupt leaves behind:
        # the next Ctrl-C in the notebook must not kill its kernel.
        assert signal.getsignal(signal.SIGINT) is callers
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    (trial,) = optuna.load_study(study_name="small/lr", storage=study.storage).trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["stop_reason"] == "interrupted"


def seen_device(config: dict[str, Any], report: Any) -> dict[str, Any]:
    """What the trial's process has as CUDA_VISIBLE_DEVICES (no CUDA use: fake GPUs)."""
    return {"accuracy": config["lr"], "seen": os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_a_run_puts_back_the_callers_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def devices_of(study: tuner.StudyConfig) -> list[tuple[Any, Any]]:
        found = optuna.load_study(study_name="small/lr", storage=study.storage)
        return [(t.user_attrs["seen"], t.user_attrs.get("device")) for t in found.trials]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # two "visible GPUs"
    (tmp_path / "a").mkdir()
    study = small(tmp_path / "a", objective=seen_device)
    tuner.run(study, trials=2, devices="1", check=False)
    assert devices_of(study) == [("7", "cuda:7")] * 2  # this process's trials on GPU 7
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"  # and the caller's setting after

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    (tmp_path / "b").mkdir()
    study = small(tmp_path / "b", objective=seen_device)
    tuner.run(study, trials=1, devices="cpu", check=False)
    assert devices_of(study) == [("", "cpu")]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # unset, as it was

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the next run assigns none ...
    (tmp_path / "c").mkdir()
    study = small(tmp_path / "c", objective=seen_device)
    tuner.run(study, trials=1, check=False)
    assert devices_of(study) == [("", None)]  # ... and records none, not the last run's


def test_a_run_where_cuda_has_started_keeps_to_its_gpu_or_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # two "visible GPUs" ...
    # ... and CUDA started on the first of them, as after ``x.cuda()`` in a notebook.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    study = small(tmp_path, objective=seen_device)
    for devices, message in [
        ("1", "this process's trials would run on GPU 7, but CUDA has started in this process"
              " already (on GPU 5), and CUDA_VISIBLE_DEVICES cannot change: list GPU 0 first"
              " in devices= (devices=0,...), or call tuner.run before anything uses CUDA"),
        ("cpu", "devices=cpu: CUDA has started in this process already (on GPU 5), and"
                " CUDA_VISIBLE_DEVICES cannot change: use device=cpu to train on the CPU"),
    ]:  # fmt: skip
        with pytest.raises(tuner.UserError) as caught:
            tuner.run(study, devices=devices, check=False)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
        assert tree(tmp_path) == {}  # refused before anything was written
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"
    # The GPU it has already is the one asked for: this process's trials run on it.
    tuner.run(study, trials=1, devices="0", check=False)
    (trial,) = optuna.load_study(study_name="small/lr", storage=study.storage).trials
    assert trial.user_attrs["device"] == "cuda:5"
    assert trial.user_attrs["seen"] == "5,7"  # nothing was set: it could not hold


def test_worker_processes_print_nothing_unless_progress_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # fakeobj, for this process and its workers
    path = fake_study.write(tmp_path, trials=8, epochs=4, sleep=0.5)  # the worker starts in time
    for name in ("quiet", "given"):  # progress=False, and a function (True prints the same)
        study = tuner.load(path, storage=f"sqlite:///{tmp_path}/{name}.db")
        lines: list[str] = []
        capfd.readouterr()
        progress = lines.append if name == "given" else False
        tuner.run(study, workers=2, check=False, progress=progress)
        out, err = capfd.readouterr()
        found = optuna.load_study(study_name="fake/lr", storage=study.storage).trials
        done = [t for t in found if t.state == optuna.trial.TrialState.COMPLETE]
        assert len({t.user_attrs["pid"] for t in done}) == 2  # the worker ran trials too
        assert out == "", out  # nothing printed, by this process or its workers
        if name == "given":  # each trial's line, the worker's too, handed to the function
            numbers = re.findall(r"^\[lr \d+/\d+\] #(\d+) ", "\n".join(lines), re.M)
            assert sorted(map(int, numbers)) == sorted(t.number for t in done), lines
        assert "Traceback" not in err


def test_a_script_without_a_main_guard_is_told_so_once(tmp_path: Path) -> None:
    # Worker processes import the script again (spawn): unguarded, it would start runs there.
    fake_study.write(tmp_path, trials=3, epochs=1, sleep=0.1)
    (tmp_path / "tune.py").write_text(
        "import tuner\n\ntuner.run(tuner.load('fake.yaml'), workers=2, check=False)\n"
    )
    run = subprocess.run([sys.executable, "tune.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("tuner.errors.UserError: workers=2: each worker process imports")
    assert 'call it under `if __name__ == "__main__":`, or use workers=1.' in last
    assert run.stderr.count("Traceback") == 1  # the script's own, none from the workers
    assert "a new worker takes its place" not in run.stderr  # not started again and again
