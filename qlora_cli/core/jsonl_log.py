"""Append-only JSON Lines files that survive a kill: the judge's reply cache, each model's answers, and
(for reading) a run's metrics logs.

A line is appended with one write and then fsync'd, so a crash (a kill, a power cut) can only cut the
LAST line short. Reading leaves such a line out, and the next append cuts it off first, so a run
started again after a kill goes on from every complete line.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


class JsonlLog:
    """One append-only JSON Lines file; `read` it first, then `append` whole lines (from several threads if need be)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._kept: int | None = None  # bytes of the file that hold complete lines
        self._size = 0  # bytes in the file, a torn last line included
        self._needs_newline = False

    def read(self) -> bytes:
        """The file's complete lines (b"" when there is no file). A last line without its newline is
        complete when it is a whole JSON object (a file written by hand); otherwise it was cut short by
        a crash, and is left out here and cut off by the next `append`.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1
        self._needs_newline = end < len(data) and _is_object(data[end:])
        self._kept = len(data) if self._needs_newline else end
        self._size = len(data)
        return data[:self._kept]

    def append(self, lines: bytes) -> None:
        """Appends `lines` (whole lines, each ending in a newline) with one write, then fsync.

        Raises:
            ValueError: `lines` does not end in a newline.
        """
        if not lines.endswith(b"\n"):
            raise ValueError("`lines` must end in a newline")
        with self._lock:
            if self._kept is None:
                self.read()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._size > self._kept:  # a line cut short: appending to it would spoil the new line too
                os.truncate(self.path, self._kept)
                self._size = self._kept
            data = (b"\n" if self._needs_newline else b"") + lines
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = 0
                while written < len(data):
                    written += os.write(descriptor, data[written:])
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            self._kept = self._size = self._size + len(data)
            self._needs_newline = False
