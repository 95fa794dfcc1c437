"""The worker pool of a run (``workers=N``): processes beside this one, each running its
share of every stage on the same storage, one torch thread each by default.

Workers are started with the run, before this process imports torch, so that their own
imports (torch, the objective: seconds) overlap with the run's planning and checks.

A worker that dies (the kernel's OOM killer, ``kill -9``) is replaced, and the new one takes
its share of the stage; the dead one's trial is failed by its heartbeat and run again. An
interrupt of the run is passed on to every worker (tuner.signals), and a worker whose run is
gone (``kill -9`` of it) stops as if interrupted, quietly.

A worker prints nothing of its own progress: its trial lines go through its pipe to the run,
which hands them to its ``out`` (the caller's ``progress=``), as it does its own. Its errors
and the pool's notices go to stderr.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import optuna

from tuner import devices as gpus
from tuner import signals
from tuner import storage as storages
from tuner.errors import StageFailed, UserError
from tuner.objective import load_objective
from tuner.plan import StagePlan
from tuner.stage import Budget, work

MAX_REPLACEMENTS = 8  # workers started in place of dead ones, per run: then the run fails
REIMPORTED = 4  # a worker's exit status: importing the run's script started a run (no guard)
WORKER = "tuner-worker-"  # the workers' process names, then their index
ORPHAN_POLL_SECONDS = 0.5  # how often a worker checks that its run is still there


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
        out: Callable[[str], None] = print,  # where the workers' trial lines go
    ) -> None:
        self._context = multiprocessing.get_context("spawn")  # no forked torch or database
        self.heartbeat, self._objective, self._threads = heartbeat, objective, threads
        self._devices, self._out = list(devices), out
        self._error: Exception | None = None  # what ``out`` raised on the watch's thread
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self._ends: list[Connection] = []  # the workers' ends, closed here once they run
        for index in range(1, n + 1):
            pipe, jobs, process = self._new(index)
            self.pipes.append(pipe)
            self._ends.append(jobs)
            self.processes.append(process)
        self.busy = False  # whether they were handed a stage
        self.replaced = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._job: tuple[StagePlan, Budget, float | None] | None = None
        self._codes: dict[int, int] = {}
        self._watch: threading.Thread | None = None

    def _new(self, index: int) -> tuple[Connection, Connection, BaseProcess]:
        pipe, jobs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(
                jobs,
                index,
                self.heartbeat,
                self._objective,
                self._threads,
                os.getpid(),
                _nth(self._devices, index - 1),
            ),
            name=f"{WORKER}{index}",
        )
        return pipe, jobs, process

    @staticmethod
    def _launch(process: BaseProcess, jobs: Connection) -> None:
        process.start()
        jobs.close()  # the worker's end: a worker that dies is seen as the pipe's end

    def pids(self) -> list[int]:
        """The workers' PIDs, as they are now (those still starting included)."""
        return [p.pid for p in self.processes if p.pid is not None]

    def _interrupted(self) -> list[int]:
        """The PIDs an interrupt of the run goes on to; no worker is replaced from now on."""
        self._stopping = True
        return self.pids()

    def __enter__(self) -> Pool:
        for process, jobs in zip(self.processes, self._ends, strict=True):
            self._launch(process, jobs)
        self._ends = []
        signals.forward_to(self._interrupted)
        return self

    def start(self, plan: StagePlan, budget: Budget, deadline: float | None) -> None:
        """Hand each worker the stage; a worker that dies during it is replaced."""
        self.busy = True
        self._job, self._codes = (plan, budget, deadline), {}
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # a dead worker: the watch replaces it
                pipe.send(self._job)
        self._watch = threading.Thread(target=self._watch_stage, daemon=True)
        self._watch.start()

    def wait(self) -> None:
        """Wait for each worker to be done with the stage; a worker that stopped on a failing
        stage, or died more often than it could be replaced, fails the run."""
        if self._watch is not None:
            while self._watch.is_alive():  # a join with a timeout: interrupts stay prompt
                self._watch.join(0.2)
        if self._error is not None:  # raised here, where the run can handle it
            error, self._error = self._error, None
            raise error
        codes = [self._codes.get(i, 1) for i in range(len(self.processes))]
        if REIMPORTED in codes:
            raise UserError(
                f"workers={len(self.processes) + 1}: each worker process imports the script"
                " that runs tuner (multiprocessing's spawn), and this one calls tuner.run as it"
                ' is imported: call it under `if __name__ == "__main__":`, or use workers=1.'
            )
        if any(code == signals.EXIT_STATUS for code in codes):
            raise KeyboardInterrupt
        failed = [code for code in codes if code]
        if failed:
            raise StageFailed(f"a worker process ended with exit status {failed[0]}")

    def _watch_stage(self) -> None:
        """Collect each worker's exit status for the stage; start a new worker in place of
        one that died, and hand it the stage."""
        pending = set(range(len(self.processes)))
        while pending:
            with self._lock:
                waits: list[Any] = [self.pipes[i] for i in pending]
                waits += [self.processes[i].sentinel for i in pending]
            wait(waits, timeout=1.0)
            for i in sorted(pending):
                with self._lock:
                    pipe, process = self.pipes[i], self.processes[i]
                    code = self._reported(pipe, self._line)
                    if code is None and process.is_alive():
                        continue
                    if code is None:
                        process.join()
                        code = process.exitcode if process.exitcode else 1
                        if self._replace(i, code):
                            continue
                    self._codes[i] = code
                    pending.discard(i)

    @staticmethod
    def _reported(pipe: Connection, line: Callable[[str], None]) -> int | None:
        """A worker's exit status for the stage, if it sent one; the lines it sent before it
        go to ``line``."""
        try:
            while pipe.poll():
                message = pipe.recv()
                if not isinstance(message, str):
                    return int(message)
                line(message)
        except (EOFError, OSError):
            pass  # the worker is gone: its exit status tells
        return None

    def _line(self, line: str) -> None:
        """A worker's trial line, to the run's ``out``; what ``out`` raises is raised by
        ``wait``, on the run's thread, and the lines after it are dropped."""
        if self._error is not None:
            return
        try:
            self._out(line)
        except Exception as exc:  # a closed stdout (`run | head`), a failing progress=
            self._error = exc

    def _replace(self, i: int, code: int) -> bool:
        """Start a worker in place of worker ``i``, which died with ``code``, and hand it the
        stage; False where the run is stopping or has replaced too many."""
        if self._stopping or code in (signals.EXIT_STATUS, REIMPORTED):
            return False
        if self.replaced >= MAX_REPLACEMENTS:
            return False
        self.replaced += 1
        print(
            f"tuner: worker {i + 1} ended with exit status {code}; a new worker takes its place"
            " (its trial is failed once its heartbeat stops, and run again).",
            file=sys.stderr,
            flush=True,
        )
        self.pipes[i].close()
        self.pipes[i], jobs, self.processes[i] = self._new(i + 1)
        self._launch(self.processes[i], jobs)
        if self._stopping:  # interrupted while it started: it missed the interrupt
            self.processes[i].terminate()  # still importing: no trial of its own yet
        with contextlib.suppress(OSError):
            self.pipes[i].send(self._job)
        return True

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._stopping = True
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if not self.busy:
                process.terminate()  # still starting up, no trial of theirs to keep
            with contextlib.suppress(OSError):
                pipe.send(None)  # the run is over; a worker in a stage finishes its share first
        for process in self.processes:
            process.join()
        if self._watch is not None:
            self._watch.join()
        signals.forward_to(None)


