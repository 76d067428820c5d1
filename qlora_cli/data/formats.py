"""Row formats: every supported row becomes one `Example`, either a chat conversation (rendered later
with the chat template) or template-free text segments (tokenized as given).

Rows are checked here, before any model or tokenizer loads, so that a bad row is reported with its
file and line at start-up instead of crashing a run an hour in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .readers import Location
from .templates import Segment

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names and the chat role each one means.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OASST_TURN = re.compile(r"### (Human|Assistant):[ \t]?")


@dataclass
class Example:
    """One training example and where its row came from.

    Exactly one of `messages` (a conversation for the chat template) and `segments` (template-free
    text, trained or not, tokenized as given) is set. `add_eos` asks for the EOS token after the last
    segment, trained like that segment, so template-free examples still learn to stop.
    """

    location: Location
    messages: list[dict[str, str]] | None = None
    segments: list[Segment] | None = None
    add_eos: bool = False


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


def _messages(raw: object, column: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
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
    return messages


def alpaca(row: dict, location: Location) -> Example:
    """`instruction` (+ optional `input`) is the user turn, `output` the assistant turn."""
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    output = _text(row, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = _text(row, "system", required=False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(location, messages=messages)


def chat(row: dict, location: Location) -> Example:
    """OpenAI-style `messages` (role/content) or ShareGPT `conversations` (from/value)."""
    if "messages" in row:
        messages = _messages(row["messages"], "messages", "role", "content", {r: r for r in ROLES})
    elif "conversations" in row:
        messages = _messages(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    else:
        raise RowError("missing field `messages` (or `conversations`)")
    return Example(location, messages=_check_conversation(messages))


def oasst(row: dict, location: Location) -> Example:
    """The Guanaco / OpenAssistant text form: `### Human: ... ### Assistant: ...`, any number of turns."""
    text = _text(row, "text")
    parts = OASST_TURN.split(text)
    if parts[0].strip():
        raise RowError("text before the first `### Human:`")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not messages:
        raise RowError("no `### Human:` / `### Assistant:` turns in `text`")
    return Example(location, messages=_check_conversation(messages))


def input_output(row: dict, location: Location) -> Example:
    """Template-free: `segments` of `{"text", "label"}`, tokenized exactly as given; loss where label is true."""
    raw = row.get("segments")
    if not isinstance(raw, list) or not raw:
        raise RowError("field `segments` must be a non-empty list of {text, label} objects")
    segments = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not isinstance(item.get("label"), bool):
            raise RowError(f"segments[{index}] must be an object with a string `text` and a true/false `label`")
        segments.append(Segment(item["text"], item["label"]))
    if not any(s.trained and s.text.strip() for s in segments):
        raise RowError("no segment has `label: true` and text, so nothing would be trained")
    return Example(location, segments=segments)


def prompt_completion(row: dict, location: Location) -> Example:
    """`prompt` and `completion`: strings (template-free, EOS appended) or message lists (a conversation)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt", "role", "content", {r: r for r in ROLES})
        if isinstance(completion, list):
            reply = _messages(completion, "completion", "role", "content", {r: r for r in ROLES})
        else:
            reply = [{"role": "assistant", "content": _text(row, "completion")}]
        return Example(location, messages=_check_conversation(messages + reply))
    prompt_text, completion_text = _text(row, "prompt"), _text(row, "completion")
    return Example(location, segments=[Segment(prompt_text, False), Segment(completion_text, True)], add_eos=True)


def text(row: dict, location: Location) -> Example:
    """Raw text for continued pre-training: the loss is on every token, EOS appended."""
    return Example(location, segments=[Segment(_text(row, "text"), True)], add_eos=True)


CONVERTERS: dict[str, Callable[[dict, Location], Example]] = {
    "alpaca": alpaca,
    "chat": chat,
    "oasst": oasst,
    "input-output": input_output,
    "prompt-completion": prompt_completion,
    "text": text,
}


def detect_format(row: dict) -> str | None:
    """The format a row's columns say it is in, or None."""
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt-completion"
    if "segments" in row:
        return "input-output"
    if "text" in row:
        body = row["text"]
        return "oasst" if isinstance(body, str) and body.lstrip().startswith("### Human:") else "text"
    return None


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """The row with its columns renamed to what the format expects; `columns` maps expected -> actual."""
    if not columns:
        return row
    renamed = dict(row)
    for expected, actual in columns.items():
        if actual in row:
            renamed.pop(actual)
            renamed[expected] = row[actual]
    return renamed


def renamed_with_layout(row: object, columns: dict[str, str], data_format: str,
                        detect: Callable[[dict], str | None], kind: str, expected: str) -> tuple[dict, str]:
    """The row with its columns renamed, and its layout: `data_format`, or under `auto` the one `detect` tells
    from its columns (SFT's formats and the preference layouts alike).

    Raises:
        RowError: the row is not an object, or its layout cannot be told; `kind` and `expected` name what was sought.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    row = rename_columns(row, columns)
    row_format = detect(row) if data_format == "auto" else data_format
    if row_format is None:
        names = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"cannot tell the {kind} from the columns ({names}); expected {expected}; set the source's "
                       "`format` or map columns with `columns`")
    return row, row_format


def to_example(row: object, location: Location, data_format: str, columns: dict[str, str]) -> Example:
    """Convert one raw row.

    Raises:
        RowError: the row is not an object, its format cannot be told, or it breaks its format's rules.
    """
    row, row_format = renamed_with_layout(
        row, columns, data_format, detect_format, "format",
        "`messages`, `conversations`, `instruction`+`output`, `prompt`+`completion`, `segments` or `text`")
    if row_format not in CONVERTERS:
        raise RowError(f"format `{row_format}` is a preference layout; train it with training.method dpo, orpo or kto")
    try:
        return CONVERTERS[row_format](row, location)
    except RowError as error:
        raise RowError(f"{row_format} row: {error}") from None
