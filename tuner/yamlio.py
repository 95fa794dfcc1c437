"""YAML in and out: safe loading only, with YAML 1.2 floats (``1e-3`` is a float)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tuner.errors import UserError

# PyYAML implements YAML 1.1, where a float needs a dot: ``1e-3`` would be the string
# "1e-3". Resolve floats the YAML 1.2 way (and the way a Python user reads them).
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 float resolution."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that keeps keys in insertion order and indents lists."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def loads(text: str, source: str = "<text>") -> Any:
    """Parse YAML text; a syntax error names the source and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        # PyYAML quotes the text it stopped at ("found undefined alias 'x'"): in a file that
        # is not YAML at all that may be a secret. A quoted character (a tab) stays.
        problem = _QUOTED.sub("(text left out)", problem)
        raise UserError(f"{source}{where}: malformed YAML: {problem}.") from None


_QUOTED = re.compile(r"'[^'\n]{5,}'|\"[^\"\n]{5,}\"")


def load(path: str | Path) -> Any:
    """Read a YAML file; a missing or unreadable file is a UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file.") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc.__class__.__name__}).") from None
    return loads(text, str(path))


def parse_value(text: str) -> Any:
    """Parse the value of a ``key=value`` override as YAML 1.2 (``1e-3`` -> 0.001)."""
    if text.strip() == "":
        return ""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError:
        return text  # not YAML (e.g. "a: b: c"): keep the plain string


def dumps(data: Any) -> str:
    """Dump plain data as block-style YAML, keys in insertion order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
