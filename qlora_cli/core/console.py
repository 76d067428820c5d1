"""What the user sees: the resolved recipe at start, progress while training, a summary at the end.

Rich tables and a live progress bar on a terminal; plain lines when stdout is not a TTY (CI, logs).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from .recipe import Recipe, flatten


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, soft_wrap=not stream.isatty(), stderr=stderr)


def _show(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "null" if value is None else str(value)


def recipe_table(recipe: Recipe, title: str = "Recipe") -> Table:
    """Every key of the resolved recipe; the ones the recipe changed from their defaults in bold."""
    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    changed = _changed_keys(recipe)
    for key, value, _help in flatten(recipe):
        style = "bold" if key in changed else "dim"
        table.add_row(key, _show(value), style=style)
    return table


def _changed_keys(recipe: Recipe) -> set[str]:
    """Dotted keys set explicitly in the recipe (or by --set)."""
    changed: set[str] = set()

    def walk(model, prefix: str) -> None:
        for name in model.model_fields_set:
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if hasattr(value, "model_fields_set"):
                walk(value, key + ".")
            elif isinstance(value, list) and value and hasattr(value[0], "model_fields_set"):
                for index, item in enumerate(value):
                    walk(item, f"{key}.{index}.")
            else:
                changed.add(key)

    walk(recipe, "")
    return changed


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, _show(value))
    return table


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


LONG_PHASE_SECONDS = 2.0


@contextmanager
def working(console: Console, what: str) -> Iterator[None]:
    """A phase that may take a while (loading, converting, tokenizing, evaluating): a spinner on a terminal, a
    line off it, and its duration when it took long, so that no minute passes in silence."""
    started = time.perf_counter()
    if console.is_terminal:
        with console.status(f"{what}..."):
            yield
    else:
        console.print(f"{what}...")
        yield
    seconds = time.perf_counter() - started
    if seconds >= LONG_PHASE_SECONDS:
        console.print(f"{what}: done in {format_seconds(seconds)}")


PLAIN_EVERY = 30.0  # seconds between the plain lines of steps that have no text of their own


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the pace so far, or None before anything is done."""
    if done <= 0:
        return None
    return elapsed / done * max(0, total - done)


def plain_line(description: str, done: int, total: int, elapsed: float, unit: str | None = None) -> str:
    """`Answers of run: 16/80 (20%), 0:45 elapsed, about 3:00 left`; with a unit, the rate too
    (`..., 0:45 elapsed, 3,200 rows/s, about 3:00 left`)."""
    left = eta(done, total, elapsed)
    percent = f" ({done / total:.0%})" if total else ""
    rate = f", {done / elapsed:,.0f} {unit}/s" if unit and elapsed > 0 else ""
    rest = f", about {format_seconds(left)} left" if left is not None and done < total else ""
    counts = f"{done:,}/{total:,}" if unit else f"{done}/{total}"
    return f"{description}: {counts}{percent}, {format_seconds(elapsed)} elapsed{rate}{rest}"


class RateColumn(ProgressColumn):
    """Units done per second (rich's speed: over the last half minute of updates)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s")


class Steps:
    """Progress through the steps of a phase that takes a while: a live bar with the time elapsed and left
    on a terminal; off one (logs, CI, `nohup`), plain lines: one whenever a step's `text` changes, and for
    steps without a text a `plain_line` every `plain_every` seconds and one at the end.

    Use as a context manager: the bar is closed on the way out, also when the phase is interrupted.
    `advance` may be called from several threads (judge workers).
    """

    def __init__(self, console: Console, title: str, total: int, *, plain_every: float = PLAIN_EVERY,
                 transient: bool = False, unit: str | None = None):
        """`unit` (rows, ...) adds the rate, in units per second, to the bar and the plain lines."""
        self.console, self.title, self.total, self.unit = console, title, total, unit
        self.plain_every, self.transient = plain_every, transient
        self.done = 0
        self._lock = threading.Lock()
        self._started = self._last_printed = time.monotonic()
        self._last_line: str | None = None
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> "Steps":
        self._started = self._last_printed = time.monotonic()
        if self.console.is_terminal:
            rate = [RateColumn(self.unit)] if self.unit else []
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), *rate, TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=self.transient)
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total)
        return self

    def advance(self, count: int = 1, text: str | None = None) -> None:
        """`count` more steps are finished; `text` says what the last one was."""
        with self._lock:
            self.done += count
            line = None if text is None else f"{self.title}: {text}"
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, description=line or self.title)
                return
            now = time.monotonic()
            if line is None and (now - self._last_printed >= self.plain_every or self.done >= self.total):
                line = plain_line(self.title, self.done, self.total, now - self._started, self.unit)
            if line is not None and line != self._last_line:
                self.console.print(line, markup=False, highlight=False)
                self._last_line, self._last_printed = line, now

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
