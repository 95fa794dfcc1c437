"""A tiny study run through the command line with a fake objective: five stage studies in a
SQLite file in a few seconds, each with a dashboard note, for the dashboard and report tests.

The fake objective is a smooth function of the config (no training), so every stage finds
something better than the defaults and the plots have something to show.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from tuner.cli import main
from tuner.notes import write_stage_note

STAGES = ("batch_size", "lr", "optimizer", "architecture", "refine")

FAKE_OBJECTIVE = '''\
"""A fake objective: a smooth function of the config, a few 'epochs', no training."""

import math


def train(config, report, test=False):
    model = config.get("model", {})
    score = 0.95 - 0.04 * (math.log10(float(config["lr"])) + 1.8) ** 2
    score -= 0.02 * abs(math.log2(model.get("width", 256) / 256))
    score -= 0.01 * abs(math.log2(config["batch_size"] / 32))
    score -= 0.02 * (config.get("schedule") != "cosine")
    score -= 0.02 * (config.get("optimizer") != "adam")
    score -= 0.05 * abs(model.get("dropout", 0.2) - 0.2)
    best = 0.0
    for epoch in range(1, 5):
        value = score * (1 - 0.5**epoch)
        best = max(best, value)
        report(epoch, {"accuracy": value, "loss": 1.0 - value})
    return {"accuracy": best, "loss": 1.0 - best, "best_epoch": 4, "stop_reason": "max_epochs"}
'''


@dataclass(frozen=True)
class Tiny:
    """Where a tiny study lives."""

    folder: Path
    study_file: Path
    url: str
    name: str = "tiny"

    @property
    def args(self) -> list[str]:
        """The ``study=`` and ``storage=`` arguments of a tuner command on it."""
        return [f"study={self.study_file}", f"storage={self.url}"]

    def stage(self, stage: str) -> optuna.Study:
        return optuna.load_study(study_name=f"{self.name}/{stage}", storage=self.url)


def run_tiny(folder: Path, trials: int = 12) -> Tiny:
    """``python -m tuner run`` of the tiny study in ``folder``; then a note on each stage."""
    (folder / "tinyobj.py").write_text(FAKE_OBJECTIVE)
    base = (Path(__file__).resolve().parent.parent / "studies" / "digits_mlp.yaml").read_text()
    text = re.sub(r"(?m)^objective: .*$", "objective: tinyobj:train", base)
    text = re.sub(r"(?m)^name: .*$", "name: tiny", text)
    text = text.replace("sampler:\n", "sampler:\n  seed: 0   # the same draws every time\n", 1)
    study_file = folder / "tiny.yaml"
    study_file.write_text(text)
    tiny = Tiny(folder, study_file, f"sqlite:///{folder}/t.db")
    # The real command line, in this process: a subprocess would import torch again (3 s).
    path = list(sys.path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # where the objective module is (the study says tinyobj:train)
        status = main(["run", *tiny.args, f"trials={trials}", "timeout=60"])
    sys.path[:] = path
    assert status == 0
    for stage in STAGES:  # the runner writes these too, once it calls write_stage_note
        write_stage_note(tiny.stage(stage), ["a diagnostic line"] if stage == "lr" else None)
    return tiny


def expect_user_error(
    command: str, tiny: Tiny, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``command`` on the tiny study, with ``args`` winning over its own, ends in one line
    that holds ``message`` and exit status 2."""
    given = dict(arg.split("=", 1) for arg in [*tiny.args, *args])  # args win
    assert main([command, *(f"{k}={v}" for k, v in given.items())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1 and message in err, err
