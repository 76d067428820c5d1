"""The anonymous-memory peak a CPU run reports: what the process allocates, not the files it maps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlora_cli.core.memory_usage import AnonymousPeak, anonymous_bytes

MiB = 2**20
SIZE = 96 * MiB

pytestmark = pytest.mark.skipif(anonymous_bytes() is None, reason="no RssAnon in /proc/self/status (not Linux)")


SCENARIO = """
import json, mmap, sys, time
from qlora_cli.core.memory_usage import AnonymousPeak, anonymous_bytes, status_bytes

SIZE, path = int(sys.argv[1]), sys.argv[2]


def wait_for_samples(sampler, count):
    # Until the sampler has read the memory `count` more times (a busy machine may not run its thread for a while).
    target, deadline = sampler.samples + count, time.monotonic() + 30
    while sampler.samples < target and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sampler.samples >= target, "the sampler thread did not run"


sampler = AnonymousPeak(interval=0.005).start()
figures = {"before_anonymous": anonymous_bytes(), "before_rss": status_bytes("VmRSS")}
with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
    touched = sum(mapped[offset] for offset in range(0, SIZE, mmap.PAGESIZE))  # every page resident
    wait_for_samples(sampler, 3)
    figures["mapped_rss"] = status_bytes("VmRSS")
    figures["peak_while_mapped"] = sampler.peak
block = b"\\x01" * SIZE  # written, so every page is resident
wait_for_samples(sampler, 3)
del block
figures["peak"] = sampler.stop()
figures["after"] = anonymous_bytes()
print(json.dumps(figures))
"""


def test_a_mapped_file_counts_in_rss_but_not_in_the_anonymous_peak_which_allocations_raise(tmp_path):
    """Run in a fresh interpreter: in the test process, memory that other tests' objects free meanwhile would
    offset what this one allocates."""
    weights = tmp_path / "weights.bin"
    with weights.open("wb") as handle:
        for _ in range(SIZE // MiB):
            handle.write(b"\x01" * MiB)
    result = subprocess.run([sys.executable, "-c", SCENARIO, str(SIZE), str(weights)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    # The mapping was resident (a process peak RSS would count it), yet the anonymous peak did not move.
    assert figures["mapped_rss"] - figures["before_rss"] > SIZE * 0.9
    assert figures["peak_while_mapped"] - figures["before_anonymous"] < 16 * MiB
    # The allocation did, and the figure is the peak, not the memory once it was freed.
    assert figures["peak"] - figures["before_anonymous"] > SIZE * 0.9
    assert figures["after"] < figures["peak"]


def test_stop_returns_the_peak_even_before_the_first_interval():
    sampler = AnonymousPeak(interval=60).start()
    assert sampler.stop() >= anonymous_bytes() * 0.5 > 0
