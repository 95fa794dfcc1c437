"""A stage's search space: read from YAML, checked, and turned into ``trial.suggest_*``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from tuner import yamlio

SPACES_DIR = Path(__file__).resolve().parent

# The fields that say what kind of parameter a spec is; a study's change that names one of
# them replaces the kind instead of merging into it.
_KIND_FIELDS = {"choices", "low", "high", "log", "step", "powers_of_two", "around", "scale"}
_FIELDS = _KIND_FIELDS | {"per", "when", "natural", "probe"}


class SearchSpaceError(ValueError):
    """A search space that cannot be searched; the message names the parameter."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a stage: a config key and the distribution it is drawn from.

    ``per`` gives the parameter one Optuna name per value of another key (``lr[sgd]``,
    ``lr[adam]``), so conditional parameters never share a name; ``when`` keeps it to some
    values of another key; ``around`` searches a log range of that factor around the
    incumbent's value, moved by ``scale`` when the ``per`` key differs from the incumbent's.
    """

    key: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    around: float | None = None
    scale: Mapping[str, float] = field(default_factory=dict)
    per: str | None = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    natural: tuple[str, ...] = ()  # edges ("low", "high") that a best value may sit at
    probe: bool = False  # each other choice is tried once on the incumbent, first thing

    def active(self, config: Mapping[str, Any]) -> bool:
        """Whether this parameter exists for a config (its ``when`` holds)."""
        return all(_lookup(config, key) in values for key, values in self.when.items())

    def name(self, config: Mapping[str, Any]) -> str:
        """The Optuna parameter name: the key, or ``key[value of per]``."""
        return self.key if self.per is None else f"{self.key}[{_lookup(config, self.per)}]"

    def distribution(
        self, config: Mapping[str, Any], incumbent: Mapping[str, Any]
    ) -> BaseDistribution:
        """The distribution to draw from, for a trial's config so far."""
        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        if self.around is not None:
            center = float(_lookup(incumbent, self.key))
            if self.per is not None and self.scale:
                ours, theirs = _lookup(config, self.per), _lookup(incumbent, self.per)
                center *= self.scale.get(ours, 1.0) / self.scale.get(theirs, 1.0)
            return FloatDistribution(center / self.around, center * self.around, log=True)
        assert self.low is not None and self.high is not None
        if self.integer:
            step = int(self.step or 1)
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=step)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    """The parameters one stage searches, the values it trains with, and how it samples."""

    stage: str
    params: tuple[Param, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)  # config values set by the stage
    grid: bool = False  # try every combination (incumbent first) instead of sampling

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this stage searches."""
        return tuple(dict.fromkeys(p.key for p in self.params))

    def without(self, keys: set[str]) -> SearchSpace:
        """The space with some keys fixed by hand (no longer searched)."""
        return replace(self, params=tuple(p for p in self.params if p.key not in keys))


def load(
    stage: str, changes: Mapping[str, Any] | None = None, directory: Path | None = None
) -> SearchSpace:
    """Read ``search_spaces/<stage>.yaml`` and apply a study file's changes to it.

    Example:
        >>> space = load("lr", {"lr": {"high": 0.1}})
        >>> space.keys
        ('lr', 'schedule', 'warmup')

    Args:
        stage: The stage name, which is the file name.
        changes: ``{param: spec}`` merged over the file's params; ``{param: None}`` drops one.
        directory: Where the YAML files are (the package folder by default).
    """
    path = (directory or SPACES_DIR) / f"{stage}.yaml"
    if not path.is_file():
        raise SearchSpaceError(f"No search space for stage '{stage}' ({path}).")
    data = yamlio.load(path) or {}
    unknown = set(data) - {"params", "set", "grid"}
    if unknown:
        raise SearchSpaceError(f"{path.name}: unknown keys {sorted(unknown)}.")
    specs: dict[str, Any] = dict(data.get("params") or {})
    for key, change in (changes or {}).items():
        if change is None:
            specs.pop(key, None)
        elif not isinstance(change, Mapping):
            raise SearchSpaceError(f"search_spaces.{stage}.{key} must be a mapping or null.")
        elif key in specs and _kind(change) in (None, _kind(specs[key])):
            specs[key] = {**specs[key], **change}  # same kind of parameter: merge fields
        else:
            base = {k: v for k, v in specs.get(key, {}).items() if k not in _KIND_FIELDS}
            specs[key] = {**base, **change}
    params = tuple(_param(f"{stage}.{key}", key, spec) for key, spec in specs.items())
    space = SearchSpace(stage, params, dict(data.get("set") or {}), bool(data.get("grid")))
    if space.grid and any(p.choices is None or p.per or p.when for p in params):
        raise SearchSpaceError(f"{stage}: a grid stage takes plain choices only.")
    return space


def suggest(
    trial: optuna.trial.BaseTrial, space: SearchSpace, incumbent: Mapping[str, Any]
) -> dict[str, Any]:
    """Draw a stage's parameters for a trial: ``{config key: value}``.

    ``per`` and ``when`` read the values drawn so far in this trial, else the incumbent's.
    """
    drawn: dict[str, Any] = {}
    for param in space.params:
        view = _Overlay(drawn, incumbent)
        if not param.active(view):
            continue
        name = param.name(view)
        dist = param.distribution(view, incumbent)
        drawn[param.key] = _suggest(trial, name, dist)
    return drawn


def params_of(
    space: SearchSpace, config: Mapping[str, Any], incumbent: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The Optuna params that reproduce a config in this space (to enqueue a trial).

    A number outside its range is moved to the nearest edge (a weight decay of 0 on a log
    range from 1e-5 becomes 1e-5): Optuna cannot hold it, and the trial would fail.
    """
    params = {}
    for p in space.params:
        if not p.active(config):
            continue
        value = _lookup(config, p.key)
        if p.choices is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            dist = p.distribution(config, incumbent if incumbent is not None else config)
            low, high = dist.low, dist.high  # type: ignore[attr-defined]
            value = type(value)(min(max(value, low), high))
        params[p.name(config)] = value
    return params


