"""Interrupts: SIGTERM ends a run the way Ctrl-C does; a second one ends it at once.

The first interrupt raises KeyboardInterrupt where the run is: the running trial is recorded
as FAILed with the reason ``interrupted``, every finished trial is kept, and the next ``run``
resumes the stage. Recording may wait on the database; a second interrupt does not.
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType

EXIT_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C


def install() -> None:
    """SIGTERM (Kubernetes, systemd, ``kill``) raises KeyboardInterrupt, like Ctrl-C."""
    _set(signal.SIGTERM, _raise_interrupt)


def exit_on_next_interrupt() -> None:
    """From now on, SIGINT or SIGTERM ends the process at once."""
    _set(signal.SIGINT, _exit_now)
    _set(signal.SIGTERM, _exit_now)


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _exit_now(_signum: int, _frame: FrameType | None) -> None:
    os._exit(EXIT_STATUS)


def _set(signum: signal.Signals, handler: signal._HANDLER) -> None:
    # Outside the main thread this raises ValueError: the main thread's handler stands.
    with contextlib.suppress(ValueError):
        signal.signal(signum, handler)
