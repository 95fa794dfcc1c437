"""objectives: data splits, models, optimizers and schedules, metrics, and the training loop.

Real torch, tiny runs: sklearn's digits with a small MLP or CNN trains an epoch in milliseconds.
Rules that need a particular history (patience, the monitored direction) script the
per-epoch metrics instead of hoping a real run produces it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import objectives
from objectives import data, loop, metrics, models, optim

STUDY = Path(__file__).resolve().parents[1] / "studies" / "mnist1d_cnn.yaml"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from a second thread, and a busy second core stalls them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes: Any) -> dict[str, Any]:
    """A trial config that trains in a blink: digits, an MLP of 16 units, 2 epochs."""
    config: dict[str, Any] = {
        "seed": 0,
        "device": "cpu",
        "precision": "auto",
        "data": {"name": "digits", "num_samples": 0, "val_fraction": 0.2},
        "model": {
            "name": "mlp",
            "width": 16,
            "depth": 1,
            "kernel_size": 3,
            "dropout": 0.0,
            "norm": "batch",
            "activation": "relu",
            "init": "he",
        },
        "loss": "cross_entropy",
        "label_smoothing": 0.0,
        "batch_size": 64,
        "lr": 0.01,
        "schedule": "constant",
        "warmup": 0.0,
        "optimizer": "adam",
        "momentum": 0.9,
        "beta1": 0.9,
        "beta2": 0.999,
        "weight_decay": 0.0,
        "epochs": 2,
        "patience": 3,
        "time_budget": None,
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def facts(result: dict[str, Any]) -> tuple[str, int, int]:
    """Why a run stopped, its best epoch and how many epochs it finished."""
    return result["stop_reason"], result["best_epoch"], result["epochs_run"]


def plain(result: dict[str, Any]) -> dict[str, Any]:
    """A result without the model and the timings, which differ between equal runs."""
    drop = {"model", "train_seconds", "samples_per_s", "peak_memory_mb"}
    return {k: v for k, v in result.items() if k not in drop}


# --- data ------------------------------------------------------------------------------------


def test_stratified_split_keeps_proportions_is_disjoint_and_seeded() -> None:
    y = np.repeat(np.arange(4), [40, 80, 120, 160])
    train, held = data.stratified_split(y, 0.25, seed=3)
    # every sample lands on exactly one side
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(y)
    # each class keeps its share of the data on the held-out side
    assert np.bincount(y[held]).tolist() == [10, 20, 30, 40]
    # the same seed gives the same split
    assert all(
        np.array_equal(a, b)
        for a, b in zip(data.stratified_split(y, 0.25, 3), (train, held), strict=True)
    )
    # another seed gives another split
    assert not np.array_equal(data.stratified_split(y, 0.25, seed=4)[1], held)


def test_validation_split_of_digits_is_stratified_and_seeded() -> None:
    spec = {"name": "digits", "num_samples": 0, "val_fraction": 0.2}
    a, b = data.load(spec, 0, CPU), data.load(spec, 1, CPU)
    counts = torch.bincount(a.val.y, minlength=10)
    # each of the 10 classes holds about a tenth of the validation split
    assert int(counts.max() - counts.min()) <= 2
    # 20% of digits' 1437 training rows (its fixed test split is 360 rows) are held out
    assert (len(a.train.y), len(a.val.y)) == (1149, 288)
    # the trial seed picks the validation rows
    assert not torch.equal(a.val.x, b.val.x)


def test_standardization_uses_training_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25)
    train_idx, val_idx = data.stratified_split(y, 0.2, seed=0)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    x[val_idx] += 1000.0  # validation rows far away: they would drag any shared statistic
    monkeypatch.setattr(data, "train_arrays", lambda spec: (x, y))
    monkeypatch.setattr(data, "test_arrays", lambda spec: (x[:5] + 500.0, y[:5]))
    spec = {"name": "digits", "num_samples": 0, "val_fraction": 0.2}
    d = data.load(spec, 0, CPU)
    # the statistics are the training rows' own
    assert (d.mean, d.std) == data.standardization(x[train_idx])
    # training inputs come out standardized
    assert abs(float(d.train.x.mean())) < 1e-5 and abs(float(d.train.x.std()) - 1) < 1e-2
    # validation inputs are shifted by the training statistics, not centred on their own
    assert float(d.val.x.mean()) > 100
    # the test split is scaled with the same training statistics
    expected = torch.tensor((x[:5] + 500.0 - d.mean) / d.std)
    assert torch.allclose(data.load_test(spec, d, CPU).x, expected)


def test_mnist1d_is_generated_once_then_read_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path))
    data.mnist1d.cache_clear()
    np.random.seed(123)
    random.seed(123)
    first = data.mnist1d(100)
    # the package's own 80/20 train/test split, 40-sample signals
    assert first[0].shape == (80, 40) and first[2].shape == (20, 40)
    # generating leaves the caller's global random generators as they were
    assert np.random.random() == np.random.RandomState(123).random_sample()
    # (both of them: numpy's and Python's)
    assert random.random() == random.Random(123).random()
    # one .npz in the cache folder and no temporary file left behind (atomic write)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]
    # in-process cache: the second call does not even read the disk
    assert data.mnist1d(100) is first
    data.mnist1d.cache_clear()
    monkeypatch.setattr(data, "_generate_mnist1d", lambda n: pytest.fail("regenerated"))
    second = data.mnist1d(100)
    # a new process reads exactly the generated arrays back
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    data.mnist1d.cache_clear()


# --- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", models.NORMS)
@pytest.mark.parametrize("activation", list(models.ACTIVATIONS))
@pytest.mark.parametrize("init", models.INITS)
def test_every_model_builds_and_takes_a_step(norm: str, activation: str, init: str) -> None:
    for name, depth in itertools.product(("cnn1d", "mlp"), range(1, 7)):
        spec = {
            "name": name,
            "width": 8,
            "depth": depth,
            "kernel_size": 3,
            "dropout": 0.1,
            "norm": norm,
            "activation": activation,
            "init": init,
        }
        net = models.build_model(spec, input_length=40, num_classes=10)
        out = net(torch.randn(4, 40))
        out.logsumexp(dim=1).mean().backward()
        # one logit per class for every sample
        assert out.shape == (4, 10), spec
        # every parameter gets a finite gradient
        assert all(
            p.grad is not None and bool(p.grad.isfinite().all()) for p in net.parameters()
        ), spec


@pytest.mark.parametrize(
    ("width", "depth", "kernel_size", "length"),
    [(1, 1, 1, 8), (3, 8, 2, 40), (8, 8, 9, 64), (64, 8, 7, 40), (12, 5, 5, 5), (128, 2, 3, 40)],
)
def test_cnn_scales_in_width_depth_kernel_and_length(
    width: int, depth: int, kernel_size: int, length: int
) -> None:
    spec = {
        "name": "cnn1d",
        "width": width,
        "depth": depth,
        "kernel_size": kernel_size,
        "dropout": 0.0,
        "norm": "group",
        "activation": "gelu",
        "init": "he",
    }
    net = models.build_model(spec, input_length=length, num_classes=3)
    # any depth fits any signal length (downsampling stops at 2 samples)
    assert net(torch.randn(2, length)).shape == (2, 3)
    widest = max(m.out_channels for m in net.modules() if isinstance(m, nn.Conv1d))
    # channels double after each downsampling, at most 4x the width
    assert widest <= models.MAX_WIDENING * width


def test_group_norm_uses_at_most_8_groups_that_divide_the_channels() -> None:
    for channels in range(1, 70):
        groups = models._groups(channels)
        # at most 8 groups, dividing the channels evenly
        assert groups <= 8 and channels % groups == 0
        # and the most such groups
        assert all(channels % g for g in range(groups + 1, min(8, channels) + 1))


def test_the_head_starts_at_zero_so_every_class_has_equal_odds() -> None:
    spec = tiny()["model"] | {"init": "xavier"}
    net = models.build_model(spec, input_length=64, num_classes=10)
    # zero logits at initialization: the first loss is exactly ln C
    assert torch.equal(net(torch.randn(5, 64)), torch.zeros(5, 10))


# --- optimizers and schedules ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_each_optimizer_gets_its_own_hyperparameters(name: str) -> None:
    config = tiny(optimizer=name, lr=0.05, momentum=0.8, beta1=0.7, beta2=0.95, weight_decay=0.01)
    group = optim.build_optimizer(nn.Linear(2, 2).parameters(), config).param_groups[0]
    # lr and weight decay reach every optimizer
    assert (group["lr"], group["weight_decay"]) == (0.05, 0.01)
    if name in ("adam", "adamw"):
        # betas come from beta1 / beta2
        assert group["betas"] == (0.7, 0.95)
    else:
        # momentum reaches SGD and RMSprop
        assert group["momentum"] == 0.8


def test_sgd_is_nesterov_only_with_momentum() -> None:
    def nesterov(momentum: float) -> bool:
        config = tiny(optimizer="sgd", momentum=momentum)
        return bool(
            optim.build_optimizer(nn.Linear(2, 2).parameters(), config).param_groups[0]["nesterov"]
        )

    # Nesterov with momentum, plain SGD without (torch rejects Nesterov at momentum 0)
    assert nesterov(0.9) and not nesterov(0.0)


def lrs(schedule: str, warmup: float, total: int, lr: float = 1.0) -> list[float]:
    """The learning rate of each of ``total`` steps (and after the last one)."""
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=lr, betas=(0.85, 0.99))
    sched = optim.build_schedule(opt, tiny(schedule=schedule, warmup=warmup, lr=lr), total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # the tuned betas stay as set (OneCycleLR would cycle them)
    assert opt.param_groups[0]["betas"] == (0.85, 0.99)
    return seen


@pytest.mark.parametrize(
    ("schedule", "warmup", "first", "peak_step", "last_below"),
    [
        ("constant", 0.0, 1.0, 0, 1.01),  # flat at lr
        ("constant", 0.2, 0.05, 19, 1.01),  # linear ramp over 20 of 100 steps, then flat
        ("cosine", 0.0, 1.0, 0, 0.01),  # from lr down to ~0
        ("cosine", 0.1, 0.1, 9, 0.01),  # ramp, then cosine to ~0
        ("onecycle", 0.2, 0.04, 19, 0.001),  # torch's one-cycle: lr/25 up to lr, down to ~0
    ],
)
def test_schedules_ramp_to_the_peak_then_follow_their_shape(
    schedule: str, warmup: float, first: float, peak_step: int, last_below: float
) -> None:
    seen = lrs(schedule, warmup, 100)
    # the first step's learning rate
    assert seen[0] == pytest.approx(first, rel=1e-3)
    # the configured lr is the peak, reached when the warm-up ends
    assert max(seen) == pytest.approx(1.0) and seen.index(max(seen)) == peak_step
    # where the schedule ends
    assert seen[-1] < last_below


@pytest.mark.parametrize("schedule", list(optim.SCHEDULES))
@pytest.mark.parametrize("warmup", [0.0, 0.2, 0.5, 1.0])
def test_schedules_survive_very_short_runs(schedule: str, warmup: float) -> None:
    for total in range(1, 8):
        seen = lrs(schedule, warmup, total)
        # a time budget may buy a handful of steps: every one gets a finite, positive lr
        assert all(0 < lr <= 1.0 and math.isfinite(lr) for lr in seen), (total, seen)


# --- metrics ---------------------------------------------------------------------------------


def test_full_metrics_match_the_cheap_ones_and_are_plain_values() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, 3, generator=g), torch.randint(3, (50,), generator=g)
    full = metrics.classification_metrics(logits, y)
    cheap = metrics.epoch_metrics(logits, y, "f1_macro")
    # the per-epoch values equal the full report's (same definitions)
    assert {k: full[k] for k in cheap} == cheap
    # the full report holds every documented metric
    assert set(full) == {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "roc_auc",
        "loss",
        "confusion_matrix",
    }
    # plain JSON values
    assert json.loads(json.dumps(full)) == full
    # the confusion matrix counts every sample once
    assert sum(map(sum, full["confusion_matrix"])) == 50


def test_roc_auc_is_left_out_when_a_class_is_missing_and_binary_uses_one_column() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    # class 2 never occurs: its one-vs-rest AUC is undefined, so roc_auc is omitted
    assert "roc_auc" not in metrics.classification_metrics(logits, torch.tensor([0, 1, 1]))
    binary = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 2.0], [0.0, -2.0]])
    # binary AUC ranks the positive-class probability: perfectly separated here
    assert metrics.classification_metrics(binary, torch.tensor([1, 0, 1, 0]))["roc_auc"] == 1.0


# --- the training loop -----------------------------------------------------------------------


def test_result_holds_the_documented_keys_as_plain_values() -> None:
    config = tiny()
    frozen = copy.deepcopy(config)
    result = objectives.train(config)
    # the config is read, never changed
    assert config == frozen
    expected = {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "roc_auc",
        "loss",
        "confusion_matrix",
        "train_loss",
        "best_epoch",
        "epochs_run",
        "stop_reason",
        "steps",
        "samples_per_s",
        "train_seconds",
        "peak_memory_mb",
        "num_params",
        "model",
    }
    # the validation metrics of the best epoch and the run's facts, nothing else
    assert set(result) == expected
    rest = {k: v for k, v in result.items() if k != "model"}
    # everything but the model is plain JSON (no numpy or torch scalars)
    assert json.loads(json.dumps(rest)) == rest
    # the model comes back on the CPU
    assert next(result["model"].parameters()).device == CPU
    # 2 epochs of 17 full batches (1149 rows // 64): the partial last batch is dropped
    assert (result["epochs_run"], result["steps"], result["stop_reason"]) == (2, 34, "max_epochs")


def test_same_config_gives_bit_identical_results() -> None:
    config = tiny(model={"name": "cnn1d", "width": 4, "depth": 2, "dropout": 0.2})
    a, b = objectives.train(config), objectives.train(config)
    # every metric equal, to the last bit
    assert plain(a) == plain(b)
    # and the same weights
    assert all(
        torch.equal(p, q)
        for p, q in zip(
            a["model"].state_dict().values(), b["model"].state_dict().values(), strict=True
        )
    )
    # another seed trains another model
    assert plain(objectives.train(tiny(seed=1))) != plain(objectives.train(tiny()))


def test_report_is_called_once_per_epoch_with_the_validation_metrics() -> None:
    calls: list[tuple[int, dict[str, float]]] = []
    result = objectives.train(tiny(epochs=3, patience=None), lambda e, m: calls.append((e, m)))
    # epochs 1, 2, 3, in order
    assert [epoch for epoch, _ in calls] == [1, 2, 3]
    # accuracy, validation loss and training loss
    assert all({"accuracy", "loss", "train_loss"} <= set(m) for _, m in calls)
    # as Python floats
    assert all(type(v) is float for _, m in calls for v in m.values())
    # the result repeats what was reported for the best epoch
    best = calls[result["best_epoch"] - 1][1]
    assert {k: result[k] for k in best} == best


def test_monitoring_f1_reports_it_each_epoch() -> None:
    seen: list[dict[str, float]] = []
    objectives.train(tiny(metric="f1_macro", direction="maximize"), lambda e, m: seen.append(m))
    # the monitored metric is reported, so the pruner can read it
    assert all("f1_macro" in m for m in seen)


class Pruned(Exception):
    pass


@pytest.mark.parametrize("error", [Pruned, torch.OutOfMemoryError])
def test_an_exception_raised_by_report_propagates(error: type[Exception]) -> None:
    def report(epoch: int, m: dict[str, float]) -> None:
        if epoch == 2:
            raise error("stop here")

    # pruning works by raising in report: never caught, not even an out-of-memory error
    with pytest.raises(error, match="stop here"):
        objectives.train(tiny(epochs=4), report)


def scripted(
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    values: list[float],
    losses: list[float] | None = None,
) -> None:
    """Replace the per-epoch metrics with a scripted history of ``key`` (and of ``loss``)."""
    history: Iterator[float] = iter(values)
    loss_history: Iterator[float] = iter(losses or [1.0] * len(values))

    def fake(logits: torch.Tensor, y: torch.Tensor, monitored: str) -> dict[str, float]:
        return {"accuracy": 0.5, "loss": next(loss_history)} | {key: next(history)}

    monkeypatch.setattr(loop, "epoch_metrics", fake)


def test_patience_stops_after_epochs_without_improvement(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, "accuracy", [0.5, 0.6, 0.6, 0.55, 0.9, 0.9])
    result = objectives.train(tiny(epochs=6, patience=2))
    # epoch 2 is best; a tie (at the same loss) is no improvement: epochs 3 and 4 use it up
    assert facts(result) == ("patience", 2, 4)
    # the returned value is the best epoch's
    assert result["accuracy"] == 0.6


def test_patience_running_out_at_the_last_epoch_is_the_planned_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted(monkeypatch, "accuracy", [0.9, 0.5, 0.5])
    result = objectives.train(tiny(epochs=3, patience=2))
    # nothing was cut short: the run stopped because its epochs were done
    assert facts(result) == ("max_epochs", 1, 3)


def test_a_tie_on_the_metric_goes_to_the_lower_validation_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted(monkeypatch, "accuracy", [0.8, 0.9, 0.9, 0.9], losses=[0.5, 0.4, 0.3, 0.35])
    result = objectives.train(tiny(epochs=4, patience=None))
    # epochs 2-4 tie on accuracy; epoch 3 has the lowest loss among them
    assert (result["best_epoch"], result["loss"]) == (3, 0.3)


def test_loss_is_monitored_downwards(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, "loss", [1.0, 0.4, 0.7])
    result = objectives.train(tiny(epochs=3, metric="loss", direction="minimize"))
    # the lowest validation loss marks the best epoch
    assert (result["best_epoch"], result["loss"]) == (2, 0.4)


def test_the_best_epochs_weights_are_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []
    real = loop._clone_state

    def clone(model: nn.Module) -> dict[str, torch.Tensor]:
        snapshots.append(real(model))
        return snapshots[-1]

    monkeypatch.setattr(loop, "_clone_state", clone)
    scripted(monkeypatch, "accuracy", [0.1, 0.9, 0.2])
    result = objectives.train(tiny(epochs=3, patience=None))
    # the returned model holds epoch 2's weights, not the last epoch's
    assert all(torch.equal(v, snapshots[1][k]) for k, v in result["model"].state_dict().items())


def test_a_huge_learning_rate_diverges_at_once() -> None:
    result = objectives.train(tiny(optimizer="sgd", lr=1e3, epochs=3))
    # the loss blew up within the first epoch: stopped there
    assert facts(result) == ("diverged", 0, 0)
    # no epoch finished, so no metric is returned
    assert "accuracy" not in result and "loss" not in result


def test_divergence_after_an_epoch_keeps_the_best_epochs_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NaNLater(nn.Module):
        """Cross-entropy that turns NaN at the 20th batch (epoch 2 of 17-batch epochs)."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            loss = nn.functional.cross_entropy(logits, y)
            return loss * math.nan if self.calls >= 20 else loss

    monkeypatch.setattr(loop, "build_loss", lambda config: NaNLater())
    result = objectives.train(tiny(epochs=3))
    # a non-finite loss stops the run mid-epoch
    assert (result["stop_reason"], result["epochs_run"], result["steps"]) == ("diverged", 1, 19)
    # the metrics are those of the one finished epoch
    assert result["best_epoch"] == 1 and 0 < result["accuracy"] <= 1


