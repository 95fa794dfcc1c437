"""Nested dicts addressed by dotted keys: a trial config is nested (``model.width``), and
overrides, search spaces and lineage name its keys dotted."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


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


def flatten_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword overrides, nested or dotted, as dotted keys (``model={"width": 8}``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat
