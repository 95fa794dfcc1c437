"""Metrics of a model's outputs, by task: cheap ones per epoch, the full set (scikit-learn) once.

Classification takes C logits per sample, or one logit for a binary task (``bce``);
regression takes one prediction per sample, in the target's own units.
"""

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
    "rmse": "minimize",
    "mae": "minimize",
    "r2": "maximize",
}
# The task whose outputs each metric scores (``loss`` serves both).
METRIC_TASKS = {
    **dict.fromkeys(("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc"),
                    "classification"),
    **dict.fromkeys(("rmse", "mae", "r2"), "regression"),
}  # fmt: skip


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
    logits = _two_columns(logits)
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


def regression_epoch_metrics(
    predictions: torch.Tensor, y: torch.Tensor, monitored: str
) -> dict[str, float]:
    """RMSE, MAE and ``loss`` (the mean squared error) in torch, plus the monitored metric.

    Example:
        >>> predictions, y = torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0])
        >>> regression_epoch_metrics(predictions, y, "rmse")
        {'rmse': 1.4142..., 'mae': 1.0, 'loss': 2.0}
    """
    error = predictions.squeeze(1).double() - y.double()
    mse = float((error**2).mean())
    out = {"rmse": math.sqrt(mse), "mae": float(error.abs().mean()), "loss": mse}
    if monitored not in out:
        out[monitored] = regression_metrics(predictions, y).get(monitored, math.nan)
    return out


def regression_metrics(predictions: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """RMSE, MAE and R² by scikit-learn, and ``loss`` (the mean squared error), as floats."""
    y_pred = predictions.squeeze(1).double().cpu().numpy()
    y_true = y.double().cpu().numpy()
    mse = float(skm.mean_squared_error(y_true, y_pred))
    out = {"rmse": math.sqrt(mse), "mae": float(skm.mean_absolute_error(y_true, y_pred))}
    if len(y_true) > 1:  # R² is undefined for a single sample
        out["r2"] = float(skm.r2_score(y_true, y_pred))
    return {**out, "loss": mse}


def full_metrics(outputs: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, Any]:
    """``classification_metrics`` or ``regression_metrics``, as the task says."""
    if task == "regression":
        return regression_metrics(outputs, y)
    return classification_metrics(outputs, y)


def _two_columns(logits: torch.Tensor) -> torch.Tensor:
    """One binary logit z becomes the logits (0, z): softmax gives sigmoid(z) for class 1."""
    return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return int((_two_columns(logits).argmax(dim=1) == y).sum()) / len(y)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(_two_columns(logits).float(), y))


def _roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(y_true)) < probs.shape[1]:
        return math.nan  # undefined for a class with no positive sample
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
