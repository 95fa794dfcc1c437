"""A user's table in a CSV file, read by pandas: one target column, the rest features.

Numeric features are standardized and categorical ones one-hot encoded, both fitted on the
training split only; a missing number becomes the training mean, a missing category a
category of its own. A fixed test split is carved with a constant seed; the validation split
is carved from the rest by the trial seed (stratified for classification).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from objectives.data import Data, Split, random_split, stratified_split

TABLE_TEST_SEED = 0  # the test rows are the same in every trial and in `tuner train`
MISSING = "<missing>"  # the category of an empty cell


def check(spec: Mapping[str, Any], task: str) -> None:
    """Raise ``ValueError`` for a missing file or target column, or an impossible split."""
    path = spec.get("path")
    if not path:
        raise ValueError("data.path must name a CSV file (data.name csv).")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ValueError(f"data.path {file.resolve()}: no such CSV file.")
    target = spec.get("target")
    columns = list(pd.read_csv(file, nrows=0).columns)
    if target not in columns:
        raise ValueError(
            f"data.target must be a column of {file.name} ({', '.join(map(str, columns))})"
            f" but got {target!r}."
        )
    if not 0.0 < float(spec.get("test_fraction", 0.2)) < 1.0:
        raise ValueError(
            f"data.test_fraction must be in (0, 1) but got {spec['test_fraction']!r}."
        )


@functools.lru_cache(maxsize=2)
def _read(path: str, modified: float) -> pd.DataFrame:
    return pd.read_csv(path)  # cached per file version: every trial of a process shares it


def load_table(spec: Mapping[str, Any], seed: int, device: torch.device, task: str) -> Data:
    """Train and validation splits of a CSV table (test on request), for ``task``."""
    file = Path(str(spec["path"])).expanduser().resolve()
    frame = _read(str(file), file.stat().st_mtime)
    target = str(spec["target"])
    features = frame.drop(columns=[target])
    classes: list[Any] = []
    if task == "classification":
        _check_classes(frame[target], target)
        classes = sorted(frame[target].dropna().unique().tolist())
        y = frame[target].map({c: i for i, c in enumerate(classes)}).to_numpy()
        if np.isnan(y.astype(float)).any():
            raise ValueError(f"data.target {target}: a row has no class.")
        y = y.astype(np.int64)
    else:
        y = pd.to_numeric(frame[target], errors="raise").to_numpy(dtype=np.float32)
    pool, test_idx = _split(y, float(spec.get("test_fraction", 0.2)), TABLE_TEST_SEED, task)
    inner_train, inner_val = _split(y[pool], float(spec["val_fraction"]), seed, task)
    train_idx, val_idx = pool[inner_train], pool[inner_val]
    encode = _Encoder.fit(features.iloc[train_idx])
    t_mean, t_std = 0.0, 1.0
    if task == "regression":
        t_mean, t_std = float(y[train_idx].mean()), float(y[train_idx].std()) or 1.0

    def split(indices: np.ndarray, to: torch.device, standardize: bool = False) -> Split:
        x = torch.tensor(encode(features.iloc[indices]), dtype=torch.float32)
        target_values = torch.tensor(y[indices])
        if standardize:  # the training targets only; the others stay in their units
            target_values = (target_values - t_mean) / t_std
        return Split(x.to(to), target_values.to(to))

    train = split(train_idx, device, standardize=task == "regression")
    return Data(
        train=train,
        val=split(val_idx, device),
        num_classes=len(classes) if classes else 1,
        mean=encode.mean.tolist(),
        std=encode.std.tolist(),
        task=task,
        input_shape=(train.x.shape[1],),
        target_mean=t_mean,
        target_std=t_std,
        test_split=lambda to: split(test_idx, to),
    )


def _check_classes(column: pd.Series, target: str) -> None:
    """A class needs two rows (one to train on, one to hold out); a target with one row per
    value is most likely continuous: say so, not the splitter's list of every "class"."""
    counts = column.dropna().value_counts()
    single = int((counts < 2).sum())
    if not single:
        return
    values = column.dropna()
    continuous = pd.api.types.is_float_dtype(values) and not (values % 1 == 0).all()
    what = "continuous numbers" if continuous else "values"
    raise ValueError(
        f"data.target {target}: task is classification, but the column holds {what}:"
        f" {len(counts)} distinct values in {len(values)} rows, {single} of them in one row"
        " only (a class needs at least 2); for a continuous target use study=csv_regression"
        " or task=regression."
    )


def _split(y: np.ndarray, fraction: float, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    if task == "classification":
        return stratified_split(y, fraction, seed)
    return random_split(len(y), fraction, seed)


@dataclass(frozen=True)
class _Encoder:
    """Standardizes numeric columns and one-hot encodes the others, as fitted on training rows."""

    numeric: list[str]
    mean: np.ndarray
    std: np.ndarray
    categories: dict[str, list[str]]

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> _Encoder:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        values = frame[numeric].to_numpy(dtype=np.float64)
        mean = np.nan_to_num(np.nanmean(values, axis=0)) if len(numeric) else np.zeros(0)
        std = np.nan_to_num(np.nanstd(values, axis=0)) if len(numeric) else np.zeros(0)
        categories = {
            str(c): sorted(_text(frame[c]).unique().tolist())
            for c in frame.columns
            if c not in numeric
        }
        return cls(numeric, mean, np.where(std > 0, std, 1.0), categories)

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        values = frame[self.numeric].to_numpy(dtype=np.float64)
        values = np.where(np.isnan(values), self.mean, values)  # a missing number: the mean
        parts = [(values - self.mean) / self.std]
        for column, known in self.categories.items():
            # A category the training rows never showed encodes as all zeros.
            parts.append(
                (_text(frame[column]).to_numpy()[:, None] == np.array(known)).astype(float)
            )
        return np.concatenate(parts, axis=1)


def _text(column: pd.Series) -> pd.Series:
    return column.astype(object).where(column.notna(), MISSING).astype(str)
