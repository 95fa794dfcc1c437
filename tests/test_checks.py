"""Pre-flight checks (seeds/003): each planted fault fails its own check, a correct model
passes them all, and a failed check stops `run` before its first stage with exit status 3."""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from objectives.probe import probe
from tests import fake_study
from tuner import checks
from tuner.checks import FAIL, PASS, WARN, Probe, as_probe, run_checks
from tuner.cli import main
from tuner.config import load_study


@pytest.fixture(scope="module")
def digits() -> Probe:
    # digits is bundled with sklearn: no generated-data cache involved.
    return as_probe(probe(load_study("digits_mlp").config))


def with_(p: Probe, **changes: object) -> Probe:
    return dataclasses.replace(p, **changes)  # type: ignore[arg-type]


def test_the_default_study_passes_every_check_in_seconds() -> None:
    p = as_probe(probe(load_study().config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command line runs them (threads=1)
    try:
        started = time.perf_counter()
        results = run_checks(p)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    assert [r.status for r in results] == [PASS] * len(checks.CHECKS), results
    assert seconds < 30  # the bound on 2 cores; about 4 s measured


def test_a_correct_small_model_passes_every_check(digits: Probe) -> None:
    assert {r.name: r.status for r in run_checks(digits)} == dict.fromkeys(
        [r.name for r in run_checks(digits)], PASS
    )


class Disconnected(nn.Module):
    """The seeds/003 bug: a submodule defined and forgotten in forward."""

    def __init__(self, inner: nn.Module, features: int) -> None:
        super().__init__()
        self.inner, self.extra = inner, nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_disconnected_layer_fails_gradient_flow(digits: Probe) -> None:
    result = checks.check_gradients(with_(digits, model=Disconnected(digits.model, 64)))
    assert result.status == FAIL
    assert "extra.weight" in result.measured and "extra.bias" in result.measured


def test_a_zero_head_still_passes_gradient_flow(digits: Probe) -> None:
    # The built-in head starts at zero: hidden layers get no gradient on the first step only.
    assert all(not q.any() for q in digits.model.head.parameters())  # type: ignore[union-attr]
    assert checks.check_gradients(digits).status == PASS


def test_shuffled_labels_fail_learning(digits: Probe) -> None:
    shuffled = digits.y_train[torch.randperm(len(digits.y_train))]
    result = checks.check_learning(with_(digits, y_train=shuffled))
    assert result.status == FAIL, result  # 8 samples are memorized even so: this one tells


def test_inputs_times_1000_fail_normalization(digits: Probe) -> None:
    planted = with_(digits, x_train=digits.x_train * 1000)
    result = checks.check_normalization(planted)
    assert result.status == FAIL and "std 1e+03" in result.measured
    # A zero head hides it from the initial loss (exactly ln C): the normalization check tells.
    assert checks.check_initial_loss(planted).status == PASS


def test_a_large_last_layer_bias_fails_the_initial_loss(digits: Probe) -> None:
    model = _copy(digits.model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] = 10.0  # every sample is confidently class 0
    result = checks.check_initial_loss(with_(digits, model=model))
    assert result.status == FAIL and "chance 2.303" in result.measured


def test_a_model_that_ignores_its_input_fails_to_overfit(digits: Probe) -> None:
    class Constant(nn.Module):  # a broken forward: the same logits for every sample
        def __init__(self) -> None:
            super().__init__()
            self.logits = nn.Parameter(torch.zeros(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(len(x), 10)

    assert checks.check_overfit(with_(digits, model=Constant())).status == FAIL


def test_labels_out_of_range_fail(digits: Probe) -> None:
    result = checks.check_labels(with_(digits, y_val=digits.y_val + 1))
    assert result.status == FAIL and "validation labels span 1..10" in result.measured


def test_imbalanced_classes_warn_and_suggest_focal_loss(digits: Probe) -> None:
    keep = (digits.y_train != 3) | (torch.arange(len(digits.y_train)) % 10 == 0)
    result = checks.check_balance(with_(digits, y_train=digits.y_train[keep]))
    assert result.status == WARN and "focal loss" in result.advice


def test_a_validation_split_taken_from_train_fails_disjointness(digits: Probe) -> None:
    leak = with_(digits, x_val=digits.x_train[:100], y_val=digits.y_train[:100])
    result = checks.check_disjoint(leak)
    assert result.status == FAIL and "train and validation" in result.measured


def test_a_check_that_raises_is_a_failure_not_a_crash(digits: Probe) -> None:
    broken = with_(digits, model=nn.Linear(3, 10))  # the wrong input size
    results = {r.name: r for r in run_checks(broken)}
    assert results["initial_loss"].status == FAIL
    assert "RuntimeError" in results["initial_loss"].measured


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# --- through the command line: a user objective with a probe -----------------------------------

PROBE = '''

import torch
from torch import nn

SCALE = {scale}


def probe(config):
    """Two classes, split by the sign of the first feature; a linear model at zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 8, generator=g)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(8, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = x * SCALE
    return {{
        "x_train": x[:600], "y_train": y[:600], "x_val": x[600:750], "y_val": y[600:750],
        "x_test": x[750:], "y_test": y[750:], "model": model, "loss": nn.CrossEntropyLoss(),
        "num_classes": 2,
    }}
'''


def _user_study(folder: Path, scale: float | None) -> Path:
    """A one-stage study whose objective module (a fresh name) has a probe, or none."""
    study = fake_study.write(folder, trials=2, epochs=1, sleep=0.0)
    module = f"probeobj_{uuid.uuid4().hex[:8]}"
    text = (folder / "fakeobj.py").read_text()
    (folder / f"{module}.py").write_text(text + (PROBE.format(scale=scale) if scale else ""))
    study.write_text(study.read_text().replace("fakeobj:train", f"{module}:train"))
    return study


def _main(folder: Path, *args: str) -> int:
    path = list(sys.path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        try:
            return main(list(args))
        finally:
            sys.path[:] = path


def test_run_stops_with_exit_3_before_stage_1_when_a_check_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _user_study(tmp_path, scale=1000.0)
    assert _main(tmp_path, "run", f"study={study}") == 3
    captured = capsys.readouterr()
    assert "FAIL  inputs normalized" in captured.out
    assert captured.err.startswith("tuner: pre-flight check 'inputs normalized' failed")
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "tuner.db").exists()  # before stage 1: nothing written


def test_check_false_skips_the_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _user_study(tmp_path, scale=1000.0)
    assert _main(tmp_path, "run", f"study={study}", "check=false") == 0
    assert "pre-flight" not in capsys.readouterr().out
    trials = optuna.load_study(study_name="fake/lr", storage=f"sqlite:///{tmp_path}/tuner.db")
    assert len(trials.trials) == 2


def test_check_command_passes_a_good_probe_and_fails_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _user_study(tmp_path, scale=1.0)
    assert _main(tmp_path, "check", f"study={good}") == 0
    assert "checks: 8 passed, 0 warned, 0 failed" in capsys.readouterr().out
    bad = _user_study(tmp_path, scale=1000.0)
    assert _main(tmp_path, "check", f"study={bad}") == 3


def test_an_objective_without_a_probe_passes_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _user_study(tmp_path, scale=None)
    assert _main(tmp_path, "check", f"study={study}") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "offers no probe(config); nothing checked" in out[0]


def test_checks_are_due_at_the_first_stage_or_the_first_unfinished_one(tmp_path: Path) -> None:
    from tuner import storage as storages

    study = load_study()
    url = f"sqlite:///{tmp_path}/t.db"
    storage = storages.open_storage(url)
    assert checks.due(study, "batch_size", storage)  # the study's first stage: always
    assert checks.due(study, "lr", None) is False  # batch_size is unfinished: it comes first
    done = optuna.create_study(study_name="mnist1d_cnn/batch_size", storage=storage)
    for _ in range(study.trials["batch_size"]):
        done.add_trial(optuna.trial.create_trial(value=0.5))
    assert checks.due(study, "lr", storage)  # now lr is the first unfinished stage
    assert not checks.due(study, "optimizer", storage)
