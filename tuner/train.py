"""``tuner train``: train an exported config, score the test split once, save the results.

This is the only place the test split is read: tuning chose the config on validation data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuner import yamlio
from tuner.config import coerce_override, flatten, merged
from tuner.errors import UserError
from tuner.objective import accepts_test, load_objective

Print = Callable[[str], None]


def train(
    document: Mapping[str, Any], out: str, pairs: Mapping[str, str], print_: Print = print
) -> dict[str, Any]:
    """Train ``document["config"]`` (with ``key=value`` changes), test it, save to ``out``."""
    fn = load_objective(str(document["objective"]))
    if not accepts_test(fn):
        raise UserError(
            f"objective {document['objective']} cannot score a test split: give it a"
            " `test: bool = False` keyword argument."
        )
    flat = flatten(document["config"])
    changes = {key: coerce_override(key, text, flat) for key, text in pairs.items()}
    config = merged(document["config"], changes)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"out={out} is a file; train writes a folder (model.pt, metrics.yaml).")
    metric = str(document.get("metric", "accuracy"))

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        cells = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if _is_number(v))
        print_(f"epoch {epoch:3d}  {cells}")

    result = fn(config, report, test=True)
    folder.mkdir(parents=True, exist_ok=True)
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
    (folder / "metrics.yaml").write_text(yamlio.dumps(summary), encoding="utf-8")
    value, test_value = result.get(metric), (result.get("test") or {}).get(metric)
    print_(
        f"validation {metric} {_fmt(value)} (tuned: {_fmt(tuned)});"
        f" test {metric} {_fmt(test_value)}"
    )
    print_(f"saved {folder / 'metrics.yaml'}" + (f" and {saved}" if saved else ""))
    return summary


def _save_model(model: Any, path: Path) -> Path | None:
    if model is None or not hasattr(model, "state_dict"):
        return None
    import torch  # only here: an objective need not be a torch model

    torch.save(model.state_dict(), path)
    return path


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