@pytest.mark.parametrize("factor", [1, 2])
def test_time_budget_buys_a_step_count_from_the_measured_throughput(
    monkeypatch: pytest.MonkeyPatch, factor: int
) -> None:
    monkeypatch.setattr(loop, "_throughput", lambda *args: 1000.0 * factor)
    # 1.92 s at 1000 samples/s and batch 64 is 30 steps (60 at twice the speed)
    result = objectives.train(tiny(time_budget=1.92, epochs=1, patience=None))
    # the step count is budget x throughput / batch size
    assert result["steps"] == 30 * factor
    # epochs of 17 steps, the last one partial: ceil(steps / 17)
    assert result["epochs_run"] == math.ceil(30 * factor / 17)
    # used up its steps: stopped by the budget
    assert result["stop_reason"] == "time_budget"
    # the probe's speed is recorded
    assert result["probe_samples_per_s"] == 1000.0 * factor


def test_time_budget_probe_measures_real_throughput() -> None:
    result = objectives.train(tiny(time_budget=0.05))
    # the probe ran and timed some training steps
    assert result["probe_samples_per_s"] > 0 and result["steps"] >= 1
    # steps = budget x measured throughput / batch size, rounded
    assert result["steps"] == max(1, round(0.05 * result["probe_samples_per_s"] / 64))


