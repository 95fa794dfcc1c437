"""Typed ``key=value`` overrides (nanoGPT's rule): a value must have the type of the default it
replaces, and an unknown key is an error that suggests the close match.

The study config (tuner.config) sorts a command's overrides into its options, study keys
and trial-config keys; this module reads and types each value, for the command line and
for Python alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from tuner import yamlio
from tuner.errors import UserError


def parse_pairs(args: Iterable[str]) -> dict[str, str]:
    """``["lr=1e-3", "stage=lr"]`` -> ``{"lr": "1e-3", "stage": "lr"}``, strictly."""
    pairs: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserError(f"Arguments are key=value pairs (like lr=0.001), got '{arg}'.")
        if key in pairs:
            raise UserError(f"{key} is given twice.")
        pairs[key] = value
    return pairs


def show(value: Any) -> str:
    """A value as a user would have typed it after ``key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def coerce_override(
    key: str, text: str, flat_config: Mapping[str, Any], also_known: Iterable[str] = ()
) -> Any:
    """The typed value of ``key=text`` for a config key; unknown keys suggest a close one."""
    return coerce_config_key(key, yamlio.parse_value(text), text, flat_config, also_known)


def coerce_value(
    key: str, value: Any, flat_config: Mapping[str, Any], also_known: Iterable[str] = ()
) -> Any:
    """``coerce_override`` for a value already typed (from Python)."""
    return coerce_config_key(key, value, show(value), flat_config, also_known)


def coerce_config_key(
    key: str, value: Any, text: str, flat_config: Mapping[str, Any], also_known: Iterable[str] = ()
) -> Any:
    """``value`` (typed as ``key=text``) with the type of the config key it replaces; an
    unknown key suggests a close one among the config's keys and ``also_known``."""
    if key not in flat_config:
        known = [*also_known, *flat_config]
        raise UserError(f"Unknown config key: {key}{did_you_mean(key, known)}.")
    return _coerce_like(key, value, flat_config[key], text)


def _coerce_like(key: str, value: Any, default: Any, text: str) -> Any:
    """A value of the default's type: ints widen to floats, nothing else converts."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        return coerce(key, value, bool, text)
    if isinstance(default, float):
        return coerce(key, value, (float, int), text)
    return coerce(key, value, type(default), text)


def coerce(key: str, value: Any, kind: type | tuple[type, ...], text: str) -> Any:
    """``value`` (typed as ``key=text``) as one of the types ``kind``, or a UserError saying
    which type ``key`` takes."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if str in kinds and not isinstance(value, str) and value is not None:
        return text  # a string option may look like a number ("study=123")
    if isinstance(value, bool) and bool not in kinds:
        value = text  # "yes" parsed as True where a string or number is wanted
    if not isinstance(value, kinds):
        want = _TYPE_WORDS.get(kinds[0], kinds[0].__name__)
        raise UserError(f"{key}={text}: {key} must be {want}.")
    return value


_TYPE_WORDS = {
    int: "an integer",
    float: "a number (like 0.001)",
    str: "a string",
    bool: "true or false",
    list: "a list (like [1,2])",
}


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean lr?)`` for the known key closest to ``key`` (or one whose last dotted
    part it is), else nothing."""
    known = list(known)
    leaf = [k for k in known if k.rsplit(".", 1)[-1] == key]
    close = leaf or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
