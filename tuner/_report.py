"""``tuner report``: the results of a study in one self-contained HTML file, or as a CSV table.

The HTML holds what each stage bought (the staircase of best values), each stage's
optimization history, parameter importances and learning curves, the exported config and
the diagnostics. plotly.js is inlined once, so the file opens offline, from anywhere.
``format=csv`` writes every trial of every stage as one table instead (tuner._report_csv).
"""

from __future__ import annotations

import datetime as dt
import html
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import __version__, files, notes
from tuner import _export as export
from tuner import _report_csv as report_csv
from tuner import storage as storages
from tuner._status import StageStatus, collect
from tuner.config import StudyConfig
from tuner.errors import UserError

FORMATS = ("html", "csv")
CURVES = 5  # learning curves drawn per stage: its best trials


@dataclass
class Stage:
    """One stage as the report needs it: its status and its Optuna study (None: not run)."""

    status: StageStatus
    study: optuna.Study | None


def make(study: StudyConfig, out: str | None = None, format: str | None = None) -> Path:
    """Write the report of a study; return its path.

    Example:
        >>> make(load_study("digits_mlp"), "report.html")
        PosixPath('report.html')

    Args:
        study: The study config (its storage is read, nothing is written to it).
        out: The file to write (``report.html`` or ``report.csv`` by default).
        format: ``html`` or ``csv``; by default ``csv`` where ``out`` ends in ``.csv``.
    """
    if format is None:
        format = "csv" if out is not None and out.lower().endswith(".csv") else "html"
    if format not in FORMATS:
        raise UserError(f"format={format}: the formats are {' and '.join(FORMATS)}.")
    path = files.check_file(out if out is not None else f"report.{format}",
                            example=f"report.{format}")  # fmt: skip
    stages = load(study)
    _write(path, report_csv.text(study, stages) if format == "csv" else page(study, stages))
    return path


def load(study: StudyConfig) -> list[Stage]:
    """Every stage of a study; a UserError where the storage holds none of them."""
    if not storages.exists(study.storage):
        raise UserError(
            f"No storage at {storages.mask(study.storage)}: run `python -m tuner run` first"
            " (or pass storage=...)."
        )
    storage = storages.open_existing(study.storage, read_only=True)
    stages = [
        Stage(row, storages.load(storage, study.stage_name(row.stage)))
        for row in collect(study)
    ]  # fmt: skip
    if all(s.study is None for s in stages):
        raise UserError(
            f"Nothing to report: study {study.name} has no stage in"
            f" {storages.mask(study.storage)}; run `python -m tuner run` first."
        )
    return stages


# --- the HTML page ----------------------------------------------------------------------------


