"""User-facing errors: what is wrong and where, rendered once by the CLI with exit code 2.

Every problem a user can fix (a recipe key, a data row, a flag, a file) is raised as a `UserError`
carrying one or more `Problem`s, so that all of them are reported together instead of one per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    Attributes:
        message: what is wrong and, where possible, how to fix it.
        file: the file the problem is in (a recipe, a data file), if any.
        line: 1-based line number in `file`, if known.
        key: dotted key path (`training.learning_rate`) or a flag (`--set`), if any.
    """

    message: str
    file: Path | str | None = None
    line: int | None = None
    key: str | None = None

    def location(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}:{self.line}" if self.line else str(self.file))
        if self.key:
            parts.append(self.key)
        return ": ".join(parts)

    def render(self) -> str:
        where = self.location()
        return f"{where}: {self.message}" if where else self.message


class UserError(Exception):
    """Bad input from the user. The CLI prints the problems and exits with code 2, without a traceback."""

    def __init__(self, problems: list[Problem | str] | Problem | str, *, title: str | None = None):
        if isinstance(problems, (str, Problem)):
            problems = [problems]
        self.problems: list[Problem] = [Problem(p) if isinstance(p, str) else p for p in problems]
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.title] if self.title else []
        lines += [p.render() for p in self.problems]
        return "\n".join(lines)


EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130


class RunFailure(Exception):
    """A run that started and could not go on (non-finite loss, out of memory, disk full).

    The CLI prints the message, which names what to do and the last good checkpoint, and exits 1.
    """


class RunInterrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after writing a checkpoint; the message says how to resume.

    The CLI prints it and exits 130.
    """
