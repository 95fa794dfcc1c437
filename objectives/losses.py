"""Training losses by name; add one by adding an entry to ``LOSSES``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from objectives._choice import choose


def _cross_entropy(config: Mapping[str, Any]) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=float(config.get("label_smoothing", 0.0)))


# Each entry builds a module ``loss(logits, targets) -> scalar`` from the trial config.
LOSSES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "cross_entropy": _cross_entropy,
}


def build_loss(config: Mapping[str, Any]) -> nn.Module:
    """The training loss of the trial config (``loss`` and its own keys)."""
    check_loss(config)
    return LOSSES[config["loss"]](config)


def check_loss(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown loss or an out-of-range label smoothing."""
    choose("loss", config["loss"], LOSSES)
    smoothing = float(config.get("label_smoothing", 0.0))
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1) but got {smoothing!r}.")