def page(study: StudyConfig, stages: Sequence[Stage]) -> str:
    """The whole report as one HTML document, plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    parts = [_staircase(study, stages)]
    parts += [_stage(study, i, s) for i, s in enumerate(stages)]
    parts += [_exported(study), _diagnostics(stages)]
    title = f"tuner report: {study.name}"
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    head = (
        f"<p>Storage {_e(storages.mask(study.storage))}; every stage scored by validation"
        f" {_e(study.metric)} ({_e(study.direction)}). Written by tuner {__version__} at"
        f" {when}. See it live: <code>python -m tuner dashboard</code>.</p>"
    )
    links = " · ".join(
        f'<a href="#{_e(anchor)}">{_e(name)}</a>'
        for anchor, name in [
            ("staircase", "staircase"),
            *((f"stage-{s.status.stage}", s.status.stage) for s in stages),
            ("config", "config"),
            ("diagnostics", "diagnostics"),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head>\n<body>\n<h1>{_e(title)}</h1>\n{head}\n"
        f"<nav>{links}</nav>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


@dataclass(frozen=True)
class Step:
    """One step of the staircase: the best value after a stage, and what it gained."""

    stage: str  # "defaults" for the first stage's first trial: the study's defaults
    value: float
    gain: float | None  # over the step before (None for the first step)
    trial: int | None


def staircase(stages: Sequence[Stage]) -> list[Step]:
    """The best value after each stage with a complete trial, from the defaults on."""
    steps: list[Step] = []
    first = next((s.study for s in stages if s.study is not None), None)
    trials = first.get_trials(deepcopy=False) if first is not None else []
    if trials and trials[0].state == TrialState.COMPLETE and trials[0].value is not None:
        steps.append(Step("defaults", float(trials[0].value), None, trials[0].number))
    for stage in stages:
        row = stage.status
        if row.best_value is not None:
            gain = row.best_value - steps[-1].value if steps else None
            steps.append(Step(row.stage, row.best_value, gain, row.best_number))
    return steps


def _staircase(study: StudyConfig, stages: Sequence[Stage]) -> str:
    """Best value after each stage, and what it gained over the stage before."""
    import plotly.graph_objects as go

    steps = staircase(stages)
    by_stage = {step.stage: step for step in steps}
    rows = []
    for stage in stages:
        row, step = stage.status, by_stage.get(stage.status.stage)
        if step is None:
            rows.append((row.stage, "-", "-", "no complete trial" if row.exists else "not run"))
            continue
        counts = f"{row.complete} complete, {row.pruned} pruned, {row.failed} failed"
        rows.append((row.stage, f"{step.value:.4f} (#{step.trial})", _gain(step), counts))
    intro = (
        "<p>The best validation value after each stage, and what the stage gained over the"
        " one before (each stage starts from the best config so far, so the line never goes"
        " back). <i>defaults</i> is the first stage's first trial: the study's defaults.</p>"
    )
    body = _html_table(("stage", "best", "gain", "trials"), rows)
    if steps:
        labels = [f"{s.value:.4f} ({_gain(s)})" if s.gain is not None else f"{s.value:.4f}"
                  for s in steps]  # fmt: skip
        fig = go.Figure(
            go.Scatter(
                x=[s.stage for s in steps],
                y=[s.value for s in steps],
                text=labels,
                mode="lines+markers+text",
                textposition="top center",
                line_shape="hv",  # a staircase: each stage holds its value until the next
            )
        )
        fig.update_layout(yaxis_title=_e(f"best validation {study.metric}"), xaxis_title="stage")
        body += _figure(fig, "staircase-plot")
    return _section("staircase", "What each stage bought", intro + body)


def _gain(step: Step) -> str:
    return f"{step.gain:+.4f}" if step.gain is not None else "-"


def _stage(study: StudyConfig, index: int, stage: Stage) -> str:
    row, found = stage.status, stage.study
    title = f"Stage {index + 1}: {row.stage}"
    if found is None:
        return _section(f"stage-{row.stage}", title, "<p>Not run yet.</p>")
    fixed = [
        (key, _fmt(value), row.lineage[key].label if key in row.lineage else "?")
        for key, value in row.fixed.items()
    ]  # fmt: skip
    best = [(key, _fmt(value)) for key, value in row.best_params.items()]
    body = f"<p>{_e(found.study_name)}: {row.complete} complete, {row.pruned} pruned,"
    body += f" {row.failed} failed of a budget of {row.budget}.</p>"
    body += "<h3>Fixed</h3>"
    body += _html_table(("key", "value", "from"), fixed) if fixed else _NOTHING_FIXED
    if row.best_value is not None:
        body += f"<h3>Best: trial #{row.best_number}, {_e(study.metric)} {row.best_value:.4f}</h3>"
        body += _html_table(("parameter", "value"), best)
    body += "<h3>Optimization history</h3>" + _history(found, study.metric, row.stage)
    body += "<h3>Parameter importances</h3>" + _importances(found, row.stage)
    body += f"<h3>Learning curves of the best {CURVES} trials</h3>"
    body += _curves(found, study.metric, row.stage)
    return _section(f"stage-{row.stage}", title, body)


_NOTHING_FIXED = "<p>Nothing: the stage starts from the defaults.</p>"


def _complete(found: optuna.Study) -> list[FrozenTrial]:
    return [t for t in found.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]  # fmt: skip


def _history(found: optuna.Study, metric: str, stage: str) -> str:
    from optuna.visualization import plot_optimization_history

    if not _complete(found):
        return "<p>No complete trial yet.</p>"
    fig = plot_optimization_history(found, target_name=_e(metric))  # plotly reads tags in it
    return _figure(fig, f"history-{stage}")


def _importances(found: optuna.Study, stage: str) -> str:
    """fANOVA-style importances; a sentence where they cannot be told apart."""
    from optuna.visualization import plot_param_importances

    complete = _complete(found)
    varied = {
        name for name in {n for t in complete for n in t.params}
        if len({repr(t.params.get(name)) for t in complete}) > 1
    }  # fmt: skip
    if len(complete) < 2 or not varied:
        return (
            f"<p>Importances need at least 2 complete trials whose parameters differ; this"
            f" stage has {len(complete)} complete trial(s)"
            f"{'' if varied or len(complete) < 2 else ', all with the same parameters'}.</p>"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = plot_param_importances(found)
    except Exception as exc:  # the report must not die of one plot: say why, go on
        return f"<p>Importances could not be computed: {_e(type(exc).__name__)}: {_e(exc)}.</p>"
    return _figure(fig, f"importances-{stage}")


def _curves(found: optuna.Study, metric: str, stage: str) -> str:
    """Validation metric per epoch of the stage's best trials."""
    import plotly.graph_objects as go

    reverse = found.direction == optuna.study.StudyDirection.MAXIMIZE
    top = sorted(_complete(found), key=lambda t: t.value or 0.0, reverse=reverse)[:CURVES]
    top = [t for t in top if t.intermediate_values]
    if not top:
        return "<p>No complete trial reported per-epoch values.</p>"
    fig = go.Figure()
    for t in top:
        steps = sorted(t.intermediate_values)
        fig.add_trace(go.Scatter(
            x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines+markers",
            name=f"#{t.number} ({t.value:.4f})",
        ))  # fmt: skip
    last = max(max(t.intermediate_values) for t in top)
    fig.update_xaxes(dtick=max(1, math.ceil(last / 12)))  # whole epochs
    fig.update_layout(xaxis_title="epoch", yaxis_title=_e(f"validation {metric}"))
    return _figure(fig, f"curves-{stage}")


