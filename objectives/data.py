"""Data sets as standardized tensors on the device: train / validation, and test on request.

MNIST-1D and digits are generated or bundled; torchvision's MNIST, FashionMNIST and CIFAR-10
and a user's image folder are read from disk (``objectives._images``), a user's CSV table
through pandas (``objectives._tables``). Sets that fit train from tensors on the device,
indexed directly (torchvision's images augmented there a whole batch at a time); a folder of
image files from a ``DataLoader`` (``data.workers`` processes).
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from objectives._choice import choose

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test
MNIST1D_SEED = 42  # the generator seed of the published MNIST-1D
DIGITS_TEST_SEED = 0  # digits has no test split of its own: carve one, the same for every trial


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N, ...) float32 and targets ``y`` (N,), on one device: integer labels, or
    float values for regression."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of a fresh shuffle drawn from ``generator``, in whole batches."""
        order = torch.randperm(len(self.y), generator=generator).to(self.x.device)
        for i in range(len(self.y) // size):
            batch = order[i * size : (i + 1) * size]
            yield self.x[batch], self.y[batch]


Batch = tuple[torch.Tensor, torch.Tensor]


class Batches:
    """A training split served by a ``DataLoader``: for images decoded from files (and
    augmented per sample). ``y`` holds all labels (on CPU); ``batches`` is ``Split``'s twin."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset[Batch],
        y: torch.Tensor,
        workers: int,
        device: torch.device,
    ) -> None:
        self.dataset, self.y, self.workers, self.device = dataset, y, workers, device
        self._loaders: dict[int, torch.utils.data.DataLoader[Batch]] = {}

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch in whole batches; the shuffle (and augmentation) seed is drawn from
        ``generator`` at the first epoch, and the workers stay up for the next ones."""
        if size not in self._loaders:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            self._loaders[size] = self.loader(size, seed)
        for x, y in self._loaders[size]:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loader(self, size: int, seed: int) -> torch.utils.data.DataLoader[Batch]:
        """A shuffling ``DataLoader`` of its own, seeded: the same batches for the same seed."""
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=size,
            shuffle=True,
            drop_last=True,  # as Split: a partial last batch is dropped
            num_workers=self.workers,
            persistent_workers=self.workers > 0,  # no new processes every epoch
            pin_memory=self.device.type == "cuda",  # page-locked: the copy overlaps compute
            generator=torch.Generator().manual_seed(seed),
        )


@dataclass(frozen=True)
class Data:
    """The training and validation splits and what a model and the test split need to know."""

    train: Split | Batches
    val: Split
    num_classes: int  # classes of a classification task; 1 for regression
    mean: Any  # standardization statistics of the training split, reused for the others:
    std: Any  # one float (MNIST-1D, digits), per channel (images) or per column (tables)
    task: str = "classification"
    input_shape: tuple[int, ...] = ()  # of one sample: (L,) or (C, H, W)
    target_mean: float = 0.0  # regression: the training targets are standardized; the
    target_std: float = 1.0  # predictions go back to the target's units with these
    test_split: Callable[[torch.device], Split] | None = None  # reads the test split

    def unscale(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs in the target's units (regression; unchanged for classification)."""
        if self.task != "regression":
            return outputs
        return outputs * self.target_std + self.target_mean

    def sample(self, n: int) -> Batch:
        """Up to ``n`` training inputs and targets, as they go into the model."""
        if isinstance(self.train, Split):
            return self.train.x[:n], self.train.y[:n]
        x, y = next(iter(self.train.loader(min(n, len(self.train)), seed=0)))
        return x.to(self.val.x.device), y.to(self.val.x.device)


def load(
    data: Mapping[str, Any], seed: int, device: torch.device, *, task: str = "classification"
) -> Data:
    """Carve a stratified validation split from the training data, standardize, move to device.

    The split is fixed by ``seed``; the mean and std come from the training split only.
    The test split is not read here (see ``load_test``).

    Example:
        >>> spec = {"name": "digits", "num_samples": 0, "val_fraction": 0.1}
        >>> d = load(spec, seed=0, device=torch.device("cpu"))
        >>> d.train.x.shape, d.val.x.shape, d.num_classes
        (torch.Size([1293, 64]), torch.Size([144, 64]), 10)

    Args:
        data: The ``data`` block of a trial config: name, num_samples, val_fraction, and the
            keys of the set (root, download, path, target, workers, ...).
        seed: The trial seed.
        device: Where the tensors live.
        task: ``classification`` or ``regression`` (CSV tables only).
    """
    check_data(data, task=task)
    source = SOURCES.get(str(data["name"]))
    if source is not None:
        return source.load(data, seed, device, task)
    x, y = train_arrays(data)
    train_idx, val_idx = stratified_split(y, float(data["val_fraction"]), seed)
    mean, std = standardization(x[train_idx])
    return Data(
        train=_to_split(x[train_idx], y[train_idx], mean, std, device),
        val=_to_split(x[val_idx], y[val_idx], mean, std, device),
        num_classes=int(y.max()) + 1,
        mean=mean,
        std=std,
        input_shape=(x.shape[1],),
    )


def check_data(data: Mapping[str, Any], *, task: str = "classification") -> None:
    """Raise ``ValueError`` for an unknown data set, an impossible split, a set that cannot
    serve ``task``, or files of an on-disk set that are not where its settings say."""
    choose("data.name", data["name"], {**DATASETS, **SOURCES})
    if not 0.0 < float(data["val_fraction"]) < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1) but got {data['val_fraction']!r}.")
    source = SOURCES.get(str(data["name"]))
    if source is not None:
        source.check(data, task)
    elif task != "classification":
        raise ValueError(f"data.name {data['name']} is a classification set but task is {task}.")


