"""Real file-system states for tests: folders even root cannot write, and folder hashes."""

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[Path]:
    """``path`` (a file or a folder) cannot be written while the block runs.

    The tests run as root here, and root ignores file modes: as root the file is made
    immutable (``chattr +i``: not even root may change it, nor add files to such a folder);
    as anyone else its write bits are cleared. Skipped where neither is possible (a file
    system without the immutable flag, or no CAP_LINUX_IMMUTABLE).
    """
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make {path} immutable here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file() else oct(p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
    }  # fmt: skip
