"""Image data sets read from disk: torchvision's MNIST, FashionMNIST and CIFAR-10, and a
user's own folder of images (one subfolder per class, torchvision's ``ImageFolder``).

Nothing is downloaded unless ``data.download`` is true. Inputs are normalized per channel
with the training split's statistics; augmentation (random crop, horizontal flip) applies to
the training split only. torchvision's sets are held in memory, on the device, and augmented a
whole batch at a time there (``Augmented``); a folder's images are decoded and augmented per
sample by a ``DataLoader`` with ``data.workers`` processes.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from objectives.data import Batch, Batches, Data, Split, stratified_split

FOLDER_TEST_SEED = 0  # a folder has no test split of its own: carve one, the same every trial
SUBSAMPLE_SEED = 0  # data.num_samples takes the same training images in every trial
STATS_SAMPLES = 2000  # training images read to estimate a folder's channel statistics


class _CIFAR10:
    """CIFAR-10's pickled batches, read with an unpickler that admits only what the format
    holds (a dict of numpy arrays, lists, bytes and str): a crafted pickle in ``data_batch_1``
    could run any code under ``pickle.load``, which is what torchvision calls. The files are
    checked for presence, not by MD5 on every load (170 MB); a download is MD5-checked."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        cls = torchvision.datasets.CIFAR10
        folder = Path(root) / cls.base_folder
        names = [n for n, _ in (cls.train_list if train else cls.test_list)]
        if download and not all((folder / n).is_file() for n in _CIFAR):
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        data, self.targets = [], []
        for name in names:
            entry = _unpickle(folder / name)
            labels = entry.get("labels", entry.get("fine_labels"))
            if not isinstance(entry.get("data"), np.ndarray) or not isinstance(labels, list):
                raise ValueError(f"{folder / name} is not a CIFAR-10 batch (no data and labels).")
            data.append(entry["data"])
            self.targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC
        self.classes = _unpickle(folder / "batches.meta").get("label_names")


