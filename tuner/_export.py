"""``tuner export``: the best config of a study as YAML, complete and with its provenance.

The file holds every key the objective reads (the defaults included), so ``tuner train``
needs nothing else, and a provenance block: the study, the storage, which stage and trial
each tuned value came from, the tuner version and the date.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from tuner import __version__, files, yamlio
from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.errors import UserError
from tuner.nested import flatten, get_path
from tuner.plan import Source, load_space
from tuner.results import SET, best_trial


def best_config(study: StudyConfig, stage: str | None = None) -> dict[str, Any]:
    """The export document of the last stage with a finished trial (or of ``stage``)."""
    if stage is not None and stage not in study.stages:
        raise UserError(
            f"Unknown stage '{stage}'; this study's stages: {', '.join(study.stages)}."
        )
    storage = storages.open_existing(study.storage, read_only=True)
    candidates = [stage] if stage else list(reversed(study.stages))
    for name in candidates:
        found = storages.load(storage, study.stage_name(name))
        trial = best_trial(found) if found is not None else None
        if found is not None and trial is not None:
            return _document(
                study, name, found.user_attrs, trial.number, trial.value, trial.user_attrs
            )
    which = f"stage {stage}" if stage else f"study {study.name}"
    raise UserError(
        f"Nothing to export: {which} has no finished trial in {storages.mask(study.storage)};"
        " run `python -m tuner run` first."
    )


def _document(
    study: StudyConfig,
    stage: str,
    stage_attrs: dict[str, Any],
    number: int,
    value: float | None,
    trial_attrs: dict[str, Any],
) -> dict[str, Any]:
    config = trial_attrs["config"]
    lineage = {k: Source.from_dict(v) for k, v in stage_attrs.get("lineage", {}).items()}
    own = Source(stage, number, value)
    values = {key: lineage.get(key, Source()) for key in lineage}
    for key in [*load_space(study, stage).keys, *(trial_attrs.get(SET) or {})]:
        values[key] = own  # a follow-up's epochs too: that trial set them
    stages: dict[str, Any] = {}
    for source in [*values.values(), own]:
        if source.stage is not None:
            stages[source.stage] = {
                "study": study.stage_name(source.stage),
                "trial": source.trial,
                "value": source.value,
            }
    ordered = {s: stages[s] for s in study.stages if s in stages}
    metrics = {k: trial_attrs[k] for k in _METRICS if k in trial_attrs}
    document = {
        "objective": study.objective,
        "metric": study.metric,
        "direction": study.direction,
        "config": config,
        "validation": metrics,
        "provenance": {
            "study": study.name,
            "study_file": study.source,
            "storage": storages.mask(study.storage),
            "stage": stage,
            "trial": number,
            "value": value,
            "stages": ordered,
            "values": {key: values[key].label for key in flatten(config) if key in values},
            "tuner_version": __version__,
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    }
    start = (stage_attrs.get("study_config") or {}).get("start") or {}
    if start:  # a warm start: where the values every stage started from came from
        document["provenance"]["start"] = {key: pair[1] for key, pair in start.items()}
    return document


_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "loss",
            "rmse", "mae", "r2", "best_epoch", "stop_reason")  # fmt: skip


def render(document: dict[str, Any]) -> str:
    """The YAML text, with a header that says what it is and how to train it."""
    prov = document["provenance"]
    metric = document["metric"]
    best_epoch = document.get("validation", {}).get(metric)
    # The trial's value is its smoothed peak (loop.smooth); the best epoch is what train measures.
    scored = f"validation {metric} {prov['value']:.4f}"
    if isinstance(best_epoch, (int, float)) and best_epoch != prov["value"]:
        scored = (
            f"validation {metric} {best_epoch:.4f} at its best epoch"
            f" ({prov['value']:.4f}, its value: the best mean over consecutive epochs)"
        )
    header = (
        f"# Best config of study {prov['study']}: stage {prov['stage']}, trial #{prov['trial']},"
        f" {scored}.\n"
        f"# Exported by tuner {prov['tuner_version']} at {prov['exported_at']}. Train it with\n"
        "#   python -m tuner train config=<this file>\n"
    )
    return header + yamlio.dumps(document)


def check_out(out: str) -> Path:
    """The export's path, checked before any work: one line where it cannot be written."""
    return files.check_file(out, example="best.yaml")


def write(document: dict[str, Any], out: str) -> Path:
    """Write the export atomically (a half-written config is worse than none)."""
    return files.write(check_out(out), render(document))


def read(path: str) -> dict[str, Any]:
    """Read an exported config back, checking it has what ``train`` needs."""
    document = yamlio.load(path)
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise UserError(f"{path}: not an exported config (it has no 'config' mapping).")
    if not isinstance(document.get("objective"), str):
        raise UserError(f"{path}: not an exported config (it has no 'objective').")
    get_path(document, "config")
    return document
