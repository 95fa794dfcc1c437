"""tuner from Python: every command of ``python -m tuner`` as a function, for notebooks and
scripts. The command line is a thin layer on these (tuner.cli): it parses ``key=value``,
calls them, prints and maps errors to exit codes.

Example (a short run of the digits study in a fresh folder):

    >>> import tuner
    >>> study = tuner.load("digits_mlp", epochs=3, storage="sqlite:///digits.db")
    >>> result = tuner.run(study, trials=8)            # quiet unless progress=True
    >>> [row.stage for row in result.stages]
    ['batch_size', 'lr', 'optimizer', 'architecture', 'refine']
    >>> best = tuner.best_config(study)                # the document `export` writes
    >>> metrics = tuner.train(best, out="trained")     # train it, score the test split once

A user's mistake raises ``tuner.UserError`` with the one-line message the command line
prints; nothing is written before the arguments have passed their checks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.config import (
    DEFAULT_STUDY,
    StudyConfig,
    apply_values,
    load_study,
    study_from,
)
from tuner.errors import UserError
from tuner.objective import Objective, not_importable, register

if TYPE_CHECKING:
    from tuner._status import StageStatus
    from tuner.checks import Check

Progress = bool | Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    """What ``run`` did: the stages as they stand after it, and why it ended."""

    study: StudyConfig
    stages: list[StageStatus]  # every stage of the study, as ``status`` gives them
    seconds: float  # wall time of the run
    ended: str  # why it ended, in words (the rule that stopped it, or "budget spent")

    @property
    def best(self) -> dict[str, Any]:
        """The best config found, as ``best_config`` gives it."""
        return best_config(self.study)


def load(
    study: str | Path | Mapping[str, Any] | StudyConfig = DEFAULT_STUDY,
    *,
    objective: str | Objective | None = None,
    **overrides: Any,
) -> StudyConfig:
    """A study: a bundled name (``"digits_mlp"``), a study file, a mapping with a study file's
    keys, or a study already loaded; with overrides set as ``key=value`` would set them.

    Example:
        >>> study = tuner.load("mnist1d_cnn", lr=1e-3, model={"width": 64}, epochs=20)
        >>> study.config["model"]["width"]
        64

    Args:
        study: What to load.
        objective: The objective: ``"module:function"`` or the function itself, a plain
            ``fn(config, report) -> metrics`` (see ``objectives/``). A function defined in a
            notebook runs in this process only: ``workers=1``.
        overrides: Config keys of the study's ``defaults`` (nested as mappings, or dotted
            through ``**{"model.width": 64}``), and ``storage``, ``metric``, ``direction``,
            ``sampler={...}``, ``pruner={...}``. Each must have the type of what it replaces.
    """
    if isinstance(study, StudyConfig):
        loaded = study
    elif isinstance(study, Mapping):
        data = dict(study)
        if callable(data.get("objective")):
            data["objective"] = register(data["objective"])
        loaded = study_from(data, "<dict>", default_name="study")
    else:
        loaded = load_study(str(study))
    if objective is not None:
        overrides["objective"] = register(objective) if callable(objective) else objective
    return apply_values(loaded, overrides) if overrides else loaded


def run(
    study: StudyConfig,
    *,
    stage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    restart: bool = False,
    workers: int | None = None,
    threads: int | None = None,
    heartbeat: float | None = None,
    check: bool = True,
    deterministic: bool | None = None,
    devices: str | None = None,
    start: str | Path | None = None,
    progress: Progress = False,
) -> RunResult:
    """Tune: every stage in order, or one ``stage``; a re-run resumes where it stopped.

    As on the command line, SIGTERM interrupts the run as Ctrl-C does (KeyboardInterrupt; the
    running trials, the worker processes' too, are recorded as interrupted); the caller's
    signal handlers are put back when it returns or raises. So is ``CUDA_VISIBLE_DEVICES``,
    which the run sets in this process for its trials here (see ``devices``).

    Worker processes are started with multiprocessing's "spawn": each imports the caller's
    main module again, so a script that calls ``run`` with ``workers`` above one (the default
    on a machine with several GPUs) must call it under ``if __name__ == "__main__":``; one
    that does not gets a UserError that says so, after the first stage it runs (which this
    process then ran alone). A notebook needs nothing of the kind.

    Args:
        study: From ``load``.
        stage: One stage only (``"lr"``); by default all, each fixing the best values of the
            stages before it.
        trials: Finished trials for the run, shared among the stages as the study says (by
            default each stage's own budget).
        timeout: Seconds for the run, shared the same way (by default the study's).
        restart: Run a stage anew when the stages before it have changed since it ran.
        workers: Processes, each running its share of every stage on the same storage (by
            default one, or one per visible GPU); see above for scripts.
        threads: torch threads per process (None: this one keeps torch's setting, workers
            take one each).
        heartbeat: Seconds between a running trial's heartbeats (10 by default); a trial
            silent for several is failed and retried.
        check: Run the pre-flight checks (seeds/003) first; a failure raises CheckFailed.
        deterministic: Replace the batch-size stage's time race by the study's sample budget
            (``budget.samples``), so that one seed gives the same trials on any machine (None:
            the study file's ``deterministic``).
        devices: GPUs for the worker processes, one each (``"0,1"``; ``"cpu"``: none); by
            default every visible GPU. This process takes the first: where it has started
            CUDA already, only the GPU it uses will do (anything else raises UserError).
        start: A warm start: an exported config (``best.yaml``) or another study of the same
            storage, whose tuned values every stage starts from.
        progress: False prints nothing, True prints a line per trial, a function receives
            each line; the worker processes' lines too (on another thread of this process).
    """
    from tuner import _status as status
    from tuner import devices as gpus
    from tuner import pool, race, runner, signals, warmstart
    from tuner import storage as storages

    if pool.starting_worker():  # a script without ``if __name__ == "__main__":``
        sys.exit(pool.REIMPORTED)  # quietly: the run it belongs to says what to do
    heartbeat = storages.HEARTBEAT_SECONDS if heartbeat is None else heartbeat
    _check_run(study, stage, trials, timeout, workers, threads, heartbeat)
    study = race.apply(study, deterministic)
    asked = workers if workers is not None else (1 if study.deterministic else None)
    assignment = gpus.resolve(devices, asked, str(study.config.get("device", "auto")))
    workers = len(assignment)
    race.check_deterministic(study, workers=workers, timeout=timeout, stage=stage)
    study = warmstart.apply(study, None if start is None else str(start))
    out = _printer(progress)
    for line in (race.describe(study), warmstart.describe(study)):
        if line:
            out(line)
    spec = study.objective
    if workers > 1 and (why := not_importable(spec)) is not None:
        raise UserError(
            f"workers={workers}: {why}, and worker processes import their objective; define"
            " it in a module (a .py file) and pass it from there, or use workers=1."
        )
    started = time.time()
    with _quiet_optuna(), signals.installed():
        ended = runner.run(
            study,
            stage=stage,
            trials=trials,
            timeout=timeout,
            restart=restart,
            workers=workers,
            threads=threads,
            heartbeat=heartbeat,
            check=check,
            devices=assignment,
            out=out,
            draw=progress is True,
        )
        rows = status.collect(study)
    return RunResult(study, rows, time.time() - started, ended)


def status(study: StudyConfig) -> list[StageStatus]:
    """Every stage as it stands: trials by state, the best value and params, the fixed values
    and where they came from. Rows of dataclasses: ``pandas.DataFrame(map(vars, rows))``."""
    from tuner import _status as status_

    with _quiet_optuna():
        return status_.collect_existing(study)


def best_config(study: StudyConfig, stage: str | None = None) -> dict[str, Any]:
    """The best config, complete and with its provenance: the document ``export`` writes
    (of the last stage with a finished trial, or of ``stage``)."""
    from tuner import _export as export_

    with _quiet_optuna():
        return export_.best_config(study, stage)


def export(study: StudyConfig, out: str | Path = "best.yaml", stage: str | None = None) -> Path:
    """Write ``best_config`` as YAML to ``out``; return its path."""
    from tuner import _export as export_

    export_.check_out(str(out))  # before the storage is read
    return export_.write(best_config(study, stage), str(out))


def train(
    config: str | Path | Mapping[str, Any],
    out: str | Path = "trained",
    *,
    repeats: int = 1,
    threads: int | None = None,
    progress: Progress = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train an exported config (a file, or the document of ``best_config``), score the test
    split once, save ``model.pt`` and ``metrics.yaml`` to ``out``; return the metrics.

    Args:
        config: ``best.yaml`` or the mapping ``best_config`` returns.
        out: The folder to write.
        repeats: Train seeds seed..seed+repeats-1 and report each metric's mean ± std.
        threads: torch threads (None: torch's setting).
        progress: As for ``run``.
        overrides: Config keys to change, typed as in the config.
    """
    from tuner import _train as train_

    _at_least("repeats", repeats, 1)
    if threads is not None:
        _at_least("threads", threads, 1)
    if not str(out):
        raise UserError("out=: train needs a folder to write (out=trained).")
    document = train_.prepare(config, overrides)
    _set_threads(threads)
    return train_.train(
        document,
        str(out),
        {},
        _printer(progress),
        repeats=repeats,
    )


def report(study: StudyConfig, out: str | Path | None = None, format: str | None = None) -> Path:
    """One self-contained HTML page of the stages and their plots (or ``format="csv"``: one
    row per trial); return its path."""
    from tuner import _report as report_

    with _quiet_optuna():
        return report_.make(study, None if out is None else str(out), format)


def check(
    study: StudyConfig, *, threads: int | None = None, progress: Progress = False
) -> list[Check]:
    """The pre-flight checks (seeds/003) of the study's config: labels, balance, scale,
    disjoint splits, initial loss, overfitting a batch, gradients, learning. Raises
    CheckFailed when one fails; returns each check's result."""
    from tuner import checks

    if threads is not None:
        _at_least("threads", threads, 1)
    _set_threads(threads)
    return checks.preflight(study.config, study.objective, _printer(progress))


def dashboard(
    study: StudyConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifacts: str | None = None,
    progress: Progress = True,
) -> None:
    """Serve optuna-dashboard on the study's storage until interrupted."""
    from tuner import _dashboard as dashboard_

    dashboard_.serve(study, host=host, port=port, artifacts=artifacts, out=_printer(progress))


# --- checks of the arguments: the same one-line messages as the command line's -------------


def _check_run(
    study: StudyConfig,
    stage: str | None,
    trials: int | None,
    timeout: float | None,
    workers: int | None,
    threads: int | None,
    heartbeat: float,
) -> None:
    if stage is not None and stage not in study.stages:
        raise UserError(
            f"Unknown stage '{stage}'; this study's stages: {', '.join(study.stages)}"
            " (or leave stage= out to run them all)."
        )
    if trials is not None:
        _at_least("trials", trials, 1)
    if timeout is not None:
        _seconds("timeout", timeout)
    if workers is not None:
        _at_least("workers", workers, 1)
    if threads is not None:
        _at_least("threads", threads, 1)
    _seconds("heartbeat", heartbeat)


def _at_least(key: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}={value}: {key} must be an integer.")
    if value < least:
        raise UserError(f"{key}={value}: {key} must be at least {least}.")


def _seconds(key: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}={value:g}: {key} must be a number of seconds above 0.")


def _printer(progress: Progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, flush=True)
    return lambda line: None


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own log lines and experimental warnings would drown ours; restored after."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    alembic = logging.getLogger("alembic")
    alembic_level = alembic.level
    alembic.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)
        alembic.setLevel(alembic_level)