def test_test_split_is_scored_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    result = objectives.train(tiny(), test=True)
    # test=True adds the same metrics on the test split
    assert set(result["test"]) >= {"accuracy", "f1_macro", "loss", "confusion_matrix"}
    # scored on all 360 rows of digits' fixed test split
    assert sum(map(sum, result["test"]["confusion_matrix"])) == 360
    monkeypatch.setattr(data, "test_arrays", lambda spec: pytest.fail("read the test split"))
    # without test=True the test split is never read
    assert "test" not in objectives.train(tiny())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"optimizer": "adamx"},
            "optimizer must be one of sgd, adam, adamw, rmsprop but got 'adamx'.",
        ),
        (
            {"data": {"name": "cifar"}},
            "data.name must be one of mnist1d, digits, mnist, fashion_mnist, cifar10,"
            " image_folder, csv but got 'cifar'.",
        ),
        (
            {"model": {"name": "vit"}},
            "model.name must be one of cnn1d, mlp, cnn2d, resnet18 but got 'vit'.",
        ),
        (
            {"model": {"norm": "weight"}},
            "model.norm must be one of none, batch, group, layer but got 'weight'.",
        ),
        (
            {"model": {"activation": "tanh"}},
            "model.activation must be one of relu, leaky_relu, gelu but got 'tanh'.",
        ),
        (
            {"model": {"init": "orthogonal"}},
            "model.init must be one of he, xavier, default but got 'orthogonal'.",
        ),
        (
            {"schedule": "step"},
            "schedule must be one of constant, cosine, onecycle but got 'step'.",
        ),
        (
            {"loss": "hinge"},
            "loss must be one of cross_entropy, focal, bce, mse, mae, huber but got 'hinge'.",
        ),
        (
            {"loss": "mse", "task": "classification"},
            "loss mse is a regression loss but task is classification;",
        ),
        ({"loss": "mse"}, "data.name digits is a classification set but task is regression."),
        ({"metric": "rmse"}, "metric rmse scores regression but task is classification;"),
        (
            {"metric": "loss", "direction": "maximize"},
            "direction is maximize but loss gets better when it goes down",
        ),
        ({"metric": "auc"}, "metric must be one of accuracy, precision_macro, recall_macro,"),
        ({"model": {"depth": 0}}, "model.depth must be at least 1 but got 0."),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction must be in (0, 1) but got 1.5."),
        ({"device": "tpu:x"}, "device must be auto, cpu or cuda[:N] but got 'tpu:x'."),
        ({"precision": "fp8"}, "precision must be one of auto, fp32, bf16, fp16 but got 'fp8'."),
    ],
)
def test_invalid_values_are_one_clear_error(changes: dict[str, Any], message: str) -> None:
    # a ValueError that names the key, the allowed values and what came
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        objectives.train(tiny(**changes))


