"""Classification metrics of a model's outputs: cheap ones per epoch, the full set once."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

# Every metric a study may monitor, with the direction in which it gets better.
DIRECTIONS = {
    "accuracy": "maximize",
    "precision_macro": "maximize",
    "recall_macro": "maximize",
    "f1_macro": "maximize",
    "roc_auc": "maximize",
    "loss": "minimize",
}


def epoch_metrics(logits: torch.Tensor, y: torch.Tensor, monitored: str) -> dict[str, float]:
    """Accuracy and loss computed in torch, plus the monitored metric: all an epoch needs.

    Example:
        >>> epoch_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), "accuracy")
        {'accuracy': 0.5, 'loss': 0.7201...}
    """
    out = {"accuracy": _accuracy(logits, y), "loss": _loss(logits, y)}
    if monitored not in out:
        out[monitored] = classification_metrics(logits, y).get(monitored, math.nan)
    return out


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The full validation (or test) report, by scikit-learn, as plain Python values.

    ``roc_auc`` is one-vs-rest macro on softmax probabilities (positive-class probability for
    two classes) and is left out when a class is missing from ``y``. ``loss`` is the
    cross-entropy without label smoothing, computed as in ``epoch_metrics``.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.double(), dim=1).cpu().numpy()  # float64: rows sum to 1
    y_true = y.cpu().numpy()
    y_pred = probs.argmax(axis=1)
    labels = list(range(num_classes))
    out: dict[str, Any] = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": float(
            skm.precision_score(y_true, y_pred, average="macro", zero_division=0)
        ),
        "recall_macro": float(skm.recall_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_macro": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "loss": _loss(logits, y),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    auc = _roc_auc(y_true, probs)
    if not math.isnan(auc):
        out["roc_auc"] = auc
    return out


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return int((logits.argmax(dim=1) == y).sum()) / len(y)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), y))


def _roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(y_true)) < probs.shape[1]:
        return math.nan  # undefined for a class with no positive sample
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
