"""Where qlora keeps what it computes once: converted models and tokenized datasets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QLORA_CACHE, else ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")).expanduser()