def test_out_of_memory_is_a_result_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Linear(64, 10))
            self.head = nn.Sequential()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ...")

    monkeypatch.setattr(loop, "build_model", lambda *args: Hungry())
    result = objectives.train(tiny())
    # an allocation failure ends the trial with a reason and no metric
    assert result["stop_reason"] == "out_of_memory" and "accuracy" not in result

    def no_memory(*args: Any) -> nn.Module:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "build_model", no_memory)
    # torch's own out-of-memory error too
    assert objectives.train(tiny())["stop_reason"] == "out_of_memory"


def test_auto_device_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # auto means CUDA only when there is one
    assert loop.resolve_device("auto") == CPU


# --- precision and the GPU path --------------------------------------------------------------


def test_auto_precision_on_the_cpu_is_plain_float32() -> None:
    cnn = {"name": "cnn1d", "width": 4, "depth": 2}
    fp32 = objectives.train(tiny(model=cnn, precision="fp32"))
    auto = objectives.train(tiny(model=cnn, precision="auto"))
    unset = tiny(model=cnn)
    del unset["precision"]
    # auto is fp32 on a CPU: the same numbers to the last bit
    assert plain(auto) == plain(fp32)
    # a config without the key (an older export) is auto
    assert plain(objectives.train(unset)) == plain(fp32)