def _exported(study: StudyConfig) -> str:
    try:
        text = export.render(export.best_config(study))
    except UserError as exc:
        body = f"<p>{_e(exc)}</p>"
    else:
        body = (
            "<p>What <code>python -m tuner export</code> writes: the complete config, with where"
            " each tuned value came from.</p>"
            f"<pre>{_e(storages.mask(text))}</pre>"
        )
    return _section("config", "Exported config", body)


def _diagnostics(stages: Sequence[Stage]) -> str:
    rows = [
        (stage.status.stage, line)
        for stage in stages if stage.study is not None
        for line in notes.diagnostics_of(stage.study)
    ]  # fmt: skip
    body = _html_table(("stage", "finding"), rows) if rows else "<p>No diagnostics recorded.</p>"
    return _section("diagnostics", "Diagnostics", body)


# --- HTML pieces -------------------------------------------------------------------------------


def _figure(fig: Any, div_id: str) -> str:
    fig.update_layout(template="plotly_white", height=380, margin={"t": 40, "b": 40})
    text: str = fig.to_html(
        full_html=False,
        include_plotlyjs=False,  # inlined once in <head>
        div_id=_id(div_id),  # plotly writes it into the page as it is
        config={"displaylogo": False, "responsive": True},
    )
    return text


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _html_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _e(value: Any) -> str:
    """Text or an attribute value for the page (and for plotly's titles, which read tags)."""
    return html.escape(str(value))


def _id(text: str) -> str:
    """An element id from a stage name: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write(path: Path, text: str) -> None:
    """Atomically: a half-written report is worse than none."""
    files.write(path, text)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
nav { margin: 1em 0; } table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f5f5f5; } pre { background: #f7f7f7; padding: 1em; overflow: auto; }
code { background: #f2f2f2; padding: 0 0.2em; }
"""
