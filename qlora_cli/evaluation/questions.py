"""Benchmark questions, read into one form from the files chatbot benchmarks ship them in.

Accepted rows (JSON Lines, a JSON array, CSV/TSV with these columns, or plain text lines):
    FastChat Vicuna bench   {"question_id": 1, "text": "...", "category": "generic"}
    FastChat MT-bench       {"question_id": 81, "category": "writing", "turns": ["...", "..."]}
    Arena-Hard-Auto v2      {"uid": "a1b2...", "category": "hard_prompt", "prompt": "..."}
    Arena-Hard-Auto v0.1    {"question_id": "a1b2...", "category": "arena-hard-v0.1", "turns": [{"content": "..."}]}
    OpenAssistant style     {"text": "### Human: ... ### Assistant:"}   (one human turn, no reply yet)
    plain prompt            {"prompt": "..."}
    a `.txt` file           one prompt per non-blank line
`question_id` (or Arena-Hard's `uid`; a number or a string) and `category` (a string) are optional everywhere (an empty CSV cell
counts as absent): a row without an id is numbered by its line (or, in a JSON array, its row), and one
without a category is "general".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..data.readers import Location, json_type_name, read_path
from ..core.errors import Problem, UserError

DEFAULT_QUESTIONS = "default_questions.jsonl"
DEFAULT_CATEGORY = "general"
TEXT_SUFFIX = ".txt"
_PROMPT_KEYS = ("text", "turns", "prompt")
# OpenAssistant's markers; `re.split` with a group keeps the role names between the pieces.
_OA_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


@dataclass(frozen=True)
class Question:
    """One benchmark question: a single turn for Vicuna-style benchmarks, several for MT-bench.

    Attributes:
        question_id: the id as a string, so that 7 and "7" from different tools name the same question.
        category: e.g. "coding"; DEFAULT_CATEGORY when the file gives none.
        turns: the user's messages in order; later turns are asked after the model's earlier answers.
        source_id: the id exactly as the file wrote it (FastChat's are numbers, Arena-Hard's strings), so
            answers written for those tools match their question files; None means `question_id`.
    """

    question_id: str
    category: str
    turns: tuple[str, ...]
    source_id: int | str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.source_id is None:
            object.__setattr__(self, "source_id", self.question_id)


class _Bad(ValueError):
    """A row that is not a question; the message says why."""


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _Bad(f"field `{key}` must be a string, got {json_type_name(value)}")
    if not value.strip():
        raise _Bad(f"field `{key}` is empty")
    return value


def _question_id(row: dict, location: Location) -> int | str:
    """The row's id as written (`question_id`, or Arena-Hard's `uid`), or its line (row) number when it
    has none (or an empty CSV cell)."""
    key = "uid" if row.get("question_id") in (None, "") and "uid" in row else "question_id"
    if row.get(key) in (None, ""):
        return location.line if location.line is not None else location.row
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Bad(f"field `{key}` must be an integer or a string, got {json_type_name(value)}")
    if not str(value).strip():
        raise _Bad(f"field `{key}` is empty")
    return value


def _openassistant_turn(text: str) -> str:
    """The human message of `### Human: ... ### Assistant:`; a row with a reply or several turns is refused,
    because a benchmark question must end where the model starts answering."""
    pieces = _OA_MARKER.split(text)  # [before, role, content, role, content, ...]
    if pieces[0].strip():
        raise _Bad("text before the first `### Human:`; the prompt must start with it")
    roles, contents = pieces[1::2], pieces[2::2]
    if roles[0] != "Human" or roles[1:] not in ([], ["Assistant"]) or (roles[1:] and contents[1].strip()):
        raise _Bad("expected one `### Human: <question> ### Assistant:` turn; conversations with replies "
                   "are not benchmark questions")
    if not contents[0].strip():
        raise _Bad("the `### Human:` turn is empty")
    return contents[0].strip()


def turn_texts(turns: list) -> list:
    """The turns of a question or an answer as written: strings, or Arena-Hard v0.1's `{"content": text}`
    unwrapped. Anything else is passed through, for the caller to refuse with its own message."""
    return [turn.get("content") if isinstance(turn, dict) else turn for turn in turns]


def _turns(row: dict) -> tuple[str, ...]:
    present = [key for key in _PROMPT_KEYS if row.get(key) is not None]
    if not present:
        raise _Bad("not a question: expected a `text`, `turns` or `prompt` field")
    if len(present) > 1:
        raise _Bad(f"fields {' and '.join(f'`{key}`' for key in present)} both hold a question; keep one")
    key = present[0]
    if key == "turns":
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise _Bad("field `turns` must be a non-empty array of strings")
        turns = turn_texts(turns)
        for number, turn in enumerate(turns, start=1):
            if not isinstance(turn, str) or not turn.strip():
                raise _Bad(f"turn {number} of `turns` must be a non-empty string (or {{\"content\": string}})")
        return tuple(turns)
    text = _text(row, key)
    if key == "text" and _OA_MARKER.search(text):
        return (_openassistant_turn(text),)
    return (text.strip(),)


def parse_question(row: object, location: Location) -> Question:
    """One row as a `Question`.

    Raises:
        ValueError: the row is not an object, or a field is missing, empty or of the wrong type.
    """
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object, got {json_type_name(row)}")
    turns = _turns(row)
    category = _text(row, "category") if row.get("category") not in (None, "") else DEFAULT_CATEGORY
    source_id = _question_id(row, location)
    return Question(str(source_id), category, turns, source_id=source_id)


def _read_text_lines(path: Path) -> tuple[list[tuple[Location, object]], list[Problem]]:
    """Each non-blank line of a `.txt` file as a `{"prompt": line}` row at its line."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [Problem(f"cannot read: {exc.strerror or exc}", file=name)]
    rows, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            problems.append(Problem("not valid UTF-8", file=name, line=number))
            continue
        if line:
            rows.append((Location(name, line=number), {"prompt": line}))
    return rows, problems