def probes(space: SearchSpace, incumbent: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stage's probes, as config changes: the incumbent with one other choice of each
    ``probe: true`` parameter (a normalization layer on the start's plain net), so that the
    sampler sees each such choice once at tuned values, not only at random ones."""
    changes = []
    for param in space.params:
        if param.probe and param.choices is not None and param.active(incumbent):
            current = _lookup(incumbent, param.key)
            changes += [{param.key: c} for c in param.choices if c != current]
    return changes


def grid_points(space: SearchSpace, incumbent: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a grid stage, ``{config key: value}``, the incumbent's first."""
    keys = space.keys
    choices = [p.choices or () for p in space.params]
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]
    first = {k: _lookup(incumbent, k) for k in keys}
    return sorted(points, key=lambda point: point != first)


# --- reading and checking a spec --------------------------------------------------------


# The field that says what kind of parameter a spec is. choices and powers_of_two are two
# kinds: merged, the file's powers_of_two would win over a study's choices.
_KIND_OF = {"choices": "choices", "powers_of_two": "powers_of_two", "around": "around",
            "low": "range", "high": "range"}  # fmt: skip


def _kind(spec: Mapping[str, Any]) -> str | None:
    """What kind of parameter a spec describes (None: it only tweaks fields)."""
    return next((kind for field_, kind in _KIND_OF.items() if field_ in spec), None)


def _param(where: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, Mapping):
        raise SearchSpaceError(f"{where}: a parameter is a mapping (low/high, choices, ...).")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise SearchSpaceError(f"{where}: unknown fields {sorted(unknown)}.")
    if len({kind for field_, kind in _KIND_OF.items() if field_ in spec}) > 1:
        named = [field_ for field_ in _KIND_OF if field_ in spec]
        raise SearchSpaceError(
            f"{where}: a parameter is one of choices, powers_of_two, around or low/high,"
            f" but it names {', '.join(named)}."
        )
    when = {
        k: tuple(v) if isinstance(v, list) else (v,) for k, v in (spec.get("when") or {}).items()
    }
    natural = spec.get("natural") or []
    if not isinstance(natural, list) or not set(natural) <= {"low", "high"}:
        raise SearchSpaceError(f"{where}: natural is a list of edges, low and/or high.")
    probe = spec.get("probe", False)
    if not isinstance(probe, bool) or (probe and "choices" not in spec):
        raise SearchSpaceError(f"{where}: probe is true or false, and for choices only.")
    common: dict[str, Any] = {
        "key": key,
        "per": spec.get("per"),
        "when": when,
        "natural": tuple(natural),
        "probe": probe,
    }
    if "powers_of_two" in spec:
        return Param(choices=_powers_of_two(where, spec["powers_of_two"]), **common)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}: choices must be a non-empty list, got {choices!r}.")
        return Param(choices=tuple(choices), **common)
    if "around" in spec:
        factor = spec["around"]
        if not isinstance(factor, (int, float)) or factor <= 1:
            raise SearchSpaceError(f"{where}: around must be a factor above 1, got {factor!r}.")
        scale = dict(spec.get("scale") or {})
        if any(not isinstance(v, (int, float)) or v <= 0 for v in scale.values()):
            raise SearchSpaceError(f"{where}: scale values must be numbers above 0.")
        return Param(around=float(factor), scale=scale, **common)
    return _range(where, spec, common)


