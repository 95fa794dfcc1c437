"""Warm start: a run that begins from an exported config (``start=best.yaml``) or from another
study's best in the same storage (``start=STUDY``).

The start's tuned values (those its provenance names a stage trial or a hand setting for;
every value of a file without provenance) replace the study's defaults: they are the
incumbent, the first trial, of every stage, and the stages search around them as around
any incumbent. The study's own untuned defaults (its data, epochs, seed) stand, and a value
set by hand wins over the start. Each start value's lineage says where it came from: the
file or study, and the stage study and trial that found it. A key of the start that the
study does not have is a UserError, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuner import storage as storages
from tuner import yamlio
from tuner.config import StudyConfig, flatten
from tuner.errors import UserError
from tuner.plan import Source, load_space
from tuner.race import SAMPLES_KEY
from tuner.results import best_trial

OBJECTIVE_KEYS = ("metric", "direction")  # the study's own, set into every config
_LABEL = re.compile(r"^(?P<stage>[A-Za-z_]\w*)#(?P<trial>\d+)$")  # plan.Source.label of a trial


def apply(study: StudyConfig, start: str | None) -> StudyConfig:
    """The study with ``start``'s values as its incumbent (None: the start an earlier run of
    it recorded, if any: a warm start holds for every later run of the study)."""
    if start is None:
        return kept(study)
    config, origins = load(study, start)
    skip = _stage_keys(study)
    flat = {k: v for k, v in flatten(config).items() if k not in skip}
    known = flatten(study.defaults)
    for key in flat:
        if key not in known:
            raise UserError(
                f"start={start}: key {key} is not in study {study.name} ({study.source}); a"
                " warm start sets only keys the study has: start from one of its own kind, or"
                " add the key to its defaults."
            )
    values = {k: v for k, v in flat.items() if k in origins}
    return replace(study, start=values, start_origin={k: origins[k] for k in values})


def kept(study: StudyConfig) -> StudyConfig:
    """The study with the warm start its stages recorded when they ran (the first stage
    found with one), so a later ``run stage=...`` starts from it too."""
    storage = storages.open_existing(study.storage)
    if storage is None:
        return study
    names = {s.study_name for s in storage.get_all_studies()}
    for stage in study.stages:
        if study.stage_name(stage) not in names:
            continue
        found = storages.load(storage, study.stage_name(stage))
        stored = ((found.user_attrs if found else {}).get("study_config") or {}).get("start")
        if stored:
            values = {key: pair[0] for key, pair in stored.items()}
            origins = {key: str(pair[1]) for key, pair in stored.items()}
            return replace(study, start=values, start_origin=origins)
    return study


def load(study: StudyConfig, start: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A start's config, and the origin of each of its tuned values (flat key -> origin)."""
    if start.endswith((".yaml", ".yml")) or "/" in start or Path(start).is_file():
        return from_file(start)
    return from_study(study, start)


def from_file(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """An exported config (``python -m tuner export``), or any YAML file with a ``config``."""
    if not Path(path).is_file():
        raise UserError(f"start={path}: no such file (an exported config, or a study name).")
    document = yamlio.load(path)
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise UserError(
            f"start={path}: not an exported config (it has no 'config' mapping); write one"
            " with `python -m tuner export out=FILE`."
        )
    config: dict[str, Any] = document["config"]
    prov = document.get("provenance")
    labels = prov.get("values") if isinstance(prov, dict) else None
    if not isinstance(labels, dict):  # written by hand: all of it is the start
        return config, {key: path for key in flatten(config)}
    assert isinstance(prov, dict)
    stages = prov["stages"] if isinstance(prov.get("stages"), dict) else {}
    name = prov.get("study", "?")
    origins = {}
    for key, label in labels.items():
        match = _LABEL.match(str(label))
        found = stages.get(match["stage"]) if match else None
        if match and isinstance(found, dict):
            where = f"{found.get('study')}#{match['trial']}"
        elif label == Source().label:
            where = f"set by hand in study {name}"
        else:
            where = str(label)  # itself a warm start's value: its origin, as that file says
        origins[str(key)] = f"{path} ({where})"
    return config, origins


def from_study(study: StudyConfig, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The best trial of another study's last stage with one, in this study's storage."""
    if name == study.name:
        raise UserError(
            f"start={name} is this study itself; start from another study, or an exported"
            " config (start=best.yaml)."
        )
    storage = storages.open_existing(study.storage)
    names = [] if storage is None else [s.study_name for s in storage.get_all_studies()]
    stages = [n for n in names if n.startswith(f"{name}/")]
    if not stages:
        known = sorted({n.split("/", 1)[0] for n in names if "/" in n})
        raise UserError(
            f"start={name}: no study {name} in {storages.mask(study.storage)}"
            f" (studies there: {', '.join(known) or 'none'}); or give an exported config"
            " (start=best.yaml)."
        )
    picked = None
    for stage_name in stages:
        found = storages.load(storage, stage_name)
        trial = best_trial(found) if found is not None else None
        if found is None or trial is None:
            continue
        index = found.user_attrs.get("stage_index", -1)
        if picked is None or index > picked[0]:
            picked = (index, stage_name, found.user_attrs, trial)
    if picked is None:
        raise UserError(
            f"start={name}: study {name} has no finished trial in"
            f" {storages.mask(study.storage)} to start from."
        )
    _, stage_name, attrs, trial = picked
    origins = {}
    for key, data in attrs.get("lineage", {}).items():
        source = Source.from_dict(data)
        if source.origin is not None:
            where = source.label
        elif source.stage is not None:
            where = f"{name}/{source.stage}#{source.trial}"
        else:
            where = f"set by hand in study {name}"
        origins[key] = f"study {name} ({where})"
    for key in attrs.get("searches", []):
        origins[key] = f"study {name} ({stage_name}#{trial.number})"
    return dict(trial.user_attrs["config"]), origins


def _stage_keys(study: StudyConfig) -> set[str]:
    """Keys no start sets: the study's metric and direction, what a stage sets itself (the
    batch-size stage's time budget), and a time race's sample count."""
    keys = {*OBJECTIVE_KEYS, SAMPLES_KEY}
    for stage in study.stages:
        keys |= set(flatten(dict(load_space(study, stage).settings)))
    return keys


def describe(study: StudyConfig) -> str | None:
    """One line on a warm start, for the run's output (None: there is none)."""
    if not study.start:
        return None
    where = sorted({origin.split(" (", 1)[0] for origin in study.start_origin.values()})
    keys = ", ".join(sorted(study.start))
    return f"warm start from {', '.join(where)}: {len(study.start)} value(s) ({keys})"
