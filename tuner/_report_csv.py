"""``tuner report format=csv``: every trial of every stage as one table, a row per trial,
its text cells safe to open in a spreadsheet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from tuner.config import StudyConfig
from tuner.text import spreadsheet_cell

if TYPE_CHECKING:
    from tuner._report import Stage

# User attrs that go into the CSV table (the config is there as the params; tracebacks and
# confusion matrices are too long for a cell). ``device`` is where the trial trained (where
# the run assigned devices: tuner.devices), ``sampler_seed`` the seed its process drew with.
CSV_ATTRS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "loss",
             "rmse", "mae", "r2", "best_epoch", "stop_reason", "samples_per_s",
             "peak_memory_mb", "trial_seconds", "device", "sampler_seed", "error")  # fmt: skip


def text(study: StudyConfig, stages: Sequence[Stage]) -> str:
    """The table as CSV text."""
    # CRLF rows (RFC 4180): a cell with a CR in it is quoted, not split into two rows.
    csv: str = spreadsheet_safe(table(study, stages)).to_csv(index=False, lineterminator="\r\n")
    return csv


def table(study: StudyConfig, stages: Sequence[Stage]) -> pd.DataFrame:
    """One row per trial of every stage: stage, number, state, value, params, key attrs."""
    rows: list[dict[str, Any]] = []
    params: dict[str, None] = {}  # the param columns, in the order they first appear
    for stage in stages:
        if stage.study is None:
            continue
        for t in stage.study.get_trials(deepcopy=False):
            row: dict[str, Any] = {
                "stage": stage.status.stage,
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "seconds": t.duration.total_seconds() if t.duration else None,
            }
            for name, value in t.params.items():
                params.setdefault(f"params_{name}", None)
                row[f"params_{name}"] = value
            row.update({k: t.user_attrs[k] for k in CSV_ATTRS if k in t.user_attrs})
            rows.append(row)
    head = ["stage", "number", "state", "value", "seconds", *params]
    frame = pd.DataFrame(rows)
    columns = [*head, *(c for c in CSV_ATTRS if c in frame.columns)]
    return frame.reindex(columns=columns).convert_dtypes()


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with every text cell that would start a formula neutralised (see
    ``spreadsheet_cell``); numbers are left alone."""
    frame = frame.copy()
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].astype(object).map(spreadsheet_cell)
    return frame
