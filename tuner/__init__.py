"""tuner: staged hyperparameter tuning of PyTorch models on Optuna.

The stages follow the tuning playbook's order (batch size, learning rate, optimizer,
architecture); each stage is one Optuna study whose fixed values are the best ones the
stages before it found.

Example:
    >>> import tuner
    >>> study = tuner.load("digits_mlp", storage="sqlite:///digits.db")
    >>> result = tuner.run(study, trials=8, progress=True)
    >>> tuner.best_config(study)["config"]["lr"]

Every function here is a command of ``python -m tuner`` (tuner.api); ``import tuner``
loads neither torch nor Optuna: each function loads what it needs.
"""

__version__ = "0.1.0"  # before the imports: the modules below read it

from tuner.api import (
    RunResult,
    best_config,
    check,
    dashboard,
    export,
    load,
    report,
    run,
    status,
    train,
)
from tuner.config import StudyConfig
from tuner.errors import CheckFailed, StageFailed, StageRefused, UserError

__all__ = [
    "CheckFailed",
    "RunResult",
    "StageFailed",
    "StageRefused",
    "StudyConfig",
    "UserError",
    "__version__",
    "best_config",
    "check",
    "dashboard",
    "export",
    "load",
    "report",
    "run",
    "status",
    "train",
]
