"""A Markdown note per stage study, shown by optuna-dashboard: what the stage searched, what
it fixed and where each fixed value came from, its best config so far, and its diagnostics.

Everything in the note is read back from the stage study itself (its user attrs, its
trials' distributions), so a note can be written again at any time, by any process.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from tuner import storage as storages
from tuner.results import best_trial

DIAGNOSTICS = "Diagnostics"
_NO_DIAGNOSTICS = "_No diagnostics for this stage._"


def write_stage_note(study: optuna.Study, diagnostics: Sequence[str] | None = None) -> str:
    """Write (or rewrite) the dashboard note of a stage study; return its Markdown.

    It also names the study's objective after the metric, for the dashboard's axes.

    Example:
        >>> study = optuna.load_study(study_name="mnist1d_cnn/lr", storage="sqlite:///tuner.db")
        >>> body = write_stage_note(study, ["2 of 14 trials diverged"])

    Args:
        study: The stage's Optuna study (named ``<study>/<stage>``).
        diagnostics: One line per finding; None reads the study's ``diagnostics`` user attr.
    """
    import optuna_dashboard  # 1.6 s of imports (sklearn): paid where a note is read or written

    body = stage_note(study, diagnostics)
    optuna_dashboard.save_note(study, body)
    metric = study.user_attrs.get("metric")
    if metric and study.metric_names != [metric]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and stable since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([str(metric)])  # the dashboard's axes say "accuracy"
    return body


def stage_note(study: optuna.Study, diagnostics: Sequence[str] | None = None) -> str:
    """The note's Markdown (passwords in URLs masked)."""
    attrs = study.user_attrs
    if diagnostics is None:
        diagnostics = [str(d) for d in attrs.get("diagnostics", [])]
    trials = study.get_trials(deepcopy=False)
    metric = str(attrs.get("metric", "value"))
    lines = [*_head(study, attrs, trials, metric), ""]
    lines += ["## Searched", "", *_searched(attrs.get("searches", []), trials), ""]
    lines += ["## Fixed", "", *_fixed(attrs.get("fixed", {}), attrs.get("lineage", {}), metric)]
    lines += ["", "## Best so far", "", *_best(study, metric), ""]
    lines += [f"## {DIAGNOSTICS}", ""]
    lines += [f"- {line}" for line in diagnostics] if diagnostics else [_NO_DIAGNOSTICS]
    return storages.mask("\n".join(lines) + "\n")


def diagnostics_of(study: optuna.Study) -> list[str]:
    """A stage's diagnostics: its ``diagnostics`` user attr, else the list in its note."""
    stored = study.user_attrs.get("diagnostics")
    if stored:
        return [str(line) for line in stored]
    import optuna_dashboard

    note = optuna_dashboard.get_note(study)
    match = re.search(rf"^## {DIAGNOSTICS}\n(.*?)(?=^## |\Z)", note, re.M | re.S)
    if match is None:
        return []
    return [line[2:].strip() for line in match.group(1).splitlines() if line.startswith("- ")]


def _head(
    study: optuna.Study, attrs: Mapping[str, Any], trials: Sequence[Any], metric: str
) -> list[str]:
    stage = attrs.get("stage", study.study_name)
    index = attrs.get("stage_index")
    stages = (attrs.get("study_config") or {}).get("stages") or []
    where = f" ({index + 1} of {len(stages)})" if index is not None and stages else ""
    counts = {state: sum(1 for t in trials if t.state == state) for state in TrialState}
    finished = ", ".join(f"{n} {state.name.lower()}" for state, n in counts.items() if n)
    direction = study.direction.name.lower()
    return [
        f"# Stage {stage}{where}: {study.study_name}",
        "",
        f"Scored by validation {metric} ({direction}). {len(trials)} trials"
        + (f": {finished}." if finished else "."),
    ]


def _searched(searches: Sequence[str], trials: Sequence[Any]) -> list[str]:
    ranges: dict[str, BaseDistribution] = {}
    for trial in trials:
        ranges.update(trial.distributions)
    if not searches and not ranges:
        return ["Nothing: every value of this stage is fixed."]
    rows = [(f"`{name}`", describe(dist)) for name, dist in sorted(ranges.items())]
    seen = {name.split("[", 1)[0] for name in ranges}
    rows += [(f"`{key}`", "no trial drew it yet") for key in searches if key not in seen]
    return _table(("parameter", "range"), rows)


def _fixed(fixed: Mapping[str, Any], lineage: Mapping[str, Any], metric: str) -> list[str]:
    if not fixed:
        return ["Nothing: this stage starts from the study's defaults."]
    rows = []
    for key, value in fixed.items():
        source = lineage.get(key) or {}
        rows.append((f"`{key}`", f"`{_fmt(value)}`", _source(source, metric)))
    return _table(("key", "value", "from"), rows)


def _source(source: Mapping[str, Any], metric: str) -> str:
    if not source:
        return "?"
    if source.get("stage") is None:
        return "set by hand"
    value = source.get("value")
    score = f" ({metric} {value:.4f})" if isinstance(value, (int, float)) else ""
    return f"stage {source['stage']}, trial #{source.get('trial')}{score}"


def _best(study: optuna.Study, metric: str) -> list[str]:
    top = best_trial(study)
    if top is None:
        return ["No complete trial yet."]
    assert top.value is not None
    lines = [f"Trial #{top.number}: validation {metric} **{top.value:.4f}**.", ""]
    rows = [(f"`{name}`", f"`{_fmt(value)}`") for name, value in top.params.items()]
    lines += _table(("parameter", "value"), rows) if rows else ["It searched no parameter."]
    extras = {k: top.user_attrs[k] for k in _EXTRAS if k in top.user_attrs}
    if extras:
        lines += ["", "; ".join(f"{k}: {_fmt(v)}" for k, v in extras.items())]
    return lines


_EXTRAS = ("f1_macro", "loss", "best_epoch", "stop_reason", "samples_per_s", "trial_seconds")


def describe(dist: BaseDistribution) -> str:
    """A distribution in words: ``0.0003 … 0.03, log`` or ``adam, sgd``."""
    if isinstance(dist, CategoricalDistribution):
        return ", ".join(str(c) for c in dist.choices)
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        text = f"{_fmt(dist.low)} … {_fmt(dist.high)}"
        if dist.log:
            text += ", log"
        if dist.step is not None and dist.step != 1:
            text += f", step {_fmt(dist.step)}"
        return text
    return str(dist)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows),
    ]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
