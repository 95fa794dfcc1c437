"""``tuner train``: train an exported config, score the test split once, save the results.

This is the only place the test split is read: tuning chose the config on validation data.
With ``repeats=N`` it trains N seeds (seed, seed+1, ...) and reports the mean ± std of the
validation and test metrics, so a real win can be told from seed noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuner import _export as export
from tuner import files, yamlio
from tuner.coerce import coerce_override, coerce_value
from tuner.config import check_counts, load_study
from tuner.errors import UserError
from tuner.nested import flatten, flatten_values, merged
from tuner.objective import accepts_test, load_objective, load_validator

Print = Callable[[str], None]


# ``train``'s own options, which a mistyped config key may have meant (``outt=``).
OPTIONS = ("config", "out", "repeats", "threads")


def prepare(
    config: str | Path | Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The exported document to train (read from ``config``, a file, or given as a mapping)
    with ``overrides`` set, checked before anything trains or is written: each value has the
    type of the config's (and of its study's defaults), the objective imports, its module's
    ``validate`` accepts the config, and ``seed`` and ``epochs`` are counts."""
    if isinstance(config, (str, Path)):
        document = export.read(_config_file(str(config)))
    else:
        document = dict(config)
    if "config" not in document or "objective" not in document:
        raise UserError(
            "train needs an exported config (python -m tuner export, or tuner.best_config)."
        )
    flat = flatten(document["config"])
    _check_types(document, flat)
    changes = {
        k: coerce_value(k, v, flat, also_known=OPTIONS)
        for k, v in flatten_values(overrides).items()
    }
    document = {**document, "config": merged(document["config"], changes)}
    load_objective(str(document["objective"]))  # one line where it cannot be imported
    validate = load_validator(str(document["objective"]))
    if validate is not None:
        try:
            validate(document["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(str(exc)) from None
    check_counts(document["config"])  # what an objective without a validator may not check
    return document


def train(
    document: Mapping[str, Any],
    out: str,
    pairs: Mapping[str, str],
    print_: Print = print,
    *,
    repeats: int = 1,
) -> dict[str, Any]:
    """Train ``document["config"]`` (with ``key=value`` changes), test it, save to ``out``.

    With ``repeats`` > 1 the config trains again with seeds ``seed+1 ... seed+repeats-1`` (the
    seed sets the validation split, the initialization and the batch order; the test split
    stays), and ``metrics.yaml`` gains ``repeats``: each metric's mean, std (n-1) and values.
    The model saved is the first seed's, the exported config's own.
    """
    if repeats < 1:
        raise UserError(f"repeats={repeats}: repeats must be at least 1.")
    folder = files.check_folder(out)  # before the training, not after it
    fn = load_objective(str(document["objective"]))
    if not accepts_test(fn):
        raise UserError(
            f"objective {document['objective']} cannot score a test split: give it a"
            " `test: bool = False` keyword argument."
        )
    flat = flatten(document["config"])
    changes = {key: coerce_override(key, text, flat) for key, text in pairs.items()}
    config = merged(document["config"], changes)
    metric = str(document.get("metric", "accuracy"))

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        cells = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if _is_number(v))
        print_(f"epoch {epoch:3d}  {cells}")

    seeds = _seeds(config, repeats)
    results: list[dict[str, Any]] = []
    for seed in seeds:
        if repeats > 1:
            print_(f"--- seed {seed} ({len(results) + 1} of {repeats})")
        results.append(fn(merged(config, {"seed": seed}) if repeats > 1 else config, report,
                          test=True))  # fmt: skip
    result = results[0]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"out={out}: cannot make folder {folder} ({exc.strerror}).") from None
    saved = _save_model(result.get("model"), folder / "model.pt")
    tuned = (document.get("provenance") or {}).get("value")
    summary = {
        "metric": metric,
        "validation": _numbers(result),
        "test": _numbers(result.get("test") or {}),
        "tuned_validation": tuned,
        "config": config,
        "provenance": document.get("provenance"),
    }
    spread = _spread(results, seeds) if repeats > 1 else None
    if spread is not None:
        summary["repeats"] = spread
    files.write(folder / "metrics.yaml", yamlio.dumps(summary))
    value, test_value = result.get(metric), (result.get("test") or {}).get(metric)
    print_(
        f"validation {metric} {_fmt(value)} (tuned: {_fmt(tuned)});"
        f" test {metric} {_fmt(test_value)}"
    )
    if spread is not None:
        print_(_spread_line(spread, metric))
    print_(f"saved {folder / 'metrics.yaml'}" + (f" and {saved}" if saved else ""))
    return summary


def _config_file(config: str) -> str:
    """``config=`` names a file that can be read: not empty, not a folder, not a FIFO (a
    read would wait for a writer forever), no NUL character."""
    example = "e.g. config=best.yaml (python -m tuner export writes it)"
    if not config.strip():
        raise UserError(f"config={config}: train needs an exported config's file, {example}.")
    if "\x00" in config:
        raise UserError(f"config={config!r}: a path cannot hold a NUL character.")
    path = Path(config)
    if path.is_dir():
        raise UserError(f"config={config} is a folder; give an exported config's file, {example}.")
    if path.exists() and not path.is_file():
        raise UserError(f"config={config} is not a regular file; give an exported config's file.")
    return config


def _check_types(document: Mapping[str, Any], flat: Mapping[str, Any]) -> None:
    """An exported config's values have the types of its study's defaults (a hand-edited
    ``lr: abc`` is one line naming the key), where the study file is still there."""
    source = (document.get("provenance") or {}).get("study_file")
    if not isinstance(source, str) or not Path(source).is_file():
        return
    defaults = flatten(load_study(source).defaults)
    for key, value in flat.items():
        if key in defaults:
            coerce_value(key, value, defaults)


def _seeds(config: Mapping[str, Any], repeats: int) -> list[int]:
    if repeats == 1:
        return [int(config.get("seed", 0) or 0)]
    if not isinstance(config.get("seed"), int):
        raise UserError("repeats needs an integer `seed` key in the config, to vary per run.")
    return [int(config["seed"]) + i for i in range(repeats)]


def _spread(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per split, each numeric metric's mean, std (n-1) and per-seed values."""
    spread: dict[str, Any] = {"seeds": seeds}
    for split in ("validation", "test"):
        rows = [_numbers(r if split == "validation" else r.get("test") or {}) for r in results]
        keys = [k for k, v in rows[0].items() if _is_number(v)]
        spread[split] = {
            k: {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values),
                "values": values,
            }
            for k in keys
            if len(values := [float(row[k]) for row in rows if _is_number(row.get(k))]) > 1
        }
    return spread


def _spread_line(spread: Mapping[str, Any], metric: str) -> str:
    seeds = spread["seeds"]
    cells = []
    for split in ("validation", "test"):
        stats = spread[split].get(metric)
        if stats is not None:
            cells.append(f"{split} {metric} {stats['mean']:.4f} ± {stats['std']:.4f}")
    return (
        f"{', '.join(cells) or 'no ' + metric} (mean ± std over {len(seeds)} seeds,"
        f" {seeds[0]}..{seeds[-1]}): a difference within about 2 std is seed noise"
    )


def _save_model(model: Any, path: Path) -> Path | None:
    if model is None or not hasattr(model, "state_dict"):
        return None
    import torch  # only here: an objective need not be a torch model

    state = model.state_dict()
    return files.write(path, lambda handle: torch.save(state, handle))


def _numbers(result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in result.items()
        if _is_number(v) or (k == "confusion_matrix" and isinstance(v, list)) or k == "stop_reason"
    }  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.4f}"
    return "-"