def load_test(data: Mapping[str, Any], stats: Data, device: torch.device) -> Split:
    """The test split, standardized with the training statistics of ``stats``."""
    if stats.test_split is not None:
        return stats.test_split(device)
    x, y = test_arrays(data)
    return _to_split(x, y, stats.mean, stats.std, device)


def train_arrays(data: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The training inputs and labels of the configured data set (validation included)."""
    x_train, y_train, _, _ = _arrays(data)
    return x_train, y_train


def test_arrays(data: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The held-out test inputs and labels; only final training reads them."""
    _, _, x_test, y_test = _arrays(data)
    return x_test, y_test


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out) with every class in the same proportion on both sides."""
    indices = np.arange(len(y))
    train_idx, held_idx = train_test_split(
        indices, test_size=fraction, stratify=y, random_state=seed
    )
    return np.sort(train_idx), np.sort(held_idx)


def standardization(x: np.ndarray) -> tuple[float, float]:
    """One mean and std over all values: features share units (signal, pixel intensity), and
    per-feature scaling would blow up near-constant border pixels and break shift invariance."""
    std = float(x.std())
    return float(x.mean()), std if std > 0 else 1.0


def cache_dir() -> Path:
    """Where generated data sets are kept: ``$TUNER_CACHE_DIR``, else ``~/.cache/tuner``."""
    return Path(os.environ.get("TUNER_CACHE_DIR") or Path.home() / ".cache" / "tuner")


def _arrays(data: Mapping[str, Any]) -> Arrays:
    make = choose("data.name", data["name"], DATASETS)
    return make(int(data.get("num_samples", 0)))  # digits has a fixed size


def _to_split(
    x: np.ndarray, y: np.ndarray, mean: float, std: float, device: torch.device
) -> Split:
    inputs = torch.tensor((x - mean) / std, dtype=torch.float32)  # copies: the cache stays put
    return Split(inputs.to(device), torch.tensor(y, dtype=torch.int64).to(device))


@functools.lru_cache(maxsize=4)
def mnist1d(num_samples: int) -> Arrays:
    """MNIST-1D generated locally (never downloaded), cached in-process and on disk."""
    if num_samples < 10:
        raise ValueError(f"data.num_samples must be at least 10 but got {num_samples}.")
    path = cache_dir() / f"mnist1d_n{num_samples}_seed{MNIST1D_SEED}.npz"
    try:
        with np.load(path) as f:
            return _read_only((f["x"], f["y"], f["x_test"], f["y_test"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # missing or unreadable (e.g. an interrupted write elsewhere): generate it
    arrays = _generate_mnist1d(num_samples)
    _save_atomically(path, arrays)
    return _read_only(arrays)


def _generate_mnist1d(num_samples: int) -> Arrays:
    from mnist1d.data import get_dataset_args, make_dataset  # slow import (matplotlib)

    args = get_dataset_args()
    args.num_samples = num_samples  # seed stays 42: at 5000 samples, the published set
    # make_dataset seeds numpy's and random's global generators; leave the caller's as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        d["x"].astype(np.float32),
        d["y"].astype(np.int64),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int64),
    )


def _save_atomically(path: Path, arrays: Arrays) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, x=arrays[0], y=arrays[1], x_test=arrays[2], y_test=arrays[3])
        os.replace(tmp, path)
    except OSError:
        # A read-only or full disk only costs the next process a regeneration.
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def digits() -> Arrays:
    """sklearn's bundled 8x8 digits (1797 samples, all of them: ``num_samples`` is ignored),
    with a fixed stratified 20% test split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16.0  # pixel intensities 0..16
    train_idx, test_idx = stratified_split(y, 0.2, DIGITS_TEST_SEED)
    return _read_only(
        (x[train_idx], y[train_idx].astype(np.int64), x[test_idx], y[test_idx].astype(np.int64))
    )


def _read_only(arrays: Arrays) -> Arrays:
    for a in arrays:
        a.flags.writeable = False  # cached and shared between trials: nobody may edit them
    return arrays


DATASETS: dict[str, Callable[[int], Arrays]] = {
    "mnist1d": mnist1d,
    "digits": lambda num_samples: digits(),
}


@dataclass(frozen=True)
class Source:
    """An on-disk data set: ``check(spec, task)`` raises ``ValueError`` for settings or files
    it cannot use (without reading the data); ``load`` is ``load`` for this set."""

    check: Callable[[Mapping[str, Any], str], None]
    load: Callable[[Mapping[str, Any], int, torch.device, str], Data]


def _later(module: str, function: str) -> Callable[..., Any]:
    """``module.function``, imported at its first call: the on-disk sets' modules import
    torchvision (1.7 s here) and pandas, which MNIST-1D and digits never need."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    return call


TORCHVISION_SETS = ("mnist", "fashion_mnist", "cifar10")  # read by objectives._images
_IMAGES, _TABLES = "objectives._images", "objectives._tables"
SOURCES: dict[str, Source] = {
    **dict.fromkeys(
        TORCHVISION_SETS, Source(_later(_IMAGES, "check"), _later(_IMAGES, "load_torchvision"))
    ),
    "image_folder": Source(_later(_IMAGES, "check"), _later(_IMAGES, "load_folder")),
    "csv": Source(_later(_TABLES, "check"), _later(_TABLES, "load_table")),
}


def random_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out) of ``n`` rows, at random: for regression targets."""
    train_idx, held_idx = train_test_split(np.arange(n), test_size=fraction, random_state=seed)
    return np.sort(train_idx), np.sort(held_idx)
