"""Look up a configured name in a table of choices, or say clearly what is allowed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def choose(key: str, value: object, table: Mapping[str, T]) -> T:
    """Return ``table[value]``; an unknown value is a ``ValueError`` naming key and choices.

    Example:
        >>> choose("optimizer", "sgd", {"sgd": 1, "adam": 2})
        1
    """
    if isinstance(value, str) and value in table:
        return table[value]
    allowed = ", ".join(table)
    raise ValueError(f"{key} must be one of {allowed} but got {value!r}.")
