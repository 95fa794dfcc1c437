"""The objective of bench_overhead.py: a trial that costs only the time it is told to train.

It reports ``epochs`` epochs, computes for ``train_seconds`` spread over them (the "training":
torch matrix products, as a training step keeps the core busy; a sleep would leave the core
idle between epochs, and the engine's code would then run on a cold core, which no real
trial does), and returns the metrics a real classification trial returns
(``objectives.loop``), so the engine records as much as it records for a real trial. Every
trial reports the same curve, so the median pruner stops none and each trial reports every
epoch on both sides of the benchmark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

TRAINED = [0.0]  # seconds spent inside "training" in this process, summed over trials
CLASSES = 10


def curve(epoch: int) -> float:
    """The validation accuracy every trial reports at an epoch."""
    return 0.5 + 0.3 * (1 - 0.7**epoch)


def score(lr: float, schedule: str, warmup: float) -> float:
    """The final value: peaks at lr = 1e-2, cosine, warmup 0.1, so TPE has something to find."""
    value = 0.9 - 0.05 * (math.log10(lr) + 2.0) ** 2 - 0.2 * (warmup - 0.1) ** 2
    return value - 0.01 * (schedule != "cosine")


def train_epoch(seconds: float) -> None:
    """One epoch's "training": matrix products for ``seconds``, their time added to TRAINED
    as measured."""
    if seconds <= 0:
        return
    import torch

    a = torch.ones(128, 128)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        a = torch.mm(a, a).clamp_(max=1.0)  # about 0.5 ms on one thread: bounded, stays finite
    TRAINED[0] += time.perf_counter() - started


def train(
    config: Mapping[str, Any], report: Callable[[int, dict[str, float]], None]
) -> dict[str, Any]:
    epochs = int(config["epochs"])
    per_epoch = float(config.get("train_seconds", 0.0)) / epochs
    for epoch in range(1, epochs + 1):
        train_epoch(per_epoch)
        report(epoch, {"accuracy": curve(epoch), "loss": 2.3 * (1 - curve(epoch))})
    value = score(float(config["lr"]), str(config["schedule"]), float(config["warmup"]))
    matrix = [[10 if i == j else 1 for j in range(CLASSES)] for i in range(CLASSES)]
    return {
        "accuracy": value,
        "precision_macro": value,
        "recall_macro": value,
        "f1_macro": value,
        "loss": 2.3 * (1 - value),
        "confusion_matrix": matrix,
        "roc_auc": 0.99,
        "best_epoch": epochs,
        "epochs_run": epochs,
        "stop_reason": "max_epochs",
        "steps": 12 * 57,
        "samples_per_s": 20_000.0,
        "train_seconds": per_epoch * epochs,
        "peak_memory_mb": 350.0,
        "num_params": 54_000,
        "model": {"weight": [[0.0] * 8] * 8},  # saved as the artifact of each new best trial
    }