# What a CIFAR-10 batch holds besides dicts, lists, bytes and str (pickle opcodes, which
# call nothing): numpy's array and scalar reconstruction, from numpy 1 (numpy.core) or 2,
# and codecs.encode, which Python 3 writes for bytes in a protocol-2 pickle.
_NUMPY = {"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                      "numpy.core.numeric", "numpy._core.numeric") and name in _NUMPY:  # fmt: skip
            return getattr(np, name) if module == "numpy" else _numpy_core(module, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in a protocol-2 pickle of Python 3
            return codecs.encode
        raise pickle.UnpicklingError(f"it asks for {module}.{name}")


def _numpy_core(module: str, name: str) -> Any:
    """``numpy.core.x`` of numpy 1's pickles as numpy 2's ``numpy._core.x`` (no warning)."""
    import importlib

    for candidate in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"it asks for {module}.{name}, which this numpy lacks")


def _unpickle(path: Path) -> dict[str, Any]:
    """One pickled dict of a CIFAR-10 folder; ``ValueError`` for anything else."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not a CIFAR-10 batch ({exc}); refused without running it: a crafted"
            " pickle runs code. Put the real files there, or delete them and set"
            " data.download=true."
        ) from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a {type(entry).__name__}).")
    return entry


# name: (torchvision class, folder under data.root, the files it must hold)
_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")  # fmt: skip
_CIFAR = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
TORCHVISION: dict[str, tuple[Callable[..., Any], str, tuple[str, ...]]] = {
    "mnist": (torchvision.datasets.MNIST, "MNIST/raw", _IDX),
    "fashion_mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST/raw", _IDX),
    "cifar10": (_CIFAR10, "cifar-10-batches-py", _CIFAR),
}


def check(spec: Mapping[str, Any], task: str) -> None:
    """Raise ``ValueError`` for a missing folder or file, or an impossible setting."""
    name = str(spec["name"])
    if task != "classification":
        raise ValueError(f"data.name {name} is a classification set but task is {task}.")
    for key in ("workers", "crop"):
        if int(spec.get(key, 0)) < 0:
            raise ValueError(f"data.{key} must be at least 0 but got {spec[key]!r}.")
    if name == "image_folder":
        _check_folder(spec)
    elif not spec.get("download", False):
        _, sub, files = TORCHVISION[name]
        folder = Path(str(spec.get("root", "data"))).expanduser() / sub
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ValueError(
                f"data.name {name}: {', '.join(missing)} not found in {folder.resolve()};"
                f" put the files there (data.root={spec.get('root', 'data')}), or set"
                " data.download=true to fetch them."
            )


def _check_folder(spec: Mapping[str, Any]) -> None:
    path = spec.get("path")
    if not path:
        raise ValueError("data.path must name a folder of images (one subfolder per class).")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data.path {folder.resolve()} is not a folder of images.")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise ValueError(f"data.path {folder.resolve()} has no subfolders: one per class.")
    if int(spec.get("image_size", 32)) < 1:
        raise ValueError(f"data.image_size must be at least 1 but got {spec['image_size']!r}.")
    if not 0.0 < float(spec.get("test_fraction", 0.2)) < 1.0:
        raise ValueError(
            f"data.test_fraction must be in (0, 1) but got {spec['test_fraction']!r}."
        )


# --- torchvision's sets: held in memory -----------------------------------------------------


@functools.lru_cache(maxsize=2)
def _arrays(name: str, root: str, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W) uint8 and labels (N,) int64 of one split, read by torchvision."""
    cls, _, _ = TORCHVISION[name]
    dataset = cls(root, train=train, download=download)
    x = np.asarray(dataset.data)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # gray (N, H, W); RGB (N, H, W, C)
    y = np.asarray(dataset.targets, dtype=np.int64)
    for a in (x, y):
        a.flags.writeable = False  # cached and shared between trials
    return x, y


def load_torchvision(spec: Mapping[str, Any], seed: int, device: torch.device, task: str) -> Data:
    """Train and validation splits of MNIST, FashionMNIST or CIFAR-10 (test on request)."""
    name, root, download = (
        str(spec["name"]),
        str(spec.get("root", "data")),
        bool(spec.get("download", False)),
    )
    x, y = _arrays(name, str(Path(root).expanduser()), True, download)
    keep = _subsample(y, int(spec.get("num_samples", 0) or 0))
    train_idx, val_idx = (keep[i] for i in stratified_split(y[keep], float(spec["val_fraction"]),
                                                             seed))  # fmt: skip
    train_x = torch.from_numpy(x[train_idx]).float().div_(255)
    mean, std = _channel_stats(train_x)

    def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = images if isinstance(images, torch.Tensor) else torch.tensor(images).float() / 255
        return t.sub_(mean[:, None, None]).div_(std[:, None, None])

    train_x, train_y = normalize(train_x).to(device), torch.from_numpy(y[train_idx]).to(device)
    crop, flip = int(spec.get("crop", 0)), bool(spec.get("flip", False))
    train = Augmented(train_x, train_y, crop, flip) if crop or flip else Split(train_x, train_y)

    def test_split(to: torch.device) -> Split:
        tx, ty = _arrays(name, str(Path(root).expanduser()), False, download)
        return Split(normalize(tx).to(to), torch.tensor(ty).to(to))

    return Data(
        train=train,
        val=Split(normalize(x[val_idx]).to(device), torch.from_numpy(y[val_idx]).to(device)),
        num_classes=int(y.max()) + 1,
        mean=mean.tolist(),
        std=std.tolist(),
        input_shape=tuple(x.shape[1:]),
        test_split=test_split,
    )


def _subsample(y: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows, stratified and the same in every trial; all of them for 0."""
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    _, keep = stratified_split(y, n / len(y), SUBSAMPLE_SEED)
    return keep


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of images (N, C, H, W)."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@dataclass(frozen=True)
class Augmented(Split):
    """Training images on the device, augmented a whole batch at a time: each a random crop of
    the image zero-padded by ``crop`` pixels a side, and flipped left-right with probability 1/2
    when ``flip`` (``v2.RandomCrop(padding=crop)`` and ``v2.RandomHorizontalFlip()``, as for a
    folder, but one gather and one ``where`` per batch instead of a ``DataLoader``: airbench's
    way). Zero is each channel's training mean: the images are normalized before the crop."""

    crop: int = 0
    flip: bool = False

    def batches(self, size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of a fresh shuffle, crops and flips, all drawn from ``generator``."""
        n, device = len(self.y), self.x.device
        # Drawn on the CPU, once an epoch: the same numbers on every device, and no sync.
        order = torch.randperm(n, generator=generator).to(device)
        corners = torch.randint(2 * self.crop + 1, (n, 2), generator=generator).to(device)
        flips = (torch.rand(n, generator=generator) < 0.5).to(device)
        for i in range(n // size):
            rows = slice(i * size, (i + 1) * size)
            batch = order[rows]
            x = _crop(self.x[batch], corners[rows], self.crop) if self.crop else self.x[batch]
            if self.flip:
                x = torch.where(flips[rows, None, None, None], x.flip(3), x)
            yield x, self.y[batch]


def _crop(x: torch.Tensor, corners: torch.Tensor, pad: int) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) zero-padded by ``pad`` a side, each cut back to H x W from its
    own top-left corner ``corners`` (N, 2: row, column in the padded image)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)  # (N, C, (H + 2 pad) (W + 2 pad))
    rows = corners[:, :1] + torch.arange(h, device=x.device)  # (N, H)
    cols = corners[:, 1:] + torch.arange(w, device=x.device)  # (N, W)
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).flatten(1)  # (N, H W)
    return padded.gather(2, index[:, None, :].expand(n, c, h * w)).view(n, c, h, w)


def _augmentation(spec: Mapping[str, Any], size: tuple[int, ...]) -> v2.Compose | None:
    """A folder's per-sample random crop (``data.crop`` pixels of padding) and ``data.flip``;
    None when both are off."""
    steps: list[Callable[..., Any]] = []
    if int(spec.get("crop", 0)) > 0:
        steps.append(v2.RandomCrop(list(size), padding=int(spec["crop"])))
    if spec.get("flip", False):
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


# --- a user's image folder: decoded from files ----------------------------------------------


def load_folder(spec: Mapping[str, Any], seed: int, device: torch.device, task: str) -> Data:
    """A folder with one subfolder of images per class (``ImageFolder``): resized to
    ``data.image_size``, normalized per channel; a fixed test split is carved from it."""
    root, size = str(Path(str(spec["path"])).expanduser()), int(spec.get("image_size", 32))
    workers = int(spec.get("workers", 0))
    resize = [v2.ToImage(), v2.Resize([size, size], antialias=True),
              v2.ToDtype(torch.float32, scale=True)]  # fmt: skip
    plain = torchvision.datasets.ImageFolder(root, transform=v2.Compose(resize))
    y = np.asarray(plain.targets, dtype=np.int64)
    pool, test_idx = stratified_split(y, float(spec.get("test_fraction", 0.2)), FOLDER_TEST_SEED)
    train_idx, val_idx = (pool[i] for i in stratified_split(y[pool], float(spec["val_fraction"]),
                                                            seed))  # fmt: skip
    sample = train_idx[np.random.default_rng(0).permutation(len(train_idx))[:STATS_SAMPLES]]
    mean, std = _channel_stats(_stack(Subset(plain, sample.tolist()), workers))
    normalize = v2.Normalize(mean.tolist(), std.tolist())
    evaluate = torchvision.datasets.ImageFolder(root, transform=v2.Compose([*resize, normalize]))
    augment = _augmentation(spec, (size, size))
    train_tf = v2.Compose([*resize, normalize, *([augment] if augment else [])])
    train_set = torchvision.datasets.ImageFolder(root, transform=train_tf)

    def split(indices: np.ndarray, to: torch.device) -> Split:
        return Split(_stack(Subset(evaluate, indices.tolist()), workers).to(to),
                     torch.from_numpy(y[indices]).to(to))  # fmt: skip

    val = split(val_idx, device)
    return Data(
        train=Batches(
            Subset(train_set, train_idx.tolist()), torch.from_numpy(y[train_idx]), workers, device
        ),
        val=val,
        num_classes=len(plain.classes),
        mean=mean.tolist(),
        std=std.tolist(),
        input_shape=tuple(val.x.shape[1:]),
        test_split=lambda to: split(test_idx, to),
    )


def _stack(dataset: Dataset[Any], workers: int) -> torch.Tensor:
    """All images of ``dataset``, decoded by ``workers`` processes, as one tensor."""
    loader = DataLoader(dataset, batch_size=256, num_workers=workers)
    return torch.cat([x for x, _ in loader])
