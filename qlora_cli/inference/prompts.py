"""Reading prompt files for `qlora generate`."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import Problem, UserError


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (a `prompt` field per row).

    Raises:
        UserError: the file is missing, or a JSONL row has no string `prompt`; names the line.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(Problem(f"cannot read prompts: {exc}", file=path)) from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"not valid JSON: {exc.msg}", file=path, line=number))
            continue
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(Problem("expected an object with a non-empty string `prompt`", file=path, line=number))
            continue
        prompts.append(prompt)
    if problems:
        raise UserError(problems)
    return prompts