def starting_worker() -> bool:
    """Whether this process is a worker that is still importing the run's main module, as
    multiprocessing's spawn does before the worker's own code runs."""
    current = multiprocessing.current_process()
    return bool(getattr(current, "_inheriting", False)) and current.name.startswith(WORKER)


def _warm_up() -> None:
    """Pay a process's one-time cost of its first trial ahead, while a worker waits for the
    run's plan and checks: torch imports its compiler (torch._dynamo, about 1 s here) when
    the process builds its first optimizer."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _nth(devices: Sequence[str | None], i: int) -> str | None:
    return devices[i] if i < len(devices) else None


def _watch_run(run_pid: int) -> None:
    """In a worker: once its run is gone (killed), stop as an interrupt would, quietly: the
    running trial is recorded as interrupted, and nothing more is printed."""
    while os.getppid() == run_pid:
        time.sleep(ORPHAN_POLL_SECONDS)
    with open(os.devnull, "w") as devnull:  # the terminal or pipe is the run's, not ours
        os.dup2(devnull.fileno(), sys.stdout.fileno())
        os.dup2(devnull.fileno(), sys.stderr.fileno())
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(
    jobs: Connection,
    index: int,
    heartbeat: float,
    objective: str,
    threads: int,
    run_pid: int,
    device: str | None = None,
) -> None:
    """A worker process: its GPU (``device``, set before torch loads), ``threads`` torch
    threads, the run's stages as they come, its own storage connection."""
    gpus.use(device)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # Ctrl-C reaches the run alone, which passes it on (tuner.signals)
    signals.install()
    threading.Thread(target=_watch_run, args=(run_pid,), daemon=True).start()
    set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        with contextlib.suppress(Exception):  # imported ahead; the run reports what fails
            load_objective(objective)
        _warm_up()
        while (job := jobs.recv()) is not None:
            plan, budget, deadline = job
            jobs.send(_work_share(plan, budget, deadline, index, heartbeat, jobs))
    except KeyboardInterrupt:
        sys.exit(signals.EXIT_STATUS)
    except (EOFError, OSError):
        return  # the run is gone


def _work_share(
    plan: StagePlan,
    budget: Budget,
    deadline: float | None,
    index: int,
    heartbeat: float,
    run: Connection,
) -> int:
    """A worker's share of a stage, its lines sent to the ``run``; its exit status (0: done)."""

    def out(line: str) -> None:
        with contextlib.suppress(OSError):  # the run is gone: the worker stops (_watch_run)
            run.send(line)

    try:
        storage = storages.open_storage(plan.study.storage, heartbeat=heartbeat)
        fn = load_objective(plan.study.objective)
        work(plan, storage, fn, budget, deadline=deadline, worker=index, out=out)
    except (StageFailed, UserError) as exc:
        print(f"tuner worker {index}: {storages.mask(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0
