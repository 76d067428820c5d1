"""API keys, for `qlora serve` (the key clients must send) and `qlora eval --judge URL` (the key sent).

A key is only ever read from an environment variable: never from a flag (it would show in `ps` and in
shell history), never written to disk or logs.
"""

from __future__ import annotations

import os

from .errors import UserError


def read_api_key(api_key_env: str | None) -> str | None:
    """The key in the environment variable `api_key_env`; None when no variable is named (no key wanted).

    Raises:
        UserError: the variable is named but not set (or empty).
    """
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise UserError(f"--api-key-env: the environment variable {api_key_env} is not set")
    return key
