"""Objectives: a trial config in, validation metrics out, a ``report`` callback per epoch.

``train`` is the default objective of a study (``objective: objectives:train``); it trains a
PyTorch model on a small data set and never imports Optuna.
"""

from objectives.loop import train, validate
from objectives.probe import probe

__all__ = ["probe", "train", "validate"]
