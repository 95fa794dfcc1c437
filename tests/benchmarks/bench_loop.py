"""Training-loop throughput: tuner's training epoch vs a raw torch loop and a per-sample
DataLoader, with the same model, optimizer, loss and batch size.

Three loops train whole epochs on the CPU, one torch thread:

- ours: ``objectives.loop``'s own epoch (``_Run.train_epoch``: the split's shuffled batches,
  augmentation where the study asks for it, the schedule step, the divergence watch, the
  loss summed on the device), counted as ``train()`` counts its ``samples_per_s``;
- raw: the minimal loop a user writes: ``x[idx]`` of a ``randperm``, forward, loss,
  ``zero_grad``, backward, ``step`` (no schedule, no augmentation), with the optimizer as a
  user writes it: the same class and values, torch's default update (on the CPU one
  parameter at a time; ours takes the fused one, ``objectives.optim._fast``);
- DataLoader: that loop fed by ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True,
  drop_last=True)``, ``num_workers=0``, default collate: one ``__getitem__`` per sample.

The data sets: MNIST-1D with the default study's defaults (``studies/mnist1d_cnn.yaml``),
digits with ``studies/digits_mlp.yaml``'s, and a fake CIFAR-10 (random 32x32 images in
torchvision's pickled format, written to a temporary folder) with ``studies/cifar10.yaml``'s
ResNet-18, crops and flips, at a reduced width (8) and size (640 images) for a CPU. After a
warm-up epoch the loops take turns epoch by epoch, each round starting with the next one, so
that load on this shared machine (and the garbage one leaves) hits all of them alike; each
speed is the loop's median round, each ratio the median of the rounds' ratios (a round's
loops ran side by side, under the same load). The two "data" columns time the batches
alone, without the model: the split's own ``batches`` (augmented where asked) against the
DataLoader's. Run:

    python tests/benchmarks/bench_loop.py                  # about 2 min on one core
    python tests/benchmarks/bench_loop.py --rounds 9 --sets mnist1d,digits

Prints samples/s of each loop and the ratios ours/raw (issue 7: at least 0.95) and
ours/DataLoader (issue 7: at least 3 on the small in-memory sets), then the same for the data
alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from objectives import data as datasets
from objectives import loop, optim
from objectives.losses import build_loss
from objectives.models import build_model
from objectives.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests import fake_data  # noqa: E402  (the checkout's tests/, not an installed package)

CPU = torch.device("cpu")
MIN_ROUND_S = 0.3  # a round trains whole epochs for at least this long: tiny sets repeat them
EPOCHS = 10_000  # ours: the schedule's length, more than any round trains (speed is the same)
Epoch = Callable[[], tuple[int, float]]  # trains (or loads) one epoch: samples, seconds


def study_defaults(name: str, **changes: Any) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "studies" / f"{name}.yaml").read_text())["defaults"]
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return {**config, "device": "cpu", "time_budget": None, "patience": None}


def configs(folder: Path, image_width: int, images: int) -> dict[str, dict[str, Any]]:
    fake_data.write_cifar10(folder, per_batch=images // 5, n_test=10)
    cifar = {"root": str(folder), "num_samples": 0, "workers": 0}  # one process, like the rest
    return {
        "mnist1d": study_defaults("mnist1d_cnn"),
        "digits": study_defaults("digits_mlp"),
        "cifar10 (fake)": study_defaults("cifar10", data=cifar, model={"width": image_width}),
    }


def ours(config: dict[str, Any]) -> Epoch:
    """tuner's epoch: samples and seconds as ``train()`` counts them for ``samples_per_s``."""
    run = loop._prepare({**config, "epochs": EPOCHS}, CPU)

    def epoch() -> tuple[int, float]:
        steps, seconds = run.steps_done, run.step_seconds
        run.train_epoch()
        return (run.steps_done - steps) * run.batch_size, run.step_seconds - seconds

    return epoch


def parts(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any, Any, Any]:
    """The training tensors (not augmented), a fresh model, its optimizer as a user writes it
    (torch's default update) and the loss."""
    seed = int(config["seed"])
    torch.manual_seed(seed)
    d = datasets.load({**config["data"], "crop": 0, "flip": False}, seed, CPU)
    assert isinstance(d.train, datasets.Split)
    model = build_model(config["model"], d.input_shape, d.num_classes)
    with mock.patch.object(optim, "_fast", lambda params, fused=True: {}):
        optimizer = build_optimizer(model.parameters(), config)
    return d.train.x, d.train.y, model, optimizer, build_loss(config)