def test_bf16_autocast_trains_on_the_cpu_and_scores_in_float32() -> None:
    cnn = {"name": "cnn1d", "width": 4, "depth": 2}
    bf16 = objectives.train(tiny(model=cnn, precision="bf16"))
    fp32 = objectives.train(tiny(model=cnn, precision="fp32"))
    # it trains and scores like any run
    assert facts(bf16) == ("max_epochs", 2, 2) and 0 < bf16["accuracy"] <= 1
    # the forward passes really ran in bfloat16: other numbers than fp32's
    assert plain(bf16) != plain(fp32)
    # autocast leaves the weights in float32
    assert all(p.dtype == torch.float32 for p in bf16["model"].parameters())
    mixed = loop._Mixed(torch.bfloat16, CPU)
    outputs = loop._predict(bf16["model"], torch.randn(5, 64), mixed)
    # evaluation runs under autocast but hands float32 outputs to the metrics
    assert outputs.dtype == torch.float32


def test_only_fp16_scales_the_loss() -> None:
    # fp16's small gradients underflow without a scaler; bf16 keeps fp32's range
    assert loop._Mixed(torch.float16, CPU).scaler.is_enabled()
    assert not loop._Mixed(torch.bfloat16, CPU).scaler.is_enabled()
    assert not loop._Mixed(None, CPU).scaler.is_enabled()
    result = objectives.train(tiny(precision="fp16"))
    # an fp16 run with its scaler trains to the end
    assert facts(result)[0] == "max_epochs" and 0 < result["accuracy"] <= 1