def _read_rows(path: Path) -> tuple[list[tuple[Location, object]], list[Problem]]:
    if path.suffix.lower() == TEXT_SUFFIX and path.is_file():
        return _read_text_lines(path)
    raw = read_path(path)
    return raw.rows, raw.problems


def _questions_from(path: Path) -> list[Question]:
    rows, problems = _read_rows(path)
    questions: list[Question] = []
    first_seen: dict[str, Location] = {}
    for location, row in rows:
        try:
            question = parse_question(row, location)
        except _Bad as exc:
            problems.append(location.problem(str(exc)))
            continue
        if question.question_id in first_seen:
            first = first_seen[question.question_id]
            where = f"line {first.line}" if first.line else f"row {first.row}"
            where = where if first.file == location.file else str(first)
            problems.append(location.problem(f"duplicate question id `{question.question_id}` (first at {where})"))
            continue
        first_seen[question.question_id] = location
        questions.append(question)
    if problems:
        # The reader reports unparsable lines apart from the rows; sorted, they read in file order.
        problems.sort(key=lambda problem: (str(problem.file), problem.line or 0, problem.key or ""))
        raise UserError(problems, title=f"{path}: {len(problems)} bad question row(s):")
    if not questions:
        raise UserError(Problem("no questions in this file", file=str(path)))
    return questions


def read_questions(path: Path | None = None) -> list[Question]:
    """The questions in `path` in file order, or the 80 shipped with the package when `path` is None.

    `path` may be a `.jsonl`, `.json`, `.csv`, `.tsv` or `.txt` file, or a folder of the first four.

    Raises:
        UserError: the file is missing or unreadable, holds no questions, or has bad rows or duplicate
            ids; every problem is reported at once, each with its file and line.
    """
    if path is not None:
        return _questions_from(Path(path))
    # as_file gives a real path even when the package is installed inside a zip.
    with resources.as_file(resources.files(__package__) / DEFAULT_QUESTIONS) as default:
        return _questions_from(Path(default))
