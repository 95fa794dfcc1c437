"""Tiny data sets written in their real on-disk formats, for tests that read them through
torchvision and pandas: MNIST's idx/ubyte files, CIFAR-10's pickled batches, a folder of
PNGs, a CSV table. Each class has its own brightness pattern, so a model can learn them."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def images(
    n: int, classes: int, shape: tuple[int, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images of ``shape`` (H, W) or (H, W, C), labels cycling through classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 80, size=(n, *shape))
    rows = shape[0] // classes
    for i, label in enumerate(y):
        x[i, label * rows : (label + 1) * rows] += 150  # a bright band where the class says
    return x.astype(np.uint8), y.astype(np.int64)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40) -> Path:
    """``root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` as torchvision reads."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = images(n, 10, (28, 28), seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + y.astype(np.uint8).tobytes()
        )
    return raw


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 40) -> Path:
    """``root/cifar-10-batches-py``: five pickled training batches, a test batch, the meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        x, y = images(n_test if name == "test_batch" else per_batch, 10, (32, 32, 3), seed)
        batch = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y.tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 12) -> Path:
    """``root/<class>/<i>.png``: RGB PNGs of ``size`` pixels, one subfolder per class."""
    x, y = images(classes * per_class, classes, (size, size, 3), 0)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return root


def write_csv(path: Path, n: int = 240, regression: bool = True) -> Path:
    """A table of two numeric features, one categorical, a few missing cells, a target."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=n), rng.normal(5.0, 3.0, size=n)
    colour = rng.choice(["red", "green", "blue"], size=n)
    value = 3.0 * a - 0.5 * b + (colour == "red") * 2.0 + rng.normal(0, 0.1, size=n) + 10.0
    lines = ["a,b,colour,target"]
    for i in range(n):
        target = f"{value[i]:.4f}" if regression else ("high" if value[i] > 10 else "low")
        cell_b = "" if i % 37 == 5 else f"{b[i]:.4f}"  # a few missing numbers
        lines.append(f"{a[i]:.4f},{cell_b},{colour[i]},{target}")
    path.write_text("\n".join(lines) + "\n")
    return path
