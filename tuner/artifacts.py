"""The weights of each stage's best trial, kept as Optuna artifacts the dashboard offers
for download.

The files live in a folder next to the SQLite file (``tuner_artifacts/`` beside
``tuner.db``), or, for a database server, in ``artifacts=FOLDER`` or ``./tuner_artifacts``;
the storage keeps which trial each file belongs to.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from tuner import storage as storages
from tuner.errors import UserError

FOLDER = "tuner_artifacts"


def folder(storage_url: str, artifacts: str | None = None) -> Path:
    """Where a storage's artifacts live: ``artifacts`` if given, else ``tuner_artifacts``
    next to the SQLite file, or in the current folder for a database server."""
    if artifacts is not None:
        return Path(artifacts)
    path = storages.sqlite_path(storage_url)
    return (path.parent if path is not None else Path.cwd()) / FOLDER


def store(
    storage_url: str, artifacts: str | None = None, *, create: bool = False
) -> FileSystemArtifactStore:
    """The artifact store of a storage (its folder made with ``create``, else maybe not yet)."""
    path = folder(storage_url, artifacts)
    if create and not path.is_dir():
        if not path.parent.is_dir():
            raise UserError(f"artifacts={path}: folder {path.parent} does not exist.")
        path.mkdir(exist_ok=True)
    return FileSystemArtifactStore(path)


def becomes_best(study: optuna.Study, value: float) -> bool:
    """Whether a trial scoring ``value`` beats every COMPLETE trial of the stage so far."""
    if not math.isfinite(value):
        return False
    best = storages.best_complete(study)
    if best is None:
        return True
    if study.direction == optuna.study.StudyDirection.MAXIMIZE:
        return value > best[1]
    return value < best[1]


def save_weights(
    study: optuna.Study,
    trial: optuna.Trial,
    model: Any,
    storage_url: str,
    artifacts: str | None = None,
) -> str:
    """Save a model's ``state_dict`` as an artifact of its trial; return the artifact id.

    Example:
        >>> if artifacts.becomes_best(trial.study, value):
        ...     artifacts.save_weights(trial.study, trial, result["model"], "sqlite:///tuner.db")

    Args:
        study: The stage study the trial belongs to (its name goes into the file name).
        trial: The running trial; the dashboard lists the file under it.
        model: A ``torch.nn.Module`` (its ``state_dict`` is saved) or any object torch saves.
        storage_url: The study's storage URL: the artifact folder sits next to its file.
        artifacts: The artifact folder, where it is not the default one.
    """
    import torch  # only the runner, which trains, pays for this import

    target = store(storage_url, artifacts, create=True)
    state = model.state_dict() if hasattr(model, "state_dict") else model
    name = f"{study.study_name.replace('/', '-')}-trial{trial.number}-weights.pt"
    with tempfile.TemporaryDirectory(prefix="tuner-weights-") as tmp:
        path = Path(tmp) / name
        torch.save(state, path)
        return upload_artifact(
            artifact_store=target,
            file_path=str(path),
            study_or_trial=trial,
            mimetype="application/octet-stream",
        )
