"""The files the commands write (export, report, train): each is written whole or not at all.

``check_file`` and ``check_folder`` look at an ``out=`` path before any work is done, so a
path that cannot be written is one line and exit status 2, not a traceback after the work.
``write`` writes to a temporary file in the target's folder, flushes it to the disk, and
renames it into place; on any failure (a full disk, Ctrl-C) the temporary file is removed
and an existing file of that name stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tuner.errors import UserError

Fill = Callable[[BinaryIO], None]


def check_file(out: str, key: str = "out", example: str = "best.yaml") -> Path:
    """The path of an output file ``key=out``, once it is sure a file can be written there."""
    if not out.strip():
        raise UserError(f"{key}={out}: {key} needs a file name, e.g. {key}={example}.")
    _check_characters(out, key)
    path = Path(out)
    if path.is_dir():
        raise UserError(f"{key}={out} is a folder; give a file name, e.g. {key}={path / example}.")
    if path.exists() and not path.is_file():
        raise UserError(f"{key}={out} is not a regular file; give a file name, e.g. {example}.")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{key}={out}: {folder} is a file, not a folder.")
    if not folder.is_dir():
        raise UserError(f"{key}={out}: folder {folder} does not exist; create it first.")
    _probe(folder, key, out)
    return path


def check_folder(out: str, key: str = "out", example: str = "trained") -> Path:
    """The path of an output folder ``key=out`` (it may not exist yet, then it can be made)."""
    if not out.strip():
        raise UserError(f"{key}={out}: {key} needs a folder name, e.g. {key}={example}.")
    _check_characters(out, key)
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={out} is a file; give a folder name, e.g. {key}={example}.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={out}: {existing} is a file, so the folder cannot be made.")
    _probe(existing, key, out)
    return path


def _check_characters(out: str, key: str) -> None:
    if "\x00" in out:
        raise UserError(f"{key}={out!r}: a path cannot hold a NUL character.")


def _probe(folder: Path, key: str, out: str) -> None:
    """Whether a file can be made in ``folder``: only trying tells (read-only mounts,
    immutable folders and /proc refuse even root), and the try leaves nothing behind."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tuner-probe.", suffix=".tmp")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"{key}={out}: cannot write in folder {folder} ({reason}); choose a folder you"
            " can write."
        ) from None
    os.close(fd)
    os.unlink(tmp)


def write(path: Path, fill: Fill | str | bytes) -> Path:
    """Write ``path`` atomically: ``fill`` (text, bytes, or a function given the open
    binary file) goes to a temporary file beside it, which is synced and renamed into place.

    Any failure, KeyboardInterrupt included, removes the temporary file; an OSError (a full
    disk, say) is a UserError naming the file.
    """
    data = fill.encode("utf-8") if isinstance(fill, str) else fill
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; an output is not
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"Cannot write {path}: {reason}; nothing was written.") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _sync_folder(path.parent)
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sync_folder(folder: Path) -> None:
    """The rename itself survives a crash once the folder is synced (where it can be)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
