"""Readers: every supported row format becomes one form, a list of chat messages.

Rows are checked here, before any model or tokenizer loads, so that a bad row is reported with its
file and line at start-up instead of crashing a run an hour in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import Problem

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names and the chat role each one means.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Example:
    """One training example: chat messages, and where the row came from."""

    messages: list[dict[str, str]]
    file: Path
    line: int


class RowError(ValueError):
    """A row that cannot be used; the message says why."""


def _text(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field `{key}`")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field `{key}` must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"field `{key}` is empty")
    return value


def alpaca_to_messages(row: dict) -> list[dict[str, str]]:
    """`instruction` (+ optional `input`) is the user turn, `output` the assistant turn."""
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    output = _text(row, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = []
    system = _text(row, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _check_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise RowError("the conversation is empty")
    for index, message in enumerate(messages):
        if message["role"] == "system" and index != 0:
            raise RowError(f"message {index}: a system message may only come first")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        raise RowError("the conversation must start with a user message (after an optional system message)")
    for index, (previous, current) in enumerate(zip(turns, turns[1:]), start=1):
        if previous["role"] == current["role"]:
            raise RowError(f"turn {index}: two `{current['role']}` messages in a row; roles must alternate")
    if not any(m["role"] == "assistant" for m in turns):
        raise RowError("the conversation has no assistant message to train on")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RowError(f"message {index}: the assistant message is empty")
    return messages


def chat_to_messages(row: dict) -> list[dict[str, str]]:
    """OpenAI-style `messages` (role/content) or ShareGPT `conversations` (from/value)."""
    if "messages" in row:
        raw, role_key, content_key, roles = row["messages"], "role", "content", {r: r for r in ROLES}
        column = "messages"
    elif "conversations" in row:
        raw, role_key, content_key, roles = row["conversations"], "from", "value", SHAREGPT_ROLES
        column = "conversations"
    else:
        raise RowError("missing field `messages` (or `conversations`)")
    if not isinstance(raw, list):
        raise RowError(f"field `{column}` must be a list of messages, got {type(raw).__name__}")
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RowError(f"{column}[{index}] must be an object with `{role_key}` and `{content_key}`")
        role = item.get(role_key)
        if role not in roles:
            raise RowError(f"{column}[{index}]: unknown role {role!r}; allowed: {', '.join(roles)}")
        content = item.get(content_key)
        if not isinstance(content, str):
            raise RowError(f"{column}[{index}]: `{content_key}` must be a string, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    return _check_conversation(messages)


CONVERTERS: dict[str, Callable[[dict], list[dict[str, str]]]] = {
    "alpaca": alpaca_to_messages,
    "chat": chat_to_messages,
}


def detect_format(row: dict) -> str | None:
    """The format a row's columns say it is in, or None."""
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


@dataclass
class ReadResult:
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)  # rows read per format


def read_jsonl(path: Path, data_format: str) -> ReadResult:
    """Read and check every row of a JSONL file.

    Args:
        path: the file.
        data_format: a key of CONVERTERS, or `auto` to detect it row by row.

    Returns:
        the examples of the good rows and one problem (file, line, reason) per bad row.
    """
    result = ReadResult()
    try:
        handle = path.open("rb")
    except OSError as exc:
        result.problems.append(Problem(f"cannot read: {exc}", file=path))
        return result
    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                result.problems.append(Problem("not valid UTF-8", file=path, line=line_number))
                continue
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                result.problems.append(Problem(f"not valid JSON: {exc.msg} (column {exc.colno})", file=path, line=line_number))
                continue
            if not isinstance(row, dict):
                result.problems.append(Problem(f"a row must be a JSON object, got {type(row).__name__}", file=path, line=line_number))
                continue
            row_format = detect_format(row) if data_format == "auto" else data_format
            if row_format is None:
                columns = ", ".join(sorted(row)) or "none"
                result.problems.append(
                    Problem(
                        f"cannot detect the format from the columns ({columns}); expected `messages`, "
                        "`conversations`, or `instruction` + `output`; or set the source's `format`",
                        file=path,
                        line=line_number,
                    )
                )
                continue
            result.formats[row_format] = result.formats.get(row_format, 0) + 1
            try:
                messages = CONVERTERS[row_format](row)
            except RowError as exc:
                result.problems.append(Problem(f"{row_format} row: {exc}", file=path, line=line_number))
                continue
            result.examples.append(Example(messages=messages, file=path, line=line_number))
    if not result.examples and not result.problems:
        result.problems.append(Problem("the file has no rows", file=path))
    return result
