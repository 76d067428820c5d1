"""Progress of the long stages of an evaluation (answering, judging): a rich bar with an ETA on a
terminal; off a terminal (CI, logs, `nohup`), a plain line now and then and one at the end."""

from __future__ import annotations

import threading
import time

from rich.console import Console

from ..console import format_seconds

PLAIN_EVERY = 30.0  # seconds between plain progress lines


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the pace so far, or None before anything is done."""
    if done <= 0:
        return None
    return elapsed / done * max(0, total - done)


def plain_line(description: str, done: int, total: int, elapsed: float) -> str:
    """`Answers of run: 16/80 (20%), 0:45 elapsed, about 3:00 left`."""
    left = eta(done, total, elapsed)
    percent = f" ({done / total:.0%})" if total else ""
    rest = f", about {format_seconds(left)} left" if left is not None and done < total else ""
    return f"{description}: {done}/{total}{percent}, {format_seconds(elapsed)} elapsed{rest}"


class StageProgress:
    """Counts the items of one stage; `advance` may be called from several threads (judge workers).

    Use as a context manager: the bar (or the last plain line) is closed on the way out, also when
    the stage is interrupted.
    """

    def __init__(self, console: Console, description: str, total: int, *, plain_every: float = PLAIN_EVERY):
        self.console, self.description, self.total = console, description, total
        self.done, self.plain_every = 0, plain_every
        self._lock = threading.Lock()
        self._started = self._last_line = time.monotonic()
        self._bar = None
        self._task = None

    def __enter__(self) -> StageProgress:
        self._started = self._last_line = time.monotonic()
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, count: int = 1) -> None:
        with self._lock:
            self.done += count
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
                return
            now = time.monotonic()
            if now - self._last_line >= self.plain_every or self.done >= self.total:
                self._last_line = now
                self.console.print(plain_line(self.description, self.done, self.total, now - self._started),
                                   markup=False, highlight=False)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def stage_progress(console: Console):
    """A factory `(description, total) -> StageProgress` bound to `console`, as the stages take it."""
    return lambda description, total: StageProgress(console, description, total)
