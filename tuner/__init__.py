"""tuner: staged hyperparameter tuning of PyTorch models on Optuna.

The stages follow the tuning playbook's order (batch size, learning rate, optimizer,
architecture, then a refinement of the lr and its schedule on the final net); each stage is
one Optuna study whose fixed values are the best ones the stages before it found.

Example:
    >>> import tuner
    >>> study = tuner.load("digits_mlp", storage="sqlite:///digits.db")
    >>> result = tuner.run(study, trials=8, progress=True)
    >>> tuner.best_config(study)["config"]["lr"]

Every function here is a command of ``python -m tuner`` (tuner.api); ``import tuner``
loads neither torch nor Optuna: each function loads what it needs, and so do the result
types ``StageStatus`` (a row of ``status``) and ``Check`` (a result of ``check``), on first
use.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from tuner._status import StageStatus
    from tuner.checks import Check

# The result types whose modules load Optuna or torch: imported when first asked for.
_LAZY = {"StageStatus": "tuner._status", "Check": "tuner.checks"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "Check",
    "CheckFailed",
    "RunResult",
    "StageFailed",
    "StageRefused",
    "StageStatus",
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
