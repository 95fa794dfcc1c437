"""Study files and ``key=value`` overrides, resolved into one frozen study config.

A study file (``studies/*.yaml``) names the objective, the metric, the stage plan, the
budget, the sampler and pruner, and ``defaults``: the trial config the objective reads.
Overrides are strict (nanoGPT's rule): an unknown key is an error that suggests the close
match, and a value must have the type of the default it replaces.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner import yamlio
from tuner.errors import UserError

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
DEFAULT_STUDY = "mnist1d_cnn"
KNOWN_STAGES = ("batch_size", "lr", "optimizer", "architecture")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "successive_halving", "none")

_TOP_KEYS = {
    "name", "objective", "metric", "direction", "storage", "stages", "budget", "sampler",
    "pruner", "search_spaces", "defaults",
}  # fmt: skip
# Study-level keys a ``key=value`` override may set (besides the trial config's keys).
_STUDY_OVERRIDES = ("storage", "metric", "direction", "objective")


# --- nested dicts, addressed by dotted keys ---------------------------------------------


def get_path(data: Mapping[str, Any], key: str) -> Any:
    """``get_path({"model": {"width": 8}}, "model.width") == 8``; KeyError if absent."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in place, creating the sections on the way."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"width": 8}}`` -> ``{"model.width": 8}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def merged(base: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each layer's flat or nested values set over it."""
    out = copy.deepcopy(dict(base))
    for layer in layers:
        for key, value in flatten(layer).items():
            set_path(out, key, copy.deepcopy(value))
    return out


# --- the study config --------------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig:
    """One tuning campaign, as read from a study file and resolved with overrides."""

    name: str
    source: str  # the file it was read from
    objective: str  # "module:function"
    metric: str
    direction: str
    storage: str
    stages: tuple[str, ...]
    trials: dict[str, int]  # finished trials per stage
    timeout: float | None  # seconds for a whole run
    share: dict[str, float]  # how a run's budget is shared among its stages
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    spaces: dict[str, dict[str, Any]]  # the study's changes to search_spaces/<stage>.yaml
    defaults: dict[str, Any]  # the trial config the objective reads
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys set by hand

    @property
    def config(self) -> dict[str, Any]:
        """The trial config before any stage: defaults with the overrides set by hand."""
        return merged(self.defaults, self.overrides, self._objective_keys())

    def _objective_keys(self) -> dict[str, Any]:
        # The built-in objectives read the metric they early-stop on from the config.
        return {"metric": self.metric, "direction": self.direction}

    @property
    def arg(self) -> str:
        """What ``study=`` takes to name this study again: its name, or its file."""
        bundled = Path(self.source).resolve().parent == STUDIES_DIR
        return self.name if bundled and Path(self.source).stem == self.name else self.source

    def stage_name(self, stage: str) -> str:
        """The Optuna study name of a stage: ``<study>/<stage>``."""
        return f"{self.name}/{stage}"

    def as_dict(self) -> dict[str, Any]:
        """The resolved study, as stored with each stage."""
        return {
            "name": self.name,
            "source": self.source,
            "objective": self.objective,
            "metric": self.metric,
            "direction": self.direction,
            "stages": list(self.stages),
            "budget": {"trials": self.trials, "timeout": self.timeout, "share": self.share},
            "sampler": self.sampler,
            "pruner": self.pruner,
            "search_spaces": self.spaces,
            "defaults": self.defaults,
            "overrides": self.overrides,
        }


def study_path(name: str) -> Path:
    """A study name (``digits_mlp``) or a path to a study file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"Study file {name} does not exist.")
        return path
    path = STUDIES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))
        raise UserError(
            f"Unknown study '{name}'{_did_you_mean(name, known)}; studies: {', '.join(known)}"
            " (or study=path/to/study.yaml)."
        )
    return path


def load_study(name: str = DEFAULT_STUDY) -> StudyConfig:
    """Read and check a study file."""
    path = study_path(name)
    data = yamlio.load(path)
    src = str(path)
    if not isinstance(data, dict):
        raise UserError(f"{src}: a study file is a mapping of keys, got {type(data).__name__}.")
    _reject_unknown(data, _TOP_KEYS, src)
    defaults = data.get("defaults")
    if not isinstance(defaults, dict) or not defaults:
        raise UserError(f"{src}: 'defaults' (the trial config) must be a non-empty mapping.")
    stages = data.get("stages", list(KNOWN_STAGES))
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{src}: 'stages' must be a non-empty list of stage names.")
    for stage in stages:
        if stage not in KNOWN_STAGES:
            raise UserError(
                f"{src}: unknown stage '{stage}'{_did_you_mean(str(stage), KNOWN_STAGES)};"
                f" stages are {', '.join(KNOWN_STAGES)}."
            )
    budget = data.get("budget") or {}
    _reject_unknown(budget, {"trials", "timeout", "share"}, f"{src}: budget")
    trials = budget.get("trials", {})
    share = budget.get("share", {})
    study = StudyConfig(
        name=str(data.get("name") or path.stem),
        source=src,
        objective=str(data.get("objective", "objectives:train")),
        metric=str(data.get("metric", "accuracy")),
        direction=str(data.get("direction", "maximize")),
        storage=str(data.get("storage", "sqlite:///tuner.db")),
        stages=tuple(stages),
        trials={s: _positive_int(trials.get(s, 10), f"budget.trials.{s}", src) for s in stages},
        timeout=_optional_seconds(budget.get("timeout"), "budget.timeout", src),
        share={s: _positive_float(share.get(s, 1), f"budget.share.{s}", src) for s in stages},
        sampler=dict(data.get("sampler") or {"name": "tpe"}),
        pruner=dict(data.get("pruner") or {"name": "median"}),
        spaces=dict(data.get("search_spaces") or {}),
        defaults=defaults,
    )
    check(study)
    return study


def check(study: StudyConfig) -> None:
    """The study's settings are ones the engine knows."""
    src = study.source
    if study.direction not in DIRECTIONS:
        raise UserError(f"{src}: direction must be maximize or minimize, got '{study.direction}'.")
    if ":" not in study.objective:
        raise UserError(
            f"{src}: objective must be 'module:function' (like objectives:train),"
            f" got '{study.objective}'."
        )
    sampler = study.sampler.get("name", "tpe")
    if sampler not in SAMPLERS:
        raise UserError(
            f"{src}: sampler.name must be one of {', '.join(SAMPLERS)}, got '{sampler}'."
        )
    pruner = study.pruner.get("name", "median")
    if pruner not in PRUNERS:
        raise UserError(f"{src}: pruner.name must be one of {', '.join(PRUNERS)}, got '{pruner}'.")
    for stage in study.spaces:
        if stage not in study.stages:
            raise UserError(f"{src}: search_spaces.{stage} names no stage of this study.")
    _check_grids(study)


def _check_grids(study: StudyConfig) -> None:
    """A grid stage (batch size) tries every point of its grid: its budget holds them all."""
    import search_spaces  # with optuna: not for --help

    for stage in study.stages:
        try:
            space = search_spaces.load(stage, study.spaces.get(stage))
        except search_spaces.SearchSpaceError:
            continue  # said where the stage is planned, as before
        points = 1
        for param in space.params:
            points *= len(param.choices or ())
        if space.grid and space.params and points > study.trials[stage]:
            listed = "; ".join(
                f"{p.key}: {', '.join(str(c) for c in p.choices or ())}" for p in space.params
            )
            raise UserError(
                f"{study.source}: budget.trials.{stage} is {study.trials[stage]}, but stage"
                f" {stage} tries every point of its grid, {points} of them ({listed}): set"
                f" budget.trials.{stage} to {points}, or narrow search_spaces.{stage}."
            )


# --- overrides -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Overrides:
    """``key=value`` arguments sorted into the command's options and the study's keys."""

    options: dict[str, Any]
    study: StudyConfig


def parse_pairs(args: Iterable[str]) -> dict[str, str]:
    """``["lr=1e-3", "stage=lr"]`` -> ``{"lr": "1e-3", "stage": "lr"}``, strictly."""
    pairs: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserError(f"Arguments are key=value pairs (like lr=0.001), got '{arg}'.")
        if key in pairs:
            raise UserError(f"{key} is given twice.")
        pairs[key] = value
    return pairs


def apply_overrides(
    study: StudyConfig, pairs: Mapping[str, str], options: Mapping[str, type | tuple[type, ...]]
) -> Overrides:
    """Split overrides into command options (typed by ``options``) and study changes."""
    flat_defaults = flatten(study.defaults)
    opts: dict[str, Any] = {}
    hand: dict[str, Any] = dict(study.overrides)
    changes: dict[str, Any] = {}
    pruner, sampler = dict(study.pruner), dict(study.sampler)
    for key, text in pairs.items():
        value = yamlio.parse_value(text)
        if key in options:
            opts[key] = _coerce(key, value, options[key], text)
        elif key in _STUDY_OVERRIDES:
            changes[key] = _coerce(key, value, str, text)
        elif key.startswith("pruner.") or key.startswith("sampler."):
            (pruner if key.startswith("pruner.") else sampler)[key.split(".", 1)[1]] = value
        else:
            extra = [*options, *_STUDY_OVERRIDES, "pruner.name", "sampler.name"]
            hand[key] = coerce_override(key, text, flat_defaults, extra)
    resolved = replace(study, pruner=pruner, sampler=sampler, overrides=hand, **changes)
    check(resolved)
    return Overrides(options=opts, study=resolved)


def coerce_override(
    key: str, text: str, flat_config: Mapping[str, Any], also_known: Iterable[str] = ()
) -> Any:
    """The typed value of ``key=text`` for a config key; unknown keys suggest a close one."""
    if key not in flat_config:
        known = [*also_known, *flat_config]
        raise UserError(f"Unknown config key: {key}{_did_you_mean(key, known)}.")
    return _coerce_like(key, yamlio.parse_value(text), flat_config[key], text)


def _coerce_like(key: str, value: Any, default: Any, text: str) -> Any:
    """A value of the default's type: ints widen to floats, nothing else converts."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        return _coerce(key, value, bool, text)
    if isinstance(default, float):
        return _coerce(key, value, (float, int), text)
    return _coerce(key, value, type(default), text)


def _coerce(key: str, value: Any, kind: type | tuple[type, ...], text: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if str in kinds and not isinstance(value, str) and value is not None:
        return text  # a string option may look like a number ("study=123")
    if isinstance(value, bool) and bool not in kinds:
        value = text  # "yes" parsed as True where a string or number is wanted
    if not isinstance(value, kinds):
        want = _TYPE_WORDS.get(kinds[0], kinds[0].__name__)
        raise UserError(f"{key}={text}: {key} must be {want}.")
    return value


_TYPE_WORDS = {
    int: "an integer",
    float: "a number (like 0.001)",
    str: "a string",
    bool: "true or false",
    list: "a list (like [1,2])",
}


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    known = list(known)
    leaf = [k for k in known if k.rsplit(".", 1)[-1] == key]
    close = leaf or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _reject_unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise UserError(f"{where}: unknown key '{key}'{_did_you_mean(str(key), allowed)}.")


def _positive_int(value: Any, key: str, src: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{src}: {key} must be a whole number of at least 1, got {value!r}.")
    return value


def _positive_float(value: Any, key: str, src: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{src}: {key} must be a number above 0, got {value!r}.")
    return float(value)


def _optional_seconds(value: Any, key: str, src: str) -> float | None:
    return None if value is None else _positive_float(value, key, src)
