"""A user's string (a study name, a key, a value from a file) made safe for where it goes: a
terminal, with its control characters escaped, so it cannot move the cursor, clear the screen,
retitle the window or hide the line before it; a spreadsheet, where it must not be a formula."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# Cc: C0/C1 controls (ESC, BEL, CR, ...); Cf: format characters (bidi overrides, zero-width);
# Zl/Zp: the line and paragraph separators.
_UNSAFE = {"Cc", "Cf", "Zl", "Zp"}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every control or format character escaped (``\\x1b``, ``\\u202e``,
    ``\\n``); ``keep_newlines`` leaves line breaks for text of several lines.

    Example:
        >>> printable("a\\x1b[2Jb\\n")
        'a\\\\x1b[2Jb\\\\n'
    """
    text = str(text)
    if text.isprintable():
        return text  # the common case, at C speed
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif unicodedata.category(ch) in _UNSAFE:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


# A cell a spreadsheet would run as a formula (=, +, -, @, and tab or CR before them);
# a number written as text ("-1.5") is only a number, and stays as it is.
_FORMULA = re.compile(r"[=+\-@\t\r]")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def spreadsheet_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula is
    prefixed with ``'``, as spreadsheet-safe CSV writers do (OWASP's CSV injection advice).

    Example:
        >>> spreadsheet_cell("=1+1"), spreadsheet_cell("-1.5"), spreadsheet_cell(-2)
        ("'=1+1", '-1.5', -2)
    """
    if isinstance(value, str) and _FORMULA.match(value) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value
