"""A seeded run repeats: the batch-size stage's time race is stored and replayed, and
``deterministic=true`` replaces it with a budget in samples, so load changes nothing."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from objectives import train
from tuner import race
from tuner.cli import main
from tuner.config import load_study
from tuner.plan import plan_stage
from tuner.trial import make_objective

STAGES = ("batch_size", "lr", "optimizer", "architecture")

STUDY = """\
name: rep
objective: objectives:train
metric: accuracy
direction: maximize
storage: sqlite:///rep.db
{deterministic}
stages: [batch_size, lr, optimizer, architecture]
budget:
  trials: {{batch_size: 3, lr: 3, optimizer: 3, architecture: 2}}
  samples: 3000
sampler: {{name: tpe, n_startup_trials: 2}}
pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: 1}}
search_spaces:
  batch_size:
    batch_size: {{powers_of_two: [32, 128]}}
  architecture:
    model.kernel_size: null
defaults:
  seed: 0
  device: cpu
  data: {{name: digits, val_fraction: 0.2}}
  model: {{name: mlp, width: 32, depth: 1, kernel_size: 3, dropout: 0.0, norm: batch,
           activation: relu, init: he}}
  loss: cross_entropy
  label_smoothing: 0.0
  batch_size: 64
  lr: 3.0e-3
  schedule: onecycle
  warmup: 0.2
  optimizer: adamw
  momentum: 0.9
  beta1: 0.9
  beta2: 0.999
  weight_decay: 0.01
  epochs: 2
  patience: null
  time_budget: null
"""


def write_study(folder: Path, deterministic: str = "") -> Path:
    path = folder / "rep.yaml"
    path.write_text(STUDY.format(deterministic=deterministic))
    return path


def tuner(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def trials_of(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every stage's trials as (number, state, params, value), and its best."""
    out = {}
    for stage in STAGES:
        study = optuna.load_study(study_name=f"rep/{stage}", storage=url)
        rows = [(t.number, t.state.name, t.params, t.value) for t in study.trials]
        best = (study.best_trial.params, study.best_value)
        out[stage] = [*rows, ("best", best)]
    return out


def test_two_deterministic_runs_one_beside_a_busy_cpu_give_the_same_trials(
    tmp_path: Path,
) -> None:
    quiet, busy = tmp_path / "quiet", tmp_path / "busy"
    quiet.mkdir()
    busy.mkdir()
    # One run asks in the study file, the other on the command line.
    write_study(quiet, "deterministic: true")
    write_study(busy)
    first = tuner("run", "study=rep.yaml", "check=false", cwd=quiet)
    assert first.returncode == 0, first.stderr
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]  # fmt: skip
    try:
        second = tuner("run", "study=rep.yaml", "check=false", "deterministic=true", cwd=busy)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert second.returncode == 0, second.stderr
    assert "deterministic: one worker, no time limit" in second.stdout
    a, b = trials_of(f"sqlite:///{quiet}/rep.db"), trials_of(f"sqlite:///{busy}/rep.db")
    for stage in STAGES:
        assert a[stage] == b[stage], stage
    size = optuna.load_study(study_name="rep/batch_size", storage=f"sqlite:///{busy}/rep.db")
    for trial in size.trials:  # no race: every candidate trained the study's 3000 samples
        assert trial.user_attrs["stop_reason"] == "sample_budget"
        assert trial.user_attrs["config"]["train_samples"] == 3000
        assert "probe_samples_per_s" not in trial.user_attrs


def test_a_replayed_race_trains_the_stored_samples_exactly_like_the_measured_run() -> None:
    config = yaml.safe_load(STUDY.format(deterministic=""))["defaults"]
    config.update(time_budget=0.05, epochs=1)
    measured = train(config)
    assert measured["stop_reason"] == "time_budget"
    samples = measured["train_samples"]
    replayed = train({**config, "train_samples": samples})
    assert "probe_samples_per_s" in measured and "probe_samples_per_s" not in replayed
    for key in ("accuracy", "loss", "steps", "train_samples", "best_epoch"):
        assert replayed[key] == measured[key], key


def test_a_later_trial_of_a_raced_batch_size_reads_the_stored_measurement(
    tmp_path: Path,
) -> None:
    study_file = write_study(tmp_path)
    study = load_study(str(study_file))
    plan = plan_stage(study, "batch_size", lambda stage: None)
    assert plan.incumbent["time_budget"] == 3.0  # the search space's race
    stage = optuna.create_study(storage=f"sqlite:///{tmp_path}/r.db", direction="maximize")
    seen: list[dict[str, Any]] = []

    def fn(config: dict[str, Any], report: Any) -> dict[str, Any]:
        seen.append(config)
        if config.get("train_samples") is not None:  # replayed: nothing is timed
            return {"accuracy": 0.5, "train_samples": config["train_samples"]}
        return {"accuracy": 0.5, "probe_samples_per_s": 1000.0, "train_samples": 2944}

    objective = make_objective(plan, fn)
    for _ in range(2):  # the same batch size twice: a retried trial, or a re-run
        stage.enqueue_trial({"batch_size": 64})
        stage.optimize(objective, n_trials=1)
    assert "train_samples" not in seen[0]
    assert seen[1]["train_samples"] == 2944
    stored = stage.user_attrs["race:64"]
    assert stored["samples"] == 2944 and stored["samples_per_s"] == 1000.0
    assert stored["trial"] == 0
    assert race.replay(stage, {"batch_size": 32, "time_budget": 3.0}).get("train_samples") is None


@pytest.mark.parametrize(
    ("study_line", "args", "message"),
    [
        ("", ["deterministic=true", "workers=2"], "deterministic=true with workers=2"),
        ("", ["deterministic=true", "timeout=30"], "deterministic=true with timeout=30"),
        ("deterministic: yes please", [], "deterministic must be true or false"),
        ("", ["deterministic=maybe"], "deterministic=maybe: deterministic must be true or false"),
    ],
)
def test_deterministic_mistakes_are_one_line_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    study_line: str,
    args: list[str],
    message: str,
) -> None:
    study = write_study(tmp_path, study_line)
    assert main(["run", f"study={study}", f"storage=sqlite:///{tmp_path}/x.db", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.db").exists()


def test_deterministic_without_a_sample_budget_names_budget_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "rep.yaml"
    study.write_text(STUDY.format(deterministic="").replace("  samples: 3000\n", ""))
    assert main(["run", f"study={study}", f"storage=sqlite:///{tmp_path}/x.db",
                 "deterministic=true"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "set budget.samples" in err and str(study) in err, err
    assert not (tmp_path / "x.db").exists()
