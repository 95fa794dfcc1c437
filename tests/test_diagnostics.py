"""Stage diagnostics and `train repeats=N`: fake histories and plain-Python objectives."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from tests import fake_study
from tuner import _status as status
from tuner import yamlio
from tuner._train import train
from tuner.cli import main
from tuner.config import load_study
from tuner.diagnostics import diagnose

LR = FloatDistribution(3e-4, 3e-2, log=True)
SCHEDULE = CategoricalDistribution(["constant", "cosine"])


def stage(trials: list[dict]) -> optuna.Study:
    s = optuna.create_study(study_name="mnist1d_cnn/lr", direction="maximize")
    s.set_user_attr("stage", "lr")
    for t in trials:
        s.add_trial(create_trial(
            state=t.get("state", TrialState.COMPLETE), value=t.get("value"),
            params={"lr": t["lr"], "schedule": "cosine"},
            distributions={"lr": LR, "schedule": SCHEDULE},
            user_attrs={"config": {"lr": t["lr"], "epochs": 12}, **t.get("attrs", {})},
        ))  # fmt: skip
    return s


def test_the_best_lr_at_the_upper_edge_warns_with_a_wider_range() -> None:
    s = stage([{"lr": 1e-3, "value": 0.8}, {"lr": 2.8e-2, "value": 0.9}])
    found = [line for line in diagnose(s) if "edge" in line]
    # 2.8e-2 is within 10% of the log-span below 3e-2; a categorical never warns.
    assert len(found) == 1 and "lr=0.028" in found[0] and "upper edge" in found[0]
    assert "high: 0.3" in found[0] and "search_spaces/lr.yaml" in found[0]


def test_a_best_lr_inside_its_range_does_not_warn() -> None:
    s = stage([{"lr": 3e-3, "value": 0.9}, {"lr": 2.8e-2, "value": 0.8}])
    assert not [line for line in diagnose(s) if "edge" in line]


def test_a_stage_whose_lr_range_always_diverges_says_so() -> None:
    diverged = {"state": TrialState.PRUNED, "attrs": {"stop_reason": "diverged"}}
    s = stage([{"lr": lr, **diverged} for lr in (5e-3, 1e-2, 2e-2)] + [{"lr": 1e-3, "value": 0.5}])
    found = diagnose(s)
    assert "4 trials: 3 diverged (75%)." in found
    most = [line for line in found if line.startswith("most trials diverged")]
    assert most and "lower the lr range" in most[0] and "0.005" in most[0]


def test_every_loss_near_chance_is_not_learning() -> None:
    attrs = {"loss": 2.29, "confusion_matrix": [[0] * 10] * 10}
    s = stage([{"lr": lr, "value": 0.11, "attrs": attrs} for lr in (1e-3, 3e-3)])
    found = [line for line in diagnose(s) if "not learning" in line]
    assert found and "ln 10 = 2.303" in found[0] and "labels" in found[0]


@pytest.mark.parametrize(
    ("epoch", "says"),
    [(1, "fewer epochs would do"), (6, None), (12, "train longer (epochs=24")],
)
def test_where_the_best_epoch_falls(epoch: int, says: str | None) -> None:
    s = stage([{"lr": 3e-3, "value": 0.9, "attrs": {"best_epoch": epoch}}])
    found = [line for line in diagnose(s) if "peaked at epoch" in line]
    # first 10% of 12 epochs: epoch 1; last 25%: epochs 10-12; in between, nothing to say.
    assert (len(found) == 1 and says in found[0]) if says else not found


def test_a_run_prints_stores_and_shows_the_edge_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fake objective peaks at lr = 1e-2; a space that stops at 3e-3 cuts it off.
    study_file = fake_study.write(tmp_path, trials=6, epochs=1, sleep=0.0)
    module = f"edgeobj_{uuid.uuid4().hex[:8]}"  # not fakeobj: sys.modules keeps what it imports
    (tmp_path / "fakeobj.py").rename(tmp_path / f"{module}.py")
    text = study_file.read_text().replace("fakeobj:train", f"{module}:train")
    # widen: false — with it, the closed loop would widen the range instead (test_closed_loop).
    study_file.write_text(
        text + "search_spaces:\n  lr:\n    lr: {high: 3.0e-3}\nloop:\n  widen: false\n"
    )
    path = list(sys.path)
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["run", f"study={study_file}"]) == 0
    finally:
        sys.path[:] = path
    out = capsys.readouterr().out
    assert "  ! lr=" in out and "upper edge" in out  # printed after the stage
    stored = optuna.load_study(study_name="fake/lr", storage=f"sqlite:///{tmp_path}/tuner.db")
    assert any("upper edge" in line for line in stored.user_attrs["diagnostics"])
    shown = status.show(load_study(str(study_file)))
    assert "! lr=" in shown and "upper edge" in shown


OBJECTIVE = """
def train(config, report, test=False):
    value = 0.9 + 0.01 * config["seed"]
    report(1, {"accuracy": value})
    return {"accuracy": value, "loss": 0.1, "test": {"accuracy": value - 0.02}}
"""


def test_train_repeats_reports_mean_and_std_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"seedobj_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(OBJECTIVE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    document = {"objective": f"{module}:train", "metric": "accuracy", "config": {"seed": 0}}
    lines: list[str] = []
    summary = train(document, str(tmp_path / "out"), {}, lines.append, repeats=3)
    spread = summary["repeats"]
    assert spread["seeds"] == [0, 1, 2]
    assert spread["validation"]["accuracy"]["mean"] == pytest.approx(0.91)
    assert spread["validation"]["accuracy"]["std"] == pytest.approx(0.01)  # n-1
    assert spread["test"]["accuracy"]["mean"] == pytest.approx(0.89)
    assert summary["validation"]["accuracy"] == 0.9  # the exported seed's own run
    assert "validation accuracy 0.9100 ± 0.0100" in lines[-2]
    saved = yamlio.load(tmp_path / "out" / "metrics.yaml")
    assert saved["repeats"]["test"]["accuracy"]["values"] == pytest.approx([0.88, 0.89, 0.90])
    yamlio_file = tmp_path / "best.yaml"
    yamlio_file.write_text(yamlio.dumps(document))
    assert main(["train", "config=best.yaml", "repeats=2", "out=again"]) == 0
    assert yamlio.load(tmp_path / "again" / "metrics.yaml")["repeats"]["seeds"] == [0, 1]
