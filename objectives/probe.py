"""What tuner's pre-flight checks need from a trial config, without running a trial.

``probe(config)`` builds the data splits, a fresh model and the loss exactly as a trial
would, and hands them over as plain tensors and modules; tuner's checks (initial loss,
tiny-batch overfit, gradient flow, normalization, labels, disjoint splits) run on them.
A user objective may offer the same function beside its ``train`` (``mypkg.module:probe``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from objectives import data as datasets
from objectives.loop import resolve_device, validate
from objectives.losses import build_loss, outputs_of, task_of
from objectives.models import build_model

SAMPLE = 4096  # training samples handed over where the split streams from files (images)


def probe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The splits, a fresh model and the loss of a trial config, as a trial builds them.

    The test split is read for one purpose only: to check that no sample of it is also a
    training or validation sample. Nothing is trained or scored here.

    Example:
        >>> import yaml
        >>> config = yaml.safe_load(open("studies/mnist1d_cnn.yaml"))["defaults"]
        >>> p = probe(config)
        >>> p["x_train"].shape, p["num_classes"]
        (torch.Size([4500, 40]), 10)

    Args:
        config: A trial config (like a study's ``defaults``).

    Returns:
        ``x_train``, ``y_train``, ``x_val``, ``y_val``, ``x_test``, ``y_test`` (tensors as the
        model sees them: standardized, on the device; a training split read from files in
        batches gives its first 4096 samples), ``model`` (a fresh ``nn.Module``, seeded like a
        trial's), ``loss`` (``loss(outputs, targets) -> scalar``), ``num_classes`` and
        ``task`` (``classification`` or ``regression``).
    """
    validate(config)
    device = resolve_device(str(config["device"]))
    seed = int(config["seed"])
    torch.manual_seed(seed)
    task = task_of(config)
    data = datasets.load(config["data"], seed, device, task=task)
    model = build_model(config["model"], data.input_shape, outputs_of(config, data.num_classes))
    x_train, y_train = (
        data.sample(SAMPLE)
        if isinstance(data.train, datasets.Batches)
        else (data.train.x, data.train.y)
    )
    test = datasets.load_test(config["data"], data, device)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": data.val.x,
        "y_val": data.val.y,
        "x_test": test.x,
        "y_test": test.y,
        "model": model.to(device),
        "loss": build_loss(config),
        "num_classes": data.num_classes,
        "task": task,
    }
