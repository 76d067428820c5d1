"""How much memory a CPU run really takes: its anonymous memory, sampled while it runs.

A process's resident set (RSS, and its peak, which `getrusage` keeps) also counts the pages of files it has
mapped: safetensors maps a model's files while it loads them, so a 7B run's peak RSS held the whole 13.8 GB
checkpoint beside the 5.4 GB it allocated. Those pages are the page cache's, which the kernel drops when memory
runs short. What the run needs is its anonymous memory (`RssAnon` in /proc/self/status: the heap, tensors,
the optimizer), for which Linux keeps no peak; so a daemon thread reads it every SAMPLE_SECONDS and keeps the
highest. A spike shorter than that can be missed.
"""

from __future__ import annotations

import threading
from pathlib import Path

SAMPLE_SECONDS = 0.05  # reading /proc/self/status takes ~20 µs
STATUS = Path("/proc/self/status")


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (`RssAnon`, `VmRSS`, ...) in bytes; None where there is none
    (not Linux)."""
    try:
        text = STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            value, unit = line.split()[1:3]
            return int(value) * 1024 if unit == "kB" else int(value)
    return None


def anonymous_bytes() -> int | None:
    """This process's anonymous resident memory now, in bytes; None where the system does not say."""
    return status_bytes("RssAnon")


class AnonymousPeak:
    """The highest anonymous resident memory of this process between `start` and `stop`, sampled by a daemon
    thread every `interval` seconds (and at start and stop)."""

    def __init__(self, interval: float = SAMPLE_SECONDS):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return anonymous_bytes() is not None

    def sample(self) -> None:
        now = anonymous_bytes()
        self.samples += 1
        if now is not None and now > self.peak:
            self.peak = now

    def start(self) -> "AnonymousPeak":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="anonymous-memory-peak", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        """Stop sampling; returns the peak in bytes."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak
