"""The anonymous-memory peak a CPU run reports: what the process allocates, not the files it maps."""

from __future__ import annotations

import mmap
import time

import pytest

from qlora_cli.core.memory_usage import AnonymousPeak, anonymous_bytes, status_bytes

MiB = 2**20
SIZE = 96 * MiB

pytestmark = pytest.mark.skipif(anonymous_bytes() is None, reason="no RssAnon in /proc/self/status (not Linux)")


def test_a_mapped_file_counts_in_rss_but_not_in_the_anonymous_peak_which_allocations_raise(tmp_path):
    weights = tmp_path / "weights.bin"
    with weights.open("wb") as handle:
        for _ in range(SIZE // MiB):
            handle.write(b"\x01" * MiB)
    sampler = AnonymousPeak(interval=0.005).start()
    before_anonymous, before_rss = anonymous_bytes(), status_bytes("VmRSS")
    with weights.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        touched = sum(mapped[offset] for offset in range(0, SIZE, mmap.PAGESIZE))  # every page resident
        wait_for_samples(sampler, 3)
        mapped_rss = status_bytes("VmRSS")
        del touched
    # The mapping was resident (a process peak RSS would count it), yet the anonymous peak did not move.
    assert mapped_rss - before_rss > SIZE * 0.9
    assert sampler.peak - before_anonymous < 16 * MiB

    block = b"\x01" * SIZE  # written, so every page is resident
    wait_for_samples(sampler, 3)
    del block
    peak = sampler.stop()
    assert peak - before_anonymous > SIZE * 0.9
    assert anonymous_bytes() < peak  # freed again: the figure is the peak, not the memory now


def wait_for_samples(sampler: AnonymousPeak, count: int) -> None:
    """Until the sampler has read the memory `count` more times (a busy machine may not run its thread for a
    while)."""
    target = sampler.samples + count
    deadline = time.monotonic() + 30
    while sampler.samples < target and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sampler.samples >= target, "the sampler thread did not run"


def test_stop_returns_the_peak_even_before_the_first_interval():
    sampler = AnonymousPeak(interval=60).start()
    assert sampler.stop() >= anonymous_bytes() * 0.5 > 0