def raw(config: dict[str, Any]) -> Epoch:
    x, y, model, optimizer, loss_fn = parts(config)
    size = int(config["batch_size"])

    def epoch() -> tuple[int, float]:
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(y))
        steps = len(y) // size
        for i in range(steps):
            idx = order[i * size : (i + 1) * size]
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * size, time.perf_counter() - start

    return epoch


def per_sample(config: dict[str, Any], train: bool = True) -> Epoch:
    """The DataLoader loop; with ``train=False`` only its batches (the data-alone column)."""
    x, y, model, optimizer, loss_fn = parts(config)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=int(config["batch_size"]), shuffle=True, drop_last=True
    )

    def epoch() -> tuple[int, float]:
        start = time.perf_counter()
        model.train()
        samples = 0
        for xb, yb in loader:
            if train:
                loss = loss_fn(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            samples += len(yb)
        return samples, time.perf_counter() - start

    return epoch


def our_batches(config: dict[str, Any]) -> Epoch:
    """The batches that ours trains on (augmented where asked), alone."""
    d = datasets.load(config["data"], int(config["seed"]), CPU)
    order, size = torch.Generator().manual_seed(0), int(config["batch_size"])

    def epoch() -> tuple[int, float]:
        start = time.perf_counter()
        samples = sum(len(y) for _, y in d.train.batches(size, order))
        return samples, time.perf_counter() - start

    return epoch


def measure(config: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median samples/s of each loop over ``rounds`` interleaved rounds, after a warm-up, and
    the median over the rounds of each ratio (``ours/raw``, ``ours/DataLoader``, ``data``)."""
    loops = {
        "ours": ours(config),
        "raw": raw(config),
        "DataLoader": per_sample(config),
        "data ours": our_batches(config),
        "data DataLoader": per_sample(config, train=False),
    }
    warm = {name: epoch() for name, epoch in loops.items()}  # allocator, caches, first calls
    # Epochs a round: at least MIN_ROUND_S of the raw loop (tiny sets take milliseconds).
    repeat = max(1, round(MIN_ROUND_S / warm["raw"][1]))
    speeds: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(rounds):
        done: dict[str, list[tuple[int, float]]] = {name: [] for name in loops}
        for _ in range(repeat):  # epoch by epoch, each loop going first in turn
            for name in names[r % len(names) :] + names[: r % len(names)]:
                done[name].append(loops[name]())
        for name, epochs in done.items():
            speeds[name].append(sum(n for n, _ in epochs) / sum(s for _, s in epochs))
    result = {name: statistics.median(v) for name, v in speeds.items()}
    for ratio, (top, bottom) in RATIOS.items():
        result[ratio] = statistics.median(
            a / b for a, b in zip(speeds[top], speeds[bottom], strict=True)
        )
    return result


RATIOS = {  # name: (numerator, denominator), each a loop of measure()
    "ours/raw": ("ours", "raw"),
    "ours/DL": ("ours", "DataLoader"),
    "data ours/DL": ("data ours", "data DataLoader"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per loop (median)")
    parser.add_argument("--sets", default="mnist1d,digits,cifar10", help="comma-separated")
    parser.add_argument("--image-width", type=int, default=8, help="ResNet-18 base channels")
    parser.add_argument("--images", type=int, default=640, help="fake CIFAR-10 train images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"samples/s, median of {args.rounds} rounds, 1 torch thread, CPU")
    print(
        f"{'data set':<15}{'batch':>6}{'ours':>8}{'raw':>8}{'DataLoader':>11}{'ours/raw':>9}"
        f"{'ours/DL':>8} |{'data ours':>10}{'data DL':>9}{'ours/DL':>8}"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name, config in configs(Path(folder), args.image_width, args.images).items():
            if name.split()[0] not in args.sets.split(","):
                continue
            s = measure(config, args.rounds)
            print(
                f"{name:<15}{config['batch_size']:>6}{s['ours']:>8.0f}{s['raw']:>8.0f}"
                f"{s['DataLoader']:>11.0f}{s['ours/raw']:>9.3f}"
                f"{s['ours/DL']:>8.2f} |{s['data ours']:>10.0f}"
                f"{s['data DataLoader']:>9.0f}{s['data ours/DL']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
