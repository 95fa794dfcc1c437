"""Interrupts: SIGTERM ends a run the way Ctrl-C does; a second one ends it at once.

The first interrupt raises KeyboardInterrupt where the run is: the running trial is recorded
as FAILed with the reason ``interrupted``, every finished trial is kept, and the next ``run``
resumes the stage, running each interrupted trial's values again first. Recording may wait
on the database; a second interrupt does not.

A run's worker processes (``workers=N``) are a process group of their own, so that Ctrl-C in
a terminal reaches only the run: the run passes each interrupt on to them, once, as it
comes, whether it came from the terminal or from ``kill`` of the run's PID alone (what
Kubernetes and systemd send).

``installed()`` holds these handlers for the length of a run and then puts back the ones it
found, so that ``tuner.run`` in a notebook leaves the kernel's Ctrl-C as it was, even after
an interrupt (which leaves "end at once" behind it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

EXIT_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C

_forward: list[Callable[[], Iterable[int]]] = []  # the PIDs that an interrupt is passed to
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """``install`` for the length of the block, then the handlers that were there before, on
    every exit (an interrupt included). Outside the main thread, where Python lets no one set
    handlers, it does nothing: the main thread's handlers stand."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    install()
    try:
        yield
    finally:
        for signum, handler in saved.items():
            # None: a handler set outside Python, which cannot be put back; the default is
            # closer to it than ours.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def install() -> None:
    """SIGTERM (Kubernetes, systemd, ``kill``) raises KeyboardInterrupt, like Ctrl-C; both
    are passed on to the processes named with ``forward_to``."""
    _set(signal.SIGINT, _raise_interrupt)
    _set(signal.SIGTERM, _raise_interrupt)


def forward_to(pids: Callable[[], Iterable[int]] | None) -> None:
    """Pass each interrupt from now on to the processes ``pids()`` names (None: to none)."""
    _forward[:] = [] if pids is None else [pids]


def exit_on_next_interrupt() -> None:
    """From now on, SIGINT or SIGTERM ends the process at once."""
    _set(signal.SIGINT, _exit_now)
    _set(signal.SIGTERM, _exit_now)


def _pass_on(signum: int) -> None:
    for pids in _forward:
        for pid in pids():
            with contextlib.suppress(OSError):  # already gone
                os.kill(pid, signum)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    _pass_on(signum)
    raise KeyboardInterrupt


def _exit_now(signum: int, _frame: FrameType | None) -> None:
    _pass_on(signum)
    os._exit(EXIT_STATUS)


def _set(signum: signal.Signals, handler: signal._HANDLER) -> None:
    # Outside the main thread this raises ValueError: the main thread's handler stands.
    with contextlib.suppress(ValueError):
        signal.signal(signum, handler)
