"""Text for a terminal: a user's string (a study name, a key, a value from a file) printed with
its control characters escaped, so it cannot move the cursor, clear the screen, retitle the
window or hide the line before it."""

from __future__ import annotations

import unicodedata

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
