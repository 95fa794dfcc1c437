"""Study files and ``key=value`` overrides, resolved into one frozen study config.

A study file (``studies/*.yaml``) names the objective, the metric, the stage plan, the
budget, the sampler and pruner, and ``defaults``: the trial config the objective reads.
Overrides are strict (nanoGPT's rule): an unknown key is an error that suggests the close
match, and a value must have the type of the default it replaces (tuner.coerce types each
value; this module sorts them into a command's options, study keys and config keys).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner import yamlio
from tuner.coerce import coerce, coerce_config_key, did_you_mean, show
from tuner.errors import UserError
from tuner.loop_switches import LOOP_DEFAULTS, read_loop
from tuner.nested import flatten, flatten_values, merged

# The storage URL, over the study file's (storage= wins over both): a URL with a password
# in it stays out of `ps` and the shell's history.
STORAGE_ENV = "TUNER_STORAGE"
STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
DEFAULT_STUDY = "mnist1d_cnn"
KNOWN_STAGES = ("batch_size", "lr", "optimizer", "architecture", "refine")
PLAYBOOK_STAGES = KNOWN_STAGES[:4]  # a study file without `stages:` runs these
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
# pruner.compare_to: what the median is taken over; the first is the default
PRUNER_REFERENCES = ("sampled", "all")

_TOP_KEYS = {
    "name", "objective", "metric", "direction", "storage", "stages", "budget", "sampler",
    "pruner", "search_spaces", "defaults", "loop", "deterministic",
}  # fmt: skip
# Study-level keys a ``key=value`` override may set (besides the trial config's keys).
_STUDY_OVERRIDES = ("storage", "metric", "direction", "objective")


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
    loop: dict[str, Any] = field(default_factory=lambda: dict(LOOP_DEFAULTS))
    deterministic: bool = False  # no time race: the batch-size stage trains ``samples``
    samples: int | None = None  # budget.samples: samples of training per race candidate
    start: dict[str, Any] = field(default_factory=dict)  # warm start: flat key -> value
    start_origin: dict[str, str] = field(default_factory=dict)  # flat key -> where it is from

    @property
    def config(self) -> dict[str, Any]:
        """The trial config before any stage: defaults with the overrides set by hand."""
        return merged(self.defaults, self.start, self.overrides, self._objective_keys())

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
            "budget": {
                "trials": self.trials,
                "timeout": self.timeout,
                "share": self.share,
                "samples": self.samples,
            },
            "deterministic": self.deterministic,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "search_spaces": self.spaces,
            "loop": self.loop,
            "defaults": self.defaults,
            "overrides": self.overrides,
            "start": {
                key: [value, self.start_origin.get(key)] for key, value in self.start.items()
            },
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
            f"Unknown study '{name}'{did_you_mean(name, known)}; studies: {', '.join(known)}"
            " (or study=path/to/study.yaml)."
        )
    return path


def load_study(name: str = DEFAULT_STUDY) -> StudyConfig:
    """Read and check a study file."""
    path = study_path(name)
    return study_from(yamlio.load(path), str(path))


def study_from(data: Any, src: str, default_name: str | None = None) -> StudyConfig:
    """Check a study's mapping (a study file's content) and resolve it; ``src`` names where
    it came from in messages."""
    if not isinstance(data, dict):
        raise UserError(f"{src}: a study file is a mapping of keys, got {type(data).__name__}.")
    if not set(data) & _TOP_KEYS:  # a file that is no study file: quote none of it
        raise UserError(
            f"{src}: not a study file (it has none of the keys {', '.join(sorted(_TOP_KEYS))})."
        )
    _reject_unknown(data, _TOP_KEYS, src)
    defaults = data.get("defaults")
    if not isinstance(defaults, dict) or not defaults:
        raise UserError(f"{src}: 'defaults' (the trial config) must be a non-empty mapping.")
    stages = data.get("stages", list(PLAYBOOK_STAGES))
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{src}: 'stages' must be a non-empty list of stage names.")
    for stage in stages:
        if stage not in KNOWN_STAGES:
            raise UserError(
                f"{src}: unknown stage '{stage}'{did_you_mean(str(stage), KNOWN_STAGES)};"
                f" stages are {', '.join(KNOWN_STAGES)}."
            )
    budget = data.get("budget") or {}
    _reject_unknown(budget, {"trials", "timeout", "share", "samples"}, f"{src}: budget")
    deterministic = data.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise UserError(f"{src}: deterministic must be true or false, got {deterministic!r}.")
    samples = budget.get("samples")
    trials = budget.get("trials", {})
    share = budget.get("share", {})
    study = StudyConfig(
        name=str(data.get("name") or default_name or Path(src).stem),
        source=src,
        objective=str(data.get("objective", "objectives:train")),
        metric=str(data.get("metric", "accuracy")),
        direction=str(data.get("direction", "maximize")),
        storage=str(os.environ.get(STORAGE_ENV) or data.get("storage", "sqlite:///tuner.db")),
        stages=tuple(stages),
        trials={s: _positive_int(trials.get(s, 10), f"budget.trials.{s}", src) for s in stages},
        timeout=_optional_seconds(budget.get("timeout"), "budget.timeout", src),
        share={s: _positive_float(share.get(s, 1), f"budget.share.{s}", src) for s in stages},
        sampler=dict(data.get("sampler") or {"name": "tpe"}),
        pruner=dict(data.get("pruner") or {"name": "median"}),
        spaces=dict(data.get("search_spaces") or {}),
        defaults=defaults,
        loop=read_loop(data.get("loop"), src),
        deterministic=deterministic,
        samples=None if samples is None else _positive_int(samples, "budget.samples", src),
    )
    check(study)
    _check_spaces(study)
    return study


def _check_spaces(study: StudyConfig) -> None:
    """Every stage's search space, with the study's changes, holds: the whole file is checked
    before anything imports its objective (which runs the objective module's code)."""
    from tuner.plan import load_space  # plan imports this module

    for stage in study.stages:
        load_space(study, stage)


def pruner_reference(study: StudyConfig) -> Any:
    """The study's ``pruner.compare_to`` as written: ``sampled`` (the trials the sampler drew)
    unless it says otherwise; ``check`` holds it to ``PRUNER_REFERENCES``."""
    return study.pruner.get("compare_to", PRUNER_REFERENCES[0])


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
    against = pruner_reference(study)
    if against not in PRUNER_REFERENCES:
        raise UserError(
            f"{src}: pruner.compare_to must be sampled (the trials the sampler drew) or all"
            f" (the enqueued ones too), got {show(against)}."
        )
    for stage in study.spaces:
        if stage not in study.stages:
            raise UserError(f"{src}: search_spaces.{stage} names no stage of this study.")
    check_counts(study.config)
    for section, options in (("sampler", study.sampler), ("pruner", study.pruner)):
        for key, value in options.items():
            if key not in _COUNTS:
                continue  # the sampler or pruner checks the rest when it is made
            least = _COUNTS[key]
            if (value is None and key == "seed") or (value == "auto" and "resource" in key):
                continue  # no seed; Hyperband's "auto" resources
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(
                    f"{section}.{key}={show(value)}: {section}.{key} must be a whole number of"
                    f" at least {least}."
                )

    _check_grids(study)


def check_counts(config: Mapping[str, Any]) -> None:
    """A trial config's ``seed`` and ``epochs``, where it has them, are whole numbers of at
    least 0 and 1: tuner reads them (sampler seeds, the pruner's steps, train's seeds)."""
    for key, least in (("seed", 0), ("epochs", 1)):
        value = config.get(key)
        if key in config and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise UserError(
                f"{key}={show(value)}: {key} must be a whole number of at least {least}."
            )


# Counts and seeds of Optuna's samplers and pruners (TPESampler, MedianPruner, HyperbandPruner
# ...), checked before anything is written: Optuna itself reads some only at the first trial.
_COUNTS = {
    "seed": 0, "n_startup_trials": 0, "n_warmup_steps": 0, "interval_steps": 1,
    "n_min_trials": 1, "n_ei_candidates": 1, "min_resource": 1, "max_resource": 1,
    "reduction_factor": 2, "min_early_stopping_rate": 0, "bootstrap_count": 0,
}  # fmt: skip


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


def apply_overrides(
    study: StudyConfig, pairs: Mapping[str, str], options: Mapping[str, type | tuple[type, ...]]
) -> Overrides:
    """Split ``key=value`` overrides into command options (typed by ``options``) and study
    changes; each value is read as YAML and must have the type of what it replaces."""
    return _apply(study, [(k, yamlio.parse_value(t), t) for k, t in pairs.items()], options)


def apply_values(study: StudyConfig, values: Mapping[str, Any]) -> StudyConfig:
    """``apply_overrides`` for values already typed, as Python passes them: keys are dotted
    (``"model.width"``) or nested (``model={"width": 64}``), checked as strictly."""
    items = [(key, value, show(value)) for key, value in flatten_values(values).items()]
    return _apply(study, items, {}).study


def _apply(
    study: StudyConfig,
    items: Iterable[tuple[str, Any, str]],
    options: Mapping[str, type | tuple[type, ...]],
) -> Overrides:
    flat_defaults = flatten(study.defaults)
    opts: dict[str, Any] = {}
    hand: dict[str, Any] = dict(study.overrides)
    changes: dict[str, Any] = {}
    pruner, sampler = dict(study.pruner), dict(study.sampler)
    for key, value, text in items:
        if key in options:
            opts[key] = coerce(key, value, options[key], text)
        elif key in _STUDY_OVERRIDES:
            changes[key] = coerce(key, value, str, text)
        elif key.startswith("pruner.") or key.startswith("sampler."):
            (pruner if key.startswith("pruner.") else sampler)[key.split(".", 1)[1]] = value
        else:
            extra = [*options, *_STUDY_OVERRIDES, "pruner.name", "sampler.name"]
            hand[key] = coerce_config_key(key, value, text, flat_defaults, extra)
    resolved = replace(study, pruner=pruner, sampler=sampler, overrides=hand, **changes)
    check(resolved)
    return Overrides(options=opts, study=resolved)


def _reject_unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            if not isinstance(key, str) or not _NAME.fullmatch(key):
                # Not a key someone typed (a line of some other file, say): not quoted.
                raise UserError(f"{where}: a key that is not a name; the keys are"
                                f" {', '.join(sorted(allowed))}.")  # fmt: skip
            raise UserError(f"{where}: unknown key '{key}'{did_you_mean(str(key), allowed)}.")


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


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
