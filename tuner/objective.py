"""Loading an objective (``module:function``) and checking that it can be called as one.

An objective is a plain function ``train(config, report) -> metrics``: ``config`` is the
trial config (a dict), ``report(epoch, metrics)`` is called once per epoch with the
validation metrics, and the return value is a dict of the best epoch's validation metrics.
To score a test split for ``tuner train`` it also takes ``test: bool = False``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.errors import UserError

Report = Callable[[int, dict[str, float]], None]
Objective = Callable[..., dict[str, Any]]

_GIVEN: dict[str, Objective] = {}  # callables passed from Python, by their spec


def register(fn: Objective) -> str:
    """The ``module:function`` spec of a callable passed from Python, remembered in this process
    so that ``load_objective`` returns the callable itself (a lambda or a notebook's function
    included); the stages store the spec."""
    if not callable(fn):
        raise UserError(f"objective must be a function (config, report) or 'module:function',"
                        f" got {type(fn).__name__}.")  # fmt: skip
    module = getattr(fn, "__module__", None) or "__main__"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__)
    spec = f"{module}:{name}"
    _check_signature(spec, fn)
    _GIVEN[spec] = fn
    return spec


def not_importable(spec: str) -> str | None:
    """Why a worker process (which imports its objective anew) could not load ``spec``, or
    None: a lambda or a function defined inside another, or one of a notebook's cells."""
    if spec not in _GIVEN:
        return None
    module, _, name = spec.partition(":")
    if "<" in name or "." in name:
        return f"objective {name} is a lambda or is defined inside a function or class"
    main = sys.modules.get("__main__")
    if module == "__main__" and getattr(main, "__file__", None) is None:
        return f"objective {name} is defined in a notebook or an interactive session"
    return None


def load_objective(spec: str) -> Objective:
    """Import ``module:function``; the current folder is importable, like ``python -m``."""
    if spec in _GIVEN:
        return _GIVEN[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(
            f"objective must be 'module:function' (like objectives:train), got '{spec}'."
        )
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(
            f"objective {spec}: cannot import module '{exc.name}' (is it installed, or in the"
            " current folder?)."
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"objective {spec}: module {module_name} has no function '{attr}'.")
    _check_signature(spec, fn)
    return fn


def load_validator(spec: str) -> Callable[[dict[str, Any]], None] | None:
    """The ``validate(config)`` of an objective's module, if it has one.

    A validator raises ValueError for a config the objective cannot run; tuner calls it
    before anything is written.
    """
    module = importlib.import_module(spec.partition(":")[0])
    validate = getattr(module, "validate", None)
    return validate if callable(validate) else None


def load_probe(spec: str) -> Callable[[dict[str, Any]], Any] | None:
    """The ``probe(config)`` of an objective's module, if it has one.

    A probe returns what tuner's pre-flight checks read (see ``objectives/probe.py``): the
    splits as tensors, a fresh model, the loss and the number of classes.
    """
    module = importlib.import_module(spec.partition(":")[0])
    probe = getattr(module, "probe", None)
    return probe if callable(probe) else None


def accepts_test(fn: Objective) -> bool:
    """Whether an objective can score the test split (takes a ``test`` keyword)."""
    try:
        return "test" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_signature(spec: str, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: trust it
    try:
        signature.bind({}, lambda epoch, metrics: None)
    except TypeError:
        raise UserError(
            f"objective {spec}: must take (config, report), but its signature is {signature}."
        ) from None
