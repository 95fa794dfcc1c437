"""A live progress bar per stage: trials done of the budget, best value so far, time spent
and time left. It draws only where its stream is a terminal, so CI logs stay line by line.

Example:
    >>> with StageProgress("lr", total=14, timeout=300) as bar:
    ...     out = bar.wrap(print)  # lines printed while the bar is drawn keep it intact
    ...     bar.update(done=3, best=0.9123)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

Print = Callable[[str], None]
REFRESH_S = 1.0  # the clock ticks between trials too: a trial may take minutes


class StageProgress:
    """The progress bar of one stage.

    Args:
        stage: The stage's name, shown left of the bar.
        total: The stage's trial budget.
        timeout: The stage's time budget in seconds (None: no limit).
        stream: Where to draw (stderr by default); nothing is drawn unless it is a terminal.
        draw: False keeps it silent anyway (say, where worker processes print beside it).
    """

    def __init__(
        self,
        stage: str,
        total: int,
        timeout: float | None = None,
        stream: TextIO | None = None,
        *,
        draw: bool = True,
    ) -> None:
        if total < 1:
            raise ValueError(f"A stage's trial budget must be at least 1 but got {total}.")
        self.stage, self.total, self.timeout = stage, total, timeout
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.done: float = 0
        self.best: float | None = None
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        if draw and _is_terminal(self.stream):
            self._bar = tqdm(
                total=total,
                desc=stage,
                file=self.stream,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}",
                postfix=self.text(),
                # Follow the terminal's size; one that reports none (a bare pty) gets 80x24.
                dynamic_ncols=_width(self.stream) > 0,
                ncols=None if _width(self.stream) > 0 else 80,
                nrows=None if _width(self.stream) > 0 else 24,
                leave=True,
            )
            threading.Thread(target=self._tick, name=f"progress-{stage}", daemon=True).start()

    @property
    def drawn(self) -> bool:
        """Whether a bar is drawn (the stream is a terminal)."""
        return self._bar is not None

    def update(self, done: float, best: float | None) -> None:
        """Trials finished so far and the best value so far."""
        self.done, self.best = done, best
        self._refresh()

    def wrap(self, out: Print) -> Print:
        """``out`` that lifts the bar off the terminal for each line it prints."""
        if self._bar is None:
            return out

        def write(line: str) -> None:
            with tqdm.external_write_mode(file=sys.stdout):
                out(line)

        return write

    def text(self) -> str:
        """What follows the bar: best so far, time spent, time left."""
        elapsed = time.monotonic() - self.started
        best = f"best {self.best:.4f}" if self.best is not None else "no best yet"
        left = self.seconds_left(elapsed)
        eta = f", ~{tqdm.format_interval(left)} left" if left is not None else ""
        return f"{best}, {tqdm.format_interval(elapsed)} spent{eta}"

    def seconds_left(self, elapsed: float) -> float | None:
        """The sooner of: the remaining trials at the pace so far, and the time budget."""
        by_pace = None
        if self.done > 0:
            by_pace = elapsed / self.done * max(0, self.total - self.done)
        by_clock = None if self.timeout is None else max(0.0, self.timeout - elapsed)
        known = [s for s in (by_pace, by_clock) if s is not None]
        return min(known) if known else None

    def close(self) -> None:
        """Stop the clock and leave the bar's last state on screen."""
        self._stop.set()
        if self._bar is not None:
            self._refresh()
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _refresh(self) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.n = min(round(self.done, 1), self.total)  # a pruned trial may count a share
        bar.set_postfix_str(self.text(), refresh=False)
        bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._refresh()


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
