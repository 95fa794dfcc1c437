"""The worker pool of a run (``workers=N``): processes beside this one, each running its
share of every stage on the same storage, one torch thread each by default.

Workers are started with the run, before this process imports torch, so that their own
imports (torch, the objective: seconds) overlap with the run's planning and checks.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import warnings
from collections.abc import Sequence
from multiprocessing.connection import Connection

import optuna

from tuner import devices as gpus
from tuner import signals
from tuner import storage as storages
from tuner.errors import StageFailed, UserError
from tuner.objective import load_objective
from tuner.plan import StagePlan
from tuner.stage import Budget, work


def set_threads(threads: int | None) -> None:
    """torch's thread count in this process (None: leave torch's own); imports torch."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


class Pool:
    """Worker processes beside this one (``workers=N``), each running its share of every stage
    of a run. They start with the run, so that their imports (torch, the objective: seconds)
    overlap with its planning and checks, and serve all its stages."""

    def __init__(
        self,
        n: int,
        heartbeat: float,
        objective: str,
        threads: int = 1,
        devices: Sequence[str | None] = (),  # each worker's CUDA_VISIBLE_DEVICES (tuner.devices)
    ) -> None:
        context = multiprocessing.get_context("spawn")  # no forked torch or database state
        self.heartbeat = heartbeat
        self.pipes = [context.Pipe() for _ in range(n)]
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(jobs, index, heartbeat, objective, threads, _nth(devices, index - 1)),
                name=f"tuner-worker-{index}",
            )
            for index, (_, jobs) in enumerate(self.pipes, start=1)
        ]
        self.busy = False  # whether they were handed a stage

    def __enter__(self) -> Pool:
        for process, (_, jobs) in zip(self.processes, self.pipes, strict=True):
            process.start()
            jobs.close()  # the worker's end: a worker that dies is seen as the pipe's end
        return self

    def start(self, plan: StagePlan, budget: Budget, deadline: float | None) -> None:
        """Hand each worker the stage."""
        self.busy = True
        for pipe, _ in self.pipes:
            pipe.send((plan, budget, deadline))

    def wait(self) -> None:
        """Wait for each worker to be done with the stage; a worker that stopped on a failing
        stage, or died, fails the run the same way."""
        codes = []
        for (pipe, _), process in zip(self.pipes, self.processes, strict=True):
            try:
                codes.append(pipe.recv())
            except EOFError:
                process.join()
                codes.append(process.exitcode or 1)
        if any(code == signals.EXIT_STATUS for code in codes):
            raise KeyboardInterrupt
        failed = [code for code in codes if code]
        if failed:
            raise StageFailed(f"a worker process ended with exit status {failed[0]}")

    def __exit__(self, *exc: object) -> None:
        for (pipe, _), process in zip(self.pipes, self.processes, strict=True):
            if not self.busy:
                process.terminate()  # still starting up, no trial of theirs to keep
            with contextlib.suppress(OSError):
                pipe.send(None)  # the run is over; a worker in a stage finishes its share first
            process.join()


def _warm_up() -> None:
    """Pay a process's one-time cost of its first trial ahead, while a worker waits for the
    run's plan and checks: torch imports its compiler (torch._dynamo, about 1 s here) when
    the process builds its first optimizer."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _nth(devices: Sequence[str | None], i: int) -> str | None:
    return devices[i] if i < len(devices) else None


def _worker_main(
    jobs: Connection,
    index: int,
    heartbeat: float,
    objective: str,
    threads: int,
    device: str | None = None,
) -> None:
    """A worker process: its GPU (``device``, set before torch loads), ``threads`` torch
    threads, the run's stages as they come, its own storage connection."""
    gpus.use(device)
    set_threads(threads)
    signals.install()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        with contextlib.suppress(Exception):  # imported ahead; the run reports what fails
            load_objective(objective)
        _warm_up()
        while (job := jobs.recv()) is not None:
            plan, budget, deadline = job
            jobs.send(_work_share(plan, budget, deadline, index, heartbeat))
    except KeyboardInterrupt:
        sys.exit(signals.EXIT_STATUS)
    except EOFError:
        return  # the run is gone


def _work_share(
    plan: StagePlan, budget: Budget, deadline: float | None, index: int, heartbeat: float
) -> int:
    """A worker's share of a stage; its exit status (0: done)."""
    try:
        storage = storages.open_storage(plan.study.storage, heartbeat=heartbeat)
        fn = load_objective(plan.study.objective)
        work(plan, storage, fn, budget, deadline=deadline, worker=index,
             out=lambda line: print(line, flush=True))  # fmt: skip
    except (StageFailed, UserError) as exc:
        print(f"tuner worker {index}: {storages.mask(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0
