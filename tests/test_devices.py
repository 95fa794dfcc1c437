"""One trial per GPU: which device each worker gets (fake device lists, on the CPU), and a
real run whose worker processes each see their own CUDA_VISIBLE_DEVICES."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tuner import devices
from tuner.cli import main
from tuner.errors import UserError

FOUR = ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("given", "workers", "gpus", "device", "expected"),
    [
        (None, None, FOUR, "auto", FOUR),  # by default every visible GPU, one worker each
        (None, 2, FOUR, "auto", ["0", "1"]),  # workers= asks for fewer
        (None, None, ["5", "7"], "cuda", ["5", "7"]),  # the visible ones, as CUDA names them
        ([2, 3], None, FOUR, "auto", ["2", "3"]),
        ([1, 1], 2, FOUR, "auto", ["1", "1"]),  # listed twice: two trials on it, as asked
        ([1, 0], None, ["GPU-a", "GPU-b"], "auto", ["GPU-b", "GPU-a"]),  # UUIDs pass through
        (None, None, [], "auto", [None]),  # no GPU: one worker, nothing set
        (None, 3, [], "auto", [None, None, None]),
        (None, 3, FOUR, "cpu", [None, None, None]),  # the config pins the CPU
        (None, None, FOUR, "cuda:1", [None]),  # ... or one GPU
        ("cpu", 2, FOUR, "auto", ["", ""]),  # devices=cpu hides the GPUs from every worker
    ],
)
def test_each_worker_gets_its_device(
    given: list[int] | str | None,
    workers: int | None,
    gpus: list[str],
    device: str,
    expected: list[str | None],
) -> None:
    assert devices.assign(given, workers, gpus, device) == expected


@pytest.mark.parametrize(
    ("given", "workers", "gpus", "device", "message"),
    [
        (None, 5, FOUR, "auto", "workers=5 but 4 GPU(s) are visible"),
        ([0, 1], 3, FOUR, "auto", "workers=3 but devices=0,1 lists 2"),
        ([0, 4], None, FOUR, "auto", "devices=0,4: GPU 4 is not visible"),
        ([0], None, [], "auto", "devices=0: no GPU is visible here"),
        ([0, 1], None, FOUR, "cpu", "devices=0,1 but the study's device is cpu"),
        ("cpu", None, FOUR, "cuda", "devices=cpu but the study's device is cuda"),
        (None, 0, FOUR, "auto", "workers=0: workers must be at least 1"),
    ],
)
def test_an_impossible_assignment_is_one_clear_error(
    given: list[int] | str | None, workers: int | None, gpus: list[str], device: str, message: str
) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        devices.assign(given, workers, gpus, device)


@pytest.mark.parametrize("text", ["", "0,", "a", "0;1", "-1", "0, x", "1.5"])
def test_devices_must_be_indexes_or_cpu(text: str) -> None:
    with pytest.raises(UserError, match="devices must be GPU indexes separated by commas"):
        devices.parse(text)
    assert devices.parse("0,1, 3") == [0, 1, 3]
    assert devices.parse("cpu") == "cpu"


def test_visible_gpus_come_from_cuda_visible_devices_or_the_driver(tmp_path: Path) -> None:
    for name in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / name).mkdir()
    assert devices.visible({}, tmp_path) == ["0", "1"]
    assert devices.visible({"CUDA_VISIBLE_DEVICES": "3, 1"}, tmp_path) == ["3", "1"]
    assert devices.visible({"CUDA_VISIBLE_DEVICES": ""}, tmp_path) == []
    assert devices.visible({}, tmp_path / "absent") == []


OBJECTIVE = """
import os, time

def train(config, report, test=False):
    value = 0.5 + config["lr"]
    for epoch in range(1, 3):
        time.sleep(0.3)
        report(epoch, {"accuracy": value})
    return {"accuracy": value, "stop_reason": "max_epochs", "pid": os.getpid(),
            "seen": os.environ.get("CUDA_VISIBLE_DEVICES")}
"""

STUDY = """
name: gpus
objective: gpuobj:train
storage: sqlite:///gpus.db
stages: [lr]
budget: {trials: {lr: 12}}
sampler: {name: random}
pruner: {name: none}
defaults: {seed: 0, lr: 0.003, schedule: onecycle, warmup: 0.2, epochs: 2}
"""


def test_a_run_gives_each_worker_process_its_own_gpu_and_status_shows_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "gpuobj.py").write_text(OBJECTIVE)
    (tmp_path / "gpus.yaml").write_text(STUDY)
    # Two "visible GPUs" (no CUDA use here): by default, a worker process on each.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "5,7"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "tuner", "run", "study=gpus.yaml", "check=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    trials = optuna.load_study(study_name="gpus/lr", storage=f"sqlite:///{tmp_path}/gpus.db")
    by_pid: dict[int, set[str]] = {}
    for trial in trials.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        # What the trial's process saw is what it recorded, as the run's GPU names it.
        assert trial.user_attrs["device"] == f"cuda:{trial.user_attrs['seen']}"
        by_pid.setdefault(trial.user_attrs["pid"], set()).add(trial.user_attrs["device"])
    assert len(by_pid) == 2, by_pid  # the run's own process and one worker process
    assert sorted(d for seen in by_pid.values() for d in seen) == ["cuda:5", "cuda:7"]
    assert "ran on cuda:5 x" in run.stdout and ", cuda:7 x" in run.stdout
    status = subprocess.run(
        [sys.executable, "-m", "tuner", "status", "study=gpus.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "ran on cuda:5 x" in status.stdout, status.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["devices=0,x"], "devices=0,x: devices must be GPU indexes"),
        (["devices=0"], "devices=0: no GPU is visible here"),
        (["devices=cpu", "workers=0"], "workers=0: workers must be at least 1"),
    ],
)
def test_devices_mistakes_are_one_line_and_write_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the machine has
    (tmp_path / "gpus.yaml").write_text(STUDY)
    study = f"study={tmp_path / 'gpus.yaml'}"
    assert main(["run", study, f"storage=sqlite:///{tmp_path}/x.db", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.db").exists()
