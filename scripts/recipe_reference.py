"""Write the recipe reference (generated from the schema) into README.md between its markers.

    python scripts/recipe_reference.py          # update README.md
    python scripts/recipe_reference.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from qlora_cli.core.recipe import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def updated(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


if __name__ == "__main__":
    current = README.read_text(encoding="utf-8")
    fresh = updated(current)
    if "--check" in sys.argv:
        sys.exit(0 if fresh == current else 1)
    README.write_text(fresh, encoding="utf-8")
