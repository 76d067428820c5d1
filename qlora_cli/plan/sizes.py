"""Memory sizes: read as people write them (24GiB, 80GB, 512MiB) and written for people (1.5 GiB)."""

from __future__ import annotations

import re

from ..core.errors import UserError

GiB = 2**30

_SIZE = re.compile(r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[kmgtp])(?P<binary>i?)(?P<b>b?)|b?)\s*", re.I)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_bytes(text: str) -> int:
    """A memory size as bytes: `80GB` is 80 * 10**9; `24GiB` and `24G` are 24 * 2**30; a bare number is bytes.

    Units K, M, G, T, P, case-insensitive; `B` optional. Raises UserError for anything else or for zero.
    """
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise UserError(
            f"cannot read {text!r} as a memory size; write e.g. 24GiB, 80GB or 512MiB "
            "(GB = 10^9 bytes; GiB and G = 2^30 bytes)"
        )
    unit = match["unit"]
    if unit:
        # Only `GB` (no `i`) is decimal; a bare `G`, as in "24G", is read as binary like GiB.
        decimal = bool(match["b"]) and not match["binary"]
        scale = (1000 if decimal else 1024) ** _POWERS[unit.lower()]
    else:
        scale = 1
    value = round(float(match["number"]) * scale)
    if value <= 0:
        raise UserError(f"a memory size must be more than zero bytes, got {text!r}")
    return value


def format_bytes(count: int) -> str:
    """`count` bytes for people: GiB with one decimal, or MiB below 1 GiB."""
    if abs(count) >= GiB:
        return f"{count / GiB:.1f} GiB"
    return f"{count / 2**20:.0f} MiB"
