"""One trial per GPU: which device each worker process of a run trains on.

``workers=N`` on a machine with several GPUs gives each worker its own: ``devices=0,1,2,3``
names them (indexes among the visible GPUs; a device listed twice takes two workers, the
only way to run two trials on one GPU), and by default every visible GPU takes one worker
(``workers=`` may ask for fewer). A worker's device is set as ``CUDA_VISIBLE_DEVICES`` in its
process before torch is imported there, so the objective's ``device: auto`` (or ``cuda``)
is that GPU, and every trial records it (user attr ``device``). Nothing here imports torch.

The run's own process takes the first device. From Python (``tuner.run``) that process is the
caller's: its ``CUDA_VISIBLE_DEVICES`` is set for the run and put back after it. Where the
caller has already started CUDA, the variable can no longer take effect: the run's trials
here go on the GPU the process already uses when that is the one asked for, and otherwise the
run stops before it starts, with one line saying what to do.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.errors import UserError

ENV = "CUDA_VISIBLE_DEVICES"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the driver sees (Linux)
CPU = "cpu"  # devices=cpu: every worker on the CPU, the GPUs hidden from it

_assigned: str | None = None  # this process's CUDA_VISIBLE_DEVICES, where a run set it


def visible(environ: Mapping[str, str] | None = None, gpus: Path = NVIDIA_GPUS) -> list[str]:
    """The GPUs this process may hand to workers, as ``CUDA_VISIBLE_DEVICES`` names them: its
    own entries where it is set, else one index per GPU the NVIDIA driver lists."""
    environ = os.environ if environ is None else environ
    if ENV in environ:
        return [part.strip() for part in environ[ENV].split(",") if part.strip()]
    try:
        return [str(i) for i in range(sum(1 for _ in gpus.iterdir()))]
    except OSError:
        return []


def parse(text: Any) -> list[int] | str:
    """``devices=0,1,2,3`` as indexes among the visible GPUs, or ``cpu``."""
    raw = str(text).strip()
    if raw == CPU:
        return CPU
    parts = [part.strip() for part in raw.split(",")]
    if not raw or not all(part.isdigit() for part in parts):
        raise UserError(
            f"devices={text}: devices must be GPU indexes separated by commas (like"
            " devices=0,1,2,3; a GPU listed twice takes two workers), or devices=cpu."
        )
    return [int(part) for part in parts]


def assign(
    devices: list[int] | str | None,
    workers: int | None,
    gpus: Sequence[str],
    device: str = "auto",
) -> list[str | None]:
    """Each worker's ``CUDA_VISIBLE_DEVICES`` (index 0: the run's own process); None leaves
    it as it is. The length of the list is the number of workers.

    Args:
        devices: ``parse``'s result, or None where ``devices=`` is not given.
        workers: ``workers=``, or None where it is not given.
        gpus: The visible GPUs (``visible()``).
        device: The trial config's ``device``: ``auto`` or ``cuda`` take a worker's GPU;
            ``cpu`` or ``cuda:N`` pin every trial themselves, and take no ``devices=``.
    """
    if workers is not None and workers < 1:
        raise UserError(f"workers={workers}: workers must be at least 1.")
    if devices == CPU:
        if device.startswith("cuda"):
            raise UserError(f"devices=cpu but the study's device is {device}: use device=auto.")
        return [""] * (workers or 1)
    shown = ",".join(str(d) for d in devices or ())
    if device not in ("auto", "cuda"):
        if devices is not None:
            raise UserError(
                f"devices={shown} but the study's device is {device}, which pins every"
                " trial: use device=auto (or cuda) to give each worker its GPU."
            )
        return [None] * (workers or 1)
    if devices is None:
        if not gpus:
            return [None] * (workers or 1)
        count = len(gpus) if workers is None else workers
        if count > len(gpus):
            raise UserError(
                f"workers={count} but {len(gpus)} GPU(s) are visible and each worker gets its"
                f" own: use workers={len(gpus)} or fewer, or list a GPU twice to share it"
                f" (devices={','.join(str(i) for i in range(len(gpus)))},0)."
            )
        return [gpus[i] for i in range(count)]
    assert isinstance(devices, list)
    if not gpus:
        raise UserError(
            f"devices={shown}: no GPU is visible here ({ENV} is empty or the NVIDIA driver"
            " lists none); drop devices= to train on the CPU."
        )
    for index in devices:
        if index >= len(gpus):
            raise UserError(
                f"devices={shown}: GPU {index} is not visible; the visible ones are"
                f" {','.join(str(i) for i in range(len(gpus)))}."
            )
    if workers is not None and workers != len(devices):
        raise UserError(
            f"workers={workers} but devices={shown} lists {len(devices)}: one worker per listed"
            " GPU (list a GPU twice to run two trials on it); drop workers= or match it."
        )
    return [gpus[i] for i in devices]


def resolve(text: Any, workers: int | None, device: str) -> list[str | None]:
    """``devices=`` and ``workers=`` of a run (None: not given) on this machine's GPUs."""
    return assign(None if text is None else parse(text), workers, visible(), device)


def use(value: str | None) -> None:
    """Make ``value`` this process's ``CUDA_VISIBLE_DEVICES`` (None: leave it); call it before
    torch is imported here, since CUDA reads it once. Where CUDA has started already, the GPU
    it uses here must be ``value`` (nothing is set then); otherwise a UserError says what to
    do."""
    global _assigned
    if value is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        here = visible()  # as CUDA numbers them in this process
        current = torch.cuda.current_device()
        now = here[current] if current < len(here) else str(current)
        if value != now:
            raise UserError(_started(value, now, current))
    else:
        os.environ[ENV] = value
    _assigned = value


@contextlib.contextmanager
def used(value: str | None) -> Iterator[None]:
    """``use(value)`` for the length of a run; then this process's ``CUDA_VISIBLE_DEVICES``
    (set, or not) and its trials' device as they were before."""
    global _assigned
    saved, assigned = os.environ.get(ENV), _assigned
    try:
        use(value)
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
        _assigned = assigned


def _started(value: str, now: str, current: int) -> str:
    """Why this process cannot train on ``value``: CUDA has started here, on ``now``."""
    late = f"CUDA has started in this process already (on GPU {now}), and {ENV} cannot change"
    fresh = "call tuner.run before anything uses CUDA (in a fresh kernel, or earlier in a script)"
    if not value:
        return f"devices=cpu: {late}: use device=cpu to train on the CPU, or {fresh}."
    return (
        f"this process's trials would run on GPU {value}, but {late}: list GPU {current} first"
        f" in devices= (devices={current},...), or {fresh}."
    )


def label(value: str | None) -> str | None:
    """How a trial's device is shown: ``cuda:2`` (the GPU as the run saw it), or ``cpu``."""
    if value is None:
        return None
    return f"cuda:{value}" if value else CPU


def trial_attrs() -> dict[str, Any]:
    """The user attrs a trial records of its device (none where the run assigned none)."""
    shown = label(_assigned)
    return {} if shown is None else {"device": shown}


def summary(trials: Sequence[Any]) -> str:
    """``cuda:0 x6, cuda:1 x5``: how many of a stage's trials each device ran."""
    counts: dict[str, int] = {}
    for trial in trials:
        name = trial.user_attrs.get("device")
        if isinstance(name, str):
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