def test_auto_precision_is_bf16_on_a_gpu_that_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    # auto on a bf16 GPU autocasts to bfloat16
    assert loop.resolve_precision("auto", gpu) == torch.bfloat16
    # fp32 stays fp32, fp16 is fp16
    assert loop.resolve_precision("fp32", gpu) is None
    assert loop.resolve_precision("fp16", gpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    # without bf16, auto falls back to fp32
    assert loop.resolve_precision("auto", gpu) is None
    # asking for bf16 there is one clear error
    with pytest.raises(ValueError, match=r"^precision bf16 needs a GPU with bfloat16 but cuda"):
        loop.resolve_precision("bf16", gpu)


def test_cuda_gets_tf32_and_the_cudnn_autotuner_unless_fp32_is_asked() -> None:
    flags = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        loop._tune_cuda(exact=False)
        # TF32 matmuls and convolutions, and cuDNN picks its fastest algorithm
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        loop._tune_cuda(exact=True)
        # precision fp32 is exact float32: TF32 off again (the flags are process-wide)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = flags


def test_training_steps_read_nothing_back_from_the_device() -> None:
    run = loop._prepare(tiny(optimizer="sgd", epochs=3), CPU)
    run.watch.per_step = False  # as on a GPU: the divergence check once per epoch

    def reads(steps: int) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run._steps(steps)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")

    # every host read of a tensor (item, float, bool) would stall a GPU: only the epoch's
    # mean loss and the divergence check read, however many steps the epoch has
    assert reads(2) == reads(10) == 3


def test_optimizers_take_torchs_fastest_update_and_its_values() -> None:
    for name in optim.OPTIMIZERS:
        nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
        nets[1].load_state_dict(nets[0].state_dict())
        ours = optim.build_optimizer(nets[0].parameters(), tiny(optimizer=name))
        # fused (one kernel per step; on a GPU fp16 scaling without a sync), or foreach where
        # torch has no fused update (RMSprop)
        assert (ours.defaults.get("fused"), ours.defaults.get("foreach")) == (
            (None, True) if name == "rmsprop" else (True, None)
        ), name
        plain = type(ours)(nets[1].parameters(), **_plain_arguments(ours))  # torch's default
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        for _ in range(20):
            for net, opt in zip(nets, (ours, plain), strict=True):
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
        # the same weights as torch's default update, to within float rounding
        torch.testing.assert_close(nets[0].weight, nets[1].weight, rtol=1e-5, atol=1e-6)


def _plain_arguments(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The arguments an optimizer was built with, less its choice of implementation."""
    keys = ("lr", "momentum", "nesterov", "betas", "weight_decay")
    return {k: opt.defaults[k] for k in keys if k in opt.defaults}


def test_the_default_study_config_is_valid() -> None:
    defaults = yaml.safe_load(STUDY.read_text())["defaults"]
    loop.validate(defaults)
    net = models.build_model(defaults["model"], input_length=40, num_classes=10)
    # the default cnn1d is a small model: conv-BN-GELU blocks [w, w, pool, 2w, 2w]
    assert sum(p.numel() for p in net.parameters()) == 37034


@pytest.mark.slow
def test_default_config_reaches_99_percent_test_accuracy_on_mnist1d() -> None:
    defaults = yaml.safe_load(STUDY.read_text())["defaults"]
    result = objectives.train(defaults, test=True)  # one thread, as measured
    # the published bar for a small CNN on MNIST-1D (measured 99.1% with seed 0)
    assert result["test"]["accuracy"] >= 0.99
