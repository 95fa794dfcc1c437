"""Training losses by name, and the task each one serves; add one by adding it to ``LOSSES``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from objectives._choice import choose

TASKS = ("classification", "regression")


class _CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy on C logits, with optional label smoothing."""


class _Focal(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, so the easy
    majority-class samples weigh less and the rare classes more; gamma 0 is cross-entropy."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        return (-((1.0 - log_p.exp()) ** self.gamma) * log_p).mean()


class _OneOutput(nn.Module):
    """A loss on one output per sample: ``(N, 1)`` outputs against ``(N,)`` targets as floats."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.squeeze(1), y.to(outputs.dtype))


# Each entry builds a module ``loss(outputs, targets) -> scalar`` from the trial config.
LOSSES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "cross_entropy": lambda c: _CrossEntropy(label_smoothing=float(c.get("label_smoothing", 0))),
    "focal": lambda c: _Focal(float(c.get("focal_gamma", 2.0))),
    "bce": lambda c: _OneOutput(nn.BCEWithLogitsLoss()),  # binary: one logit, labels 0 / 1
    "mse": lambda c: _OneOutput(nn.MSELoss()),
    "mae": lambda c: _OneOutput(nn.L1Loss()),
    "huber": lambda c: _OneOutput(nn.HuberLoss(delta=float(c.get("huber_delta", 1.0)))),
}
# The task each loss serves: a config without ``task`` takes its loss's.
LOSS_TASKS = {
    "cross_entropy": "classification",
    "focal": "classification",
    "bce": "classification",
    "mse": "regression",
    "mae": "regression",
    "huber": "regression",
}


def build_loss(config: Mapping[str, Any]) -> nn.Module:
    """The training loss of the trial config (``loss`` and its own keys).

    Example:
        >>> loss = build_loss({"loss": "mse"})
        >>> float(loss(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0])))
        2.0
    """
    check_loss(config)
    return LOSSES[config["loss"]](config)


def task_of(config: Mapping[str, Any]) -> str:
    """``classification`` or ``regression``: the config's ``task``, else its loss's."""
    task = config.get("task")
    if task is None:
        return LOSS_TASKS.get(str(config["loss"]), "classification")
    return str(task)


def outputs_of(config: Mapping[str, Any], num_classes: int) -> int:
    """How many outputs the model needs: one for regression and for ``bce``, else C."""
    return 1 if task_of(config) == "regression" or config["loss"] == "bce" else num_classes


def check_loss(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown loss or task, a loss of the other task, or an
    out-of-range setting of the loss."""
    choose("loss", config["loss"], LOSSES)
    task = choose("task", task_of(config), dict(zip(TASKS, TASKS, strict=True)))
    if LOSS_TASKS[config["loss"]] != task:
        raise ValueError(
            f"loss {config['loss']} is a {LOSS_TASKS[config['loss']]} loss but task is {task};"
            f" for {task} use one of"
            f" {', '.join(k for k, t in LOSS_TASKS.items() if t == task)}."
        )
    smoothing = float(config.get("label_smoothing", 0.0))
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1) but got {smoothing!r}.")
    if float(config.get("focal_gamma", 2.0)) < 0:
        raise ValueError(f"focal_gamma must be at least 0 but got {config['focal_gamma']!r}.")
    if not float(config.get("huber_delta", 1.0)) > 0:
        raise ValueError(f"huber_delta must be positive but got {config['huber_delta']!r}.")
