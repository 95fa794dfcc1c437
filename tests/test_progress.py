"""The stage progress bar: drawn on a terminal, silent elsewhere; time left is the sooner
of the pace so far and the time budget."""

from __future__ import annotations

import io

import pytest

from tuner.progress import StageProgress


class Terminal(io.StringIO):
    """A stream that says it is a terminal (and reports no size, like a bare pty)."""

    def isatty(self) -> bool:
        return True


def test_nothing_is_written_where_the_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()  # a CI log, a pipe, a file
    with StageProgress("lr", total=14, timeout=60, stream=stream) as bar:
        bar.update(3, 0.91)
        lines: list[str] = []
        assert bar.wrap(lines.append) == lines.append  # lines go out untouched
    assert not bar.drawn and stream.getvalue() == ""


def test_a_terminal_gets_trials_best_and_time() -> None:
    stream = Terminal()
    with StageProgress("lr", total=14, timeout=None, stream=stream) as bar:
        assert bar.drawn
        bar.update(3, 0.9123)
        bar.wrap(lambda line: None)("a line")
    shown = stream.getvalue()
    assert "lr" in shown and "3/14" in shown and "best 0.9123" in shown and "spent" in shown


def test_draw_false_keeps_a_terminal_quiet() -> None:
    stream = Terminal()
    with StageProgress("lr", total=3, stream=stream, draw=False) as bar:
        bar.update(1, 0.5)
    assert not bar.drawn and stream.getvalue() == ""


def test_no_best_yet() -> None:
    bar = StageProgress("batch_size", total=5, stream=io.StringIO())
    assert bar.text().startswith("no best yet, 00:00 spent")


@pytest.mark.parametrize(
    ("done", "timeout", "elapsed", "left"),
    [
        (0, None, 10.0, None),  # nothing to go by
        (0, 60.0, 10.0, 50.0),  # the clock only
        (2, None, 10.0, 40.0),  # 5 s a trial, 8 to go
        (2, 30.0, 10.0, 20.0),  # the budget ends first
        (10, 60.0, 10.0, 0.0),  # the budget is spent
        (12, None, 10.0, 0.0),  # more trials than the budget (a resumed stage)
    ],
)
def test_seconds_left(
    done: int, timeout: float | None, elapsed: float, left: float | None
) -> None:
    bar = StageProgress("lr", total=10, timeout=timeout, stream=io.StringIO())
    bar.done = done
    assert bar.seconds_left(elapsed) == left


def test_a_budget_below_one_trial_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 but got 0"):
        StageProgress("lr", total=0)
