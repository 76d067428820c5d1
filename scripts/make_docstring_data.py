"""Write a real, length-skewed instruction dataset from the Python standard library's docstrings.

Each row asks what a documented function, class or module does and answers with its docstring, so
lengths are as uneven as real instruction data (most answers short, a few very long). Used by the
benchmarks; needs nothing but the Python installation.

    python scripts/make_docstring_data.py --out /tmp/docstrings.jsonl [--rows 830]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
from pathlib import Path

MODULES = [
    "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "itertools", "json", "logging", "math", "operator", "os", "os.path", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "secrets", "shlex", "shutil", "socket", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
]
QUESTIONS = [
    "What does `{name}` do?",
    "Explain `{name}` from the Python standard library.",
    "Describe the purpose of `{name}`.",
]


def documented(module_name: str):
    module = importlib.import_module(module_name)
    if inspect.getdoc(module):
        yield module_name, inspect.getdoc(module)
    for attribute, value in sorted(vars(module).items()):
        if attribute.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value)):
            continue
        if getattr(value, "__module__", module_name) not in (module_name, None):
            continue
        doc = inspect.getdoc(value)
        if doc and len(doc) > 20:
            yield f"{module_name}.{attribute}", doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=830)
    args = parser.parse_args()
    rng = random.Random(0)
    pairs = [pair for name in MODULES for pair in documented(name)]
    rng.shuffle(pairs)
    rows = [
        {"instruction": rng.choice(QUESTIONS).format(name=name), "input": "", "output": doc}
        for name, doc in pairs[: args.rows]
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
