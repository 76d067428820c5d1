"""What the user sees: the resolved recipe at start, progress while training, a summary at the end.

Rich tables and a live progress bar on a terminal; plain lines when stdout is not a TTY (CI, logs).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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


class Steps:
    """Progress through the steps of a phase that takes a while: a live bar on a terminal, a plain line per
    step otherwise (logs, CI)."""

    def __init__(self, console: Console, title: str, total: int):
        self.console, self.title, self.total = console, title, total
        self.progress = None
        self.last_line = None

    def __enter__(self) -> "Steps":
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.title, total=self.total)
        return self

    def advance(self, done: int, text: str) -> None:
        """Step `done` of `total` is finished; `text` says what it was (off a terminal, printed when it changes)."""
        line = f"{self.title}: {text}"
        if self.progress is not None:
            self.progress.update(self.task, completed=done, description=line)
        elif line != self.last_line:
            self.console.print(line)
            self.last_line = line

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