def _range(where: str, spec: Mapping[str, Any], common: dict[str, Any]) -> Param:
    low, high, log, step = (
        spec.get("low"),
        spec.get("high"),
        bool(spec.get("log")),
        spec.get("step"),
    )
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SearchSpaceError(f"{where}: {name} must be a number, got {value!r}.")
    assert low is not None and high is not None
    if low > high:
        raise SearchSpaceError(
            f"{where}: low must be at most high, but got low={low} > high={high}."
        )
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: a log range needs low > 0, but got low={low}.")
    if log and step is not None:
        raise SearchSpaceError(f"{where}: step cannot be combined with log.")
    integer = isinstance(low, int) and isinstance(high, int) and not isinstance(step, float)
    return Param(low=low, high=high, log=log, step=step, integer=integer, **common)


def _powers_of_two(where: str, bounds: Any) -> tuple[int, ...]:
    ok = isinstance(bounds, list) and len(bounds) == 2 and all(_is_power_of_two(b) for b in bounds)
    if not ok or bounds[0] > bounds[1]:
        raise SearchSpaceError(
            f"{where}: powers_of_two takes [low, high], both powers of two, got {bounds!r}."
        )
    low, high = int(math.log2(bounds[0])), int(math.log2(bounds[1]))
    return tuple(2**k for k in range(low, high + 1))


def _is_power_of_two(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value > 0
        and not value & (value - 1)
    )


def _suggest(trial: optuna.trial.BaseTrial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


class _Overlay(Mapping[str, Any]):
    """The values drawn so far over the incumbent, for ``per``/``when`` look-ups."""

    def __init__(self, drawn: Mapping[str, Any], base: Mapping[str, Any]) -> None:
        self._drawn, self._base = drawn, base

    def __getitem__(self, key: str) -> Any:
        return self._drawn[key] if key in self._drawn else _lookup(self._base, key)

    def __iter__(self) -> Any:
        return iter(self._drawn)

    def __len__(self) -> int:
        return len(self._drawn)


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    """A dotted key in a nested config (or a flat key in an overlay)."""
    if isinstance(config, _Overlay):
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise SearchSpaceError(f"The config has no key '{key}' (a search space names it).")
        node = node[part]
    return node
