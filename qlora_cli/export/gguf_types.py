"""The GGUF types `qlora merge --gguf` writes, with the bytes a parameter takes in each file.

Imports nothing heavy, so the command line checks `--gguf` before anything loads.
"""

from __future__ import annotations

from ..core.errors import UserError

# As export/gguf.py writes them: 16-bit matrices, or 8-bit blocks of 32 weights with a 16-bit scale each; 1-D
# tensors stay float32 and are negligible.
GGUF_BYTES_PER_PARAMETER = {"f16": 2.0, "q8_0": 34 / 32}
GGUF_TYPES = tuple(GGUF_BYTES_PER_PARAMETER)


def check_gguf_types(out_types) -> None:
    """Raises UserError naming the first of `out_types` that is not a GGUF type written here."""
    for out_type in out_types:
        if out_type not in GGUF_TYPES:
            raise UserError(f"--gguf: {out_type!r} is not one of {', '.join(GGUF_TYPES)}")
