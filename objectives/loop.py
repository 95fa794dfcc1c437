"""The training loop: one trial config in, the best epoch's validation metrics out."""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from objectives import data as datasets
from objectives._choice import choose
from objectives.losses import build_loss, check_loss, outputs_of, task_of
from objectives.metrics import (
    DIRECTIONS,
    METRIC_TASKS,
    epoch_metrics,
    full_metrics,
    regression_epoch_metrics,
)
from objectives.models import build_model, check_model
from objectives.optim import build_optimizer, build_schedule, check_optimizer, check_schedule

Report = Callable[[int, dict[str, float]], None]
DIVERGENCE_FACTOR = 3.0  # a batch loss this many times the first batch's ends the run
EVAL_CHUNK = 1024  # samples per forward pass when evaluating
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the ``precision`` key's values


def train(
    config: Mapping[str, Any], report: Report | None = None, *, test: bool = False
) -> dict[str, Any]:
    """Train the configured model and return its best epoch's validation metrics.

    Each epoch trains on the training split, evaluates on the validation split and calls
    ``report(epoch, metrics)``; whatever ``report`` raises (a pruning signal) propagates.
    Training stops after ``patience`` epochs without a better validation metric, at
    ``epochs``, on divergence, or when memory runs out; the best epoch's weights are restored.
    With ``time_budget`` (seconds) the training step is timed first and the run trains for
    budget x throughput samples, in whole steps, instead of ``epochs``; with ``train_samples``
    it trains that many samples (in whole steps) and times nothing: tuner hands a time race's
    measured budget back this way, and ``deterministic=true`` a budget the study gives.
    ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) picks autocast for the forward
    passes; ``auto`` is bf16 on a CUDA GPU that has it and fp32 elsewhere, so CPU runs stay
    plain float32.

    Example:
        >>> import yaml
        >>> config = yaml.safe_load(open("studies/mnist1d_cnn.yaml"))["defaults"]
        >>> result = train(config, test=True)  # about 12 s on one CPU core
        >>> result["stop_reason"], result["best_epoch"], result["test"]["accuracy"]
        ('max_epochs', 8, 0.993)

    Args:
        config: A trial config like a study's ``defaults`` (read, never changed), optionally
            with ``task`` (``classification`` or ``regression``; default: the loss's),
            ``metric`` (default ``accuracy``, ``rmse`` for regression) and ``direction``
            (the metric's own; another one is an error).
        report: Called after every finished epoch with the epoch (from 1) and the validation
            ``accuracy`` and ``loss`` (cross-entropy, no label smoothing) for classification,
            ``rmse``, ``mae`` and ``loss`` (MSE) for regression, ``train_loss`` and the metric.
        test: Also evaluate the best weights on the test split, returned as ``result["test"]``.
            Without it the test split is never read.

    Returns:
        The best epoch's validation metrics (``metrics.classification_metrics`` or
        ``metrics.regression_metrics``, in the target's units) and
        ``best_epoch``, ``epochs_run`` (evaluated epochs), ``stop_reason`` (``patience``,
        ``max_epochs``, ``time_budget``, ``sample_budget``, ``diverged`` or ``out_of_memory``),
        ``steps``, ``train_samples`` (with a time or sample budget: the samples it trains for),
        ``samples_per_s`` (over the training steps), ``train_seconds`` (training and per-epoch
        evaluation), ``peak_memory_mb``, ``num_params`` and ``model`` (best weights, on CPU).
        Metrics are missing when no epoch finished. All but ``model`` and ``test`` are plain
        JSON values.
    """
    validate(config)
    device = resolve_device(str(config["device"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _tune_cuda(exact=str(config.get("precision", "auto")) == "fp32")
    start = time.perf_counter()
    try:
        return _train(config, report, test, device)
    except _OutOfMemory:
        pass  # leave the except block first: its traceback still holds the tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "stop_reason": "out_of_memory",
        "train_seconds": time.perf_counter() - start,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def _train(
    config: Mapping[str, Any], report: Report | None, test: bool, device: torch.device
) -> dict[str, Any]:
    with _out_of_memory_guard():
        run = _prepare(config, device)
    best, stop = _fit(run, config, report)
    with _out_of_memory_guard():
        return _summarize(run, best, stop, config, test)


def _prepare(config: Mapping[str, Any], device: torch.device) -> _Run:
    """Seed, load the data, build the model and, with a time budget, time the training step."""
    precision = resolve_precision(str(config.get("precision", "auto")), device)
    seed = int(config["seed"])
    torch.manual_seed(seed)
    data = datasets.load(config["data"], seed, device, task=task_of(config))
    if config["loss"] == "bce" and data.num_classes != 2:
        raise ValueError(f"loss bce needs two classes but the data has {data.num_classes}.")
    outputs = outputs_of(config, data.num_classes)
    model = build_model(config["model"], data.input_shape, outputs).to(device)
    batch_size = min(int(config["batch_size"]), len(data.train.y))
    probe, samples = None, config.get("train_samples")
    if samples is None and config.get("time_budget") is not None:
        probe = _throughput(model, config, data.train, batch_size, precision)
        samples = float(config["time_budget"]) * probe
    torch.manual_seed(seed)  # the same random state for training whether a probe ran or not
    run = _Run(model, data, config, batch_size, samples, _Mixed(precision, device))
    run.probe = probe
    return run


def _fit(run: _Run, config: Mapping[str, Any], report: Report | None) -> tuple[_Best | None, str]:
    """The epochs: train, evaluate, keep the best, report; returns it and why training stopped."""
    metric, direction = _monitored(config)
    patience = config.get("patience")
    best: _Best | None = None
    start = time.perf_counter()
    stop = "max_epochs"
    if run.budgeted:
        stop = "time_budget" if config.get("time_budget") is not None else "sample_budget"
    while run.steps_done < run.total_steps:
        with _out_of_memory_guard():
            train_loss = run.train_epoch()
            if train_loss is None:
                stop = "diverged"
                break
            logits = run.data.unscale(_predict(run.model, run.data.val.x, run.mixed))
            cheap = (
                epoch_metrics if run.data.task == "classification" else regression_epoch_metrics
            )
            metrics = {**cheap(logits, run.data.val.y, metric), "train_loss": train_loss}
        run.epochs_run += 1
        if best is None or _better(metrics, best.metrics, metric, direction):
            best = _Best(run.epochs_run, metrics, logits, _clone_state(run.model))
        if report is not None:
            report(run.epochs_run, dict(metrics))  # may raise to prune: deliberately not caught
        left = run.steps_done < run.total_steps  # out of patience at the end is just the end
        if patience and left and run.epochs_run - best.epoch >= patience:
            stop = "patience"
            break
    run.loop_seconds = time.perf_counter() - start
    return best, stop


def _summarize(
    run: _Run, best: _Best | None, stop: str, config: Mapping[str, Any], test: bool
) -> dict[str, Any]:
    """The best epoch's full validation metrics (and test metrics), and the run's facts."""
    result: dict[str, Any] = {}
    model, data = run.model, run.data
    if best is not None:
        model.load_state_dict(best.state)
        result.update(full_metrics(best.logits, data.val.y, data.task))
        # The reported values win, so the trial's value and its attributes agree exactly.
        result.update({k: v for k, v in best.metrics.items() if not math.isnan(v)})
        if test:  # scored with the best weights, once; no epoch finished: nothing to score
            split = datasets.load_test(config["data"], data, data.val.x.device)
            outputs = data.unscale(_predict(model, split.x, run.mixed))
            result["test"] = full_metrics(outputs, split.y, data.task)
    samples = run.steps_done * run.batch_size
    result.update(
        best_epoch=0 if best is None else best.epoch,
        epochs_run=run.epochs_run,
        stop_reason=stop,
        steps=run.steps_done,
        samples_per_s=samples / run.step_seconds if run.step_seconds > 0 else 0.0,
        train_seconds=run.loop_seconds,
        peak_memory_mb=_peak_memory_mb(data.val.x.device),
        num_params=sum(p.numel() for p in model.parameters()),
        model=model.eval().cpu(),
    )
    if run.probe is not None:
        result["probe_samples_per_s"] = run.probe
    if run.budgeted:
        result["train_samples"] = run.total_steps * run.batch_size
    return result


class _Run:
    """One run's model, data, optimizer, schedule, loss, batch order and step plan."""

    def __init__(
        self,
        model: nn.Module,
        data: datasets.Data,
        config: Mapping[str, Any],
        batch_size: int,
        samples: float | None,
        mixed: _Mixed,
    ) -> None:
        self.model, self.data, self.batch_size = model, data, batch_size
        self.mixed, self.budgeted = mixed, samples is not None
        self.probe: float | None = None  # the measured throughput, where a time budget ran
        self.steps_per_epoch = len(data.train.y) // batch_size  # a partial last batch is dropped
        if samples is None:
            self.total_steps = int(config["epochs"]) * self.steps_per_epoch
        else:  # the budget becomes a step count, so that training itself stays deterministic
            self.total_steps = max(1, round(float(samples) / batch_size))
        self.optimizer = build_optimizer(model.parameters(), config)
        self.schedule = build_schedule(self.optimizer, config, self.total_steps)
        self.loss_fn = build_loss(config)
        self.order = torch.Generator().manual_seed(int(config["seed"]))  # apart from torch's RNG
        self.watch = _DivergenceWatch(per_step=data.val.x.device.type == "cpu")
        self.steps_done = self.epochs_run = 0
        self.step_seconds = self.loop_seconds = 0.0

    def train_epoch(self) -> float | None:
        """Train one epoch of a fresh shuffle (the last may be cut short by the step plan);
        return the mean batch loss, or None when the loss diverged."""
        start = time.perf_counter()
        loss = self._steps(min(self.steps_per_epoch, self.total_steps - self.steps_done))
        self.step_seconds += time.perf_counter() - start  # _steps ends with a sync: honest on GPU
        return loss

    def _steps(self, steps: int) -> float | None:
        batches = self.data.train.batches(self.batch_size, self.order)
        total = torch.zeros((), device=self.data.val.x.device)  # summed there: no sync per step
        self.model.train()
        for x, y in itertools.islice(batches, steps):
            with self.mixed.autocast():
                loss = self.loss_fn(self.model(x), y)
            if self.watch.diverged(loss):
                return None
            self.optimizer.zero_grad(set_to_none=True)
            self.mixed.backward_step(loss, self.optimizer)
            self.schedule.step()
            total += loss.detach()
            self.steps_done += 1
        return None if self.watch.check() else float(total) / steps


class _Mixed:
    """Autocast of the forward pass and loss to ``dtype`` (None: none, plain float32), with loss
    scaling for float16, whose small gradients would underflow to zero without it."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        self.dtype, self.device_type = dtype, device.type
        # Disabled (fp32, bf16) it hands the loss and the step through untouched.
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step; under fp16, a step with inf/NaN gradients is skipped
        (with a fused optimizer on CUDA the scaler decides on the device, without a sync)."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


class _DivergenceWatch:
    """Flags a run whose training loss turns non-finite or exceeds 3x its first batch's loss.

    A fresh classifier starts near ln C (exactly, with the zero head) and healthy training only
    lowers it; a batch three times above the start means the steps throw the weights off (the
    learning rate is too high), and such a run does not recover within a trial's few epochs.
    On CPU the check runs every step, on the loss read as a float; on a GPU once per epoch, on
    the worst loss kept on the device, because reading a value every step would stall the GPU.
    """

    def __init__(self, per_step: bool) -> None:
        self.per_step = per_step
        self.first: torch.Tensor | None = None
        self.worst: torch.Tensor | None = None  # per epoch only: the running maximum

    def diverged(self, loss: torch.Tensor) -> bool:
        loss = loss.detach()
        if self.first is None:
            self.first = loss
        if self.per_step:  # the run stops at the first bad loss: no running maximum needed
            value = float(loss)
            return not math.isfinite(value) or value > DIVERGENCE_FACTOR * float(self.first)
        self.worst = loss if self.worst is None else torch.maximum(self.worst, loss)  # NaN sticks
        return False

    def check(self) -> bool:
        if self.worst is None or self.first is None:
            return False
        worst = float(self.worst)
        return not math.isfinite(worst) or worst > DIVERGENCE_FACTOR * float(self.first)


@dataclass
class _Best:
    """The best epoch so far: its reported metrics, validation outputs and weights."""

    epoch: int
    metrics: dict[str, float]
    logits: torch.Tensor  # validation outputs: the full metrics are computed from them once
    state: dict[str, torch.Tensor]


def _throughput(
    model: nn.Module,
    config: Mapping[str, Any],
    train: datasets.Split | datasets.Batches,
    batch_size: int,
    precision: torch.dtype | None = None,
) -> float:
    """Training samples per second at ``batch_size``, timed on a throw-away copy of the model
    with the data loading (and augmentation) of the split, in the run's precision."""
    probe = copy.deepcopy(model).train()
    optimizer = build_optimizer(probe.parameters(), config)
    loss_fn = build_loss(config)
    device = next(probe.parameters()).device
    mixed = _Mixed(precision, device)
    batches = _endless(train, batch_size, device)

    def steps(count: int) -> None:
        for x, y in itertools.islice(batches, count):
            with mixed.autocast():
                loss = loss_fn(probe(x), y)
            optimizer.zero_grad(set_to_none=True)
            mixed.backward_step(loss, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps(3)  # warm-up: allocator, kernel choice, caches
    timed, start = 0, time.perf_counter()
    while timed < 5 or time.perf_counter() - start < 0.5:
        steps(5)
        timed += 5
    return timed * batch_size / (time.perf_counter() - start)


def _endless(
    train: datasets.Split | datasets.Batches, batch_size: int, device: torch.device
) -> Iterator[datasets.Batch]:
    """Training batches without end, shuffled apart from training's own order."""
    if isinstance(train, datasets.Batches):  # its own loader: training's shuffle stays put
        loader = train.loader(batch_size, seed=0)
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    order = torch.Generator().manual_seed(0)
    while True:
        yield from train.batches(batch_size, order)


def _predict(model: nn.Module, x: torch.Tensor, mixed: _Mixed) -> torch.Tensor:
    """The model's outputs for ``x``, in float32 whatever the autocast: metrics are fp32."""
    model.eval()
    with torch.inference_mode(), mixed.autocast():
        chunks = [model(x[i : i + EVAL_CHUNK]).float() for i in range(0, len(x), EVAL_CHUNK)]
    return torch.cat(chunks)


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _better(
    new: Mapping[str, float], best: Mapping[str, float], metric: str, direction: str
) -> bool:
    """Strictly better on the monitored metric; on a tie, the lower validation loss wins.

    Accuracy on a few hundred samples moves in coarse steps, so ties are common, and the loss
    tells the tied epochs apart (MNIST-1D default, seed 0, 2 threads: the first of the tied
    epochs, 6, scores 98.8% test accuracy; epoch 8, the lowest loss among them, 99.3%).
    """
    value, old = new[metric], best[metric]
    if value == old:
        return new["loss"] < best["loss"]
    return value > old if direction == "maximize" else value < old


def _monitored(config: Mapping[str, Any]) -> tuple[str, str]:
    """The metric that picks the best epoch, and its direction (the metric's own by default)."""
    metric = config.get("metric") or ("rmse" if task_of(config) == "regression" else "accuracy")
    choose("metric", metric, DIRECTIONS)
    direction = config.get("direction") or DIRECTIONS[metric]
    choose("direction", direction, {"maximize": 1, "minimize": -1})
    task = task_of(config)
    if METRIC_TASKS.get(metric, task) != task:
        allowed = ", ".join(m for m, t in METRIC_TASKS.items() if t == task)
        raise ValueError(f"metric {metric} scores {METRIC_TASKS[metric]} but task is {task};"
                         f" for {task} use one of {allowed} or loss.")  # fmt: skip
    if direction != DIRECTIONS[metric]:
        raise ValueError(
            f"direction is {direction} but {metric} gets better when it goes"
            f" {'up' if DIRECTIONS[metric] == 'maximize' else 'down'}: set direction:"
            f" {DIRECTIONS[metric]}."
        )
    return metric, direction


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else CPU; any other name is taken as torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda[:N] but got {name!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {name!r} but CUDA is not available.")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None is plain float32.

    ``auto`` is bf16 on a CUDA GPU that supports it and fp32 otherwise, the CPU included: a CPU
    run's numbers do not depend on it. bf16 keeps fp32's range (no loss scaling); fp16 needs it.
    """
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16 needs a GPU with bfloat16 but {device} has none;"
                         " use fp16 or auto.")  # fmt: skip
    return choose("precision", name, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16})


def _tune_cuda(exact: bool) -> None:
    """TF32 for float32 matmuls and convolutions (unless ``precision: fp32`` asks for exact
    float32), and cuDNN's autotuner: it picks the fastest convolution for each input shape."""
    torch.backends.cuda.matmul.allow_tf32 = not exact  # set both ways: the flags are global
    torch.backends.cudnn.allow_tf32 = not exact
    torch.backends.cudnn.benchmark = True


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20  # this run's tensors, MiB
    # No per-run counter on CPU: this is the whole process's peak resident set size so far
    # (ru_maxrss: KiB on Linux, bytes on macOS), so it includes everything loaded before.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def validate(config: Mapping[str, Any]) -> None:
    """Check every value that the run dispatches on before any data or model is built.

    Raises ValueError naming the key, the value and what it may be. tuner calls it on each
    stage's configs before it writes anything, so a typo is an error, not a failed stage.
    """
    datasets.check_data(config["data"], task=task_of(config))
    check_model(config["model"])
    check_loss(config)
    check_optimizer(config)
    check_schedule(config)
    _monitored(config)
    choose("precision", config.get("precision", "auto"), dict.fromkeys(PRECISIONS))
    keys = ["batch_size", "epochs"]  # with a time or sample budget, epochs still caps the run
    keys += ["train_samples"] if config.get("train_samples") is not None else []
    for key in keys:
        if int(config[key]) < 1:
            raise ValueError(f"{key} must be at least 1 but got {config[key]!r}.")
    if "seed" in config and not 0 <= int(config["seed"]) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) but got {config['seed']!r}.")
    if config.get("patience") is not None and int(config["patience"]) < 0:
        raise ValueError(f"patience must be at least 0 but got {config['patience']!r}.")
    budget = config.get("time_budget")
    if budget is not None and not float(budget) > 0:
        raise ValueError(f"time_budget must be positive seconds or null but got {budget!r}.")


class _OutOfMemory(Exception):
    """An allocation failed inside the training computation (never raised by ``report``)."""


@contextlib.contextmanager
def _out_of_memory_guard() -> Iterator[None]:
    """Turn an allocation failure into ``_OutOfMemory``; guards compute, never ``report``."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise _OutOfMemory from exc
    except RuntimeError as exc:
        message = str(exc).lower()
        if "out of memory" in message or "allocate memory" in message:
            raise _OutOfMemory from exc
        raise
