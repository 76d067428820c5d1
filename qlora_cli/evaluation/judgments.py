"""Judgment files made elsewhere, read into one in-memory form: pairwise verdicts, relative score pairs and
single-answer grades, each bad line a `Problem` with its file and line.

Two families of lines are recognised, line by line, so files may be mixed and concatenated:

Plain JSON Lines (`question_id` a number or a string; `judge` and `category` optional strings):
    {"question_id": 7, "model_a": "m1", "model_b": "m2", "winner": "model_a" | "model_b" | "tie"}
    {"question_id": 7, "model_a": "m1", "model_b": "m2", "score_a": 8.0, "score_b": 9.5}
`model_a` is always the answer the judge saw first. A line with both `winner` and scores gives both.

FastChat `llm_judge` output (fastchat/llm_judge/common.py, `play_a_match_pair` / `play_a_match_single`):
  * Pairwise lines `{"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge": [model,
    prompt], "turn", ...}` hold TWO games. Game 1 showed model_1's answer first (as "A"), game 2 showed
    model_2's answer first; FastChat maps both verdicts back to model names before writing them, so
    both `g1_winner` and `g2_winner` are "model_1" | "model_2" | "tie" | "error". Each game becomes one
    `Comparison` whose `model_a` is the model shown first. An "error" game (the judge's reply had no
    [[A]]/[[B]]/[[C]] verdict) is counted in `parse_failures` and the line's other game is kept;
    FastChat's own show_result.py instead drops the whole line, and counts two disagreeing games as one
    tie, which keeping both games as they are does on average as well.
  * Pairwise lines written by FastChat's single-grading fallback carry `m1_score`/`m2_score` and the
    same verdict in both games: it was one judgment with no presentation order, so it gives ONE
    `Comparison` (model_1 as `model_a`).
  * Single-answer grading lines `{"question_id", "model", "score", "judge", "turn", ...}`: `score` is
    the [[rating]] the judge gave (asked for 1-10; 0-10 is accepted), or -1 when FastChat could not
    parse one, which is counted in `parse_failures`.
  * `judge` becomes "model/prompt" (e.g. "gpt-4/pair-v2"). FastChat lines carry no category (it lives in
    question.jsonl) and `turn` is not kept: both turns of an MT-bench question share its `question_id`,
    so a bootstrap over questions keeps them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.readers import Location, read_path
from ..errors import Problem

Winner = Literal["model_a", "model_b", "tie"]
WINNERS = ("model_a", "model_b", "tie")
SCORE_PAIR_RANGE = (1.0, 10.0)
SINGLE_SCORE_RANGE = (0.0, 10.0)
FASTCHAT_ERROR = "error"
FASTCHAT_NO_SCORE = -1
# FastChat verdicts -> our winner, for the game where model_1 was shown first (g1) and where model_2 was (g2).
_G1 = {"model_1": "model_a", "model_2": "model_b", "tie": "tie"}
_G2 = {"model_1": "model_b", "model_2": "model_a", "tie": "tie"}


@dataclass(frozen=True)
class Comparison:
    """A pairwise verdict on one question; `model_a` is the answer the judge saw first."""

    question_id: str
    model_a: str
    model_b: str
    winner: Winner
    category: str | None = None
    judge: str | None = None


@dataclass(frozen=True)
class ScorePair:
    """A relative judgment: two 1-10 scores given in one judge call; `model_a` was seen first."""

    question_id: str
    model_a: str
    model_b: str
    score_a: float
    score_b: float
    category: str | None = None
    judge: str | None = None


@dataclass
class Judgments:
    """Everything read from judgment files, in file and line order.

    Attributes:
        comparisons: pairwise verdicts.
        scores: relative score pairs.
        problems: one per malformed line or unreadable file.
        singles: FastChat single-answer grades as `(question_id, model, score)`; not pairwise.
        parse_failures: judge replies the judging tool could not parse (FastChat "error" games, -1 scores).
    """

    comparisons: list[Comparison] = field(default_factory=list)
    scores: list[ScorePair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    singles: list[tuple[str, str, float]] = field(default_factory=list)
    parse_failures: int = 0


class JudgmentError(ValueError):
    """A line that is not a usable judgment; the message says why."""


def _type_name(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field(row: dict, key: str) -> object:
    if row.get(key) is None:
        raise JudgmentError(f"missing field `{key}`")
    return row[key]


def _question_id(row: dict) -> str:
    """The question id as a string, so that 7 and "7" from different tools name the same question."""
    value = _field(row, "question_id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise JudgmentError(f"field `question_id` must be an integer or a string, got {_type_name(value)}")
    if not str(value).strip():
        raise JudgmentError("field `question_id` is empty")
    return str(value)


def _name(row: dict, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise JudgmentError(f"field `{key}` must be a string, got {_type_name(value)}")
    if not value.strip():
        raise JudgmentError(f"field `{key}` is empty")
    return value


def _two_models(row: dict, first: str, second: str) -> tuple[str, str]:
    a, b = _name(row, first), _name(row, second)
    if a == b:
        raise JudgmentError(f"`{first}` and `{second}` are the same model, `{a}`")
    return a, b


def _optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise JudgmentError(f"field `{key}` must be a string, got {_type_name(value)}")
    return value


def _number(row: dict, key: str, low: float, high: float) -> float:
    """`row[key]` as a float in [low, high]; NaN and infinities (which `json` accepts) fail the range check."""
    value = _field(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JudgmentError(f"field `{key}` must be a number, got {_type_name(value)}")
    if not low <= value <= high:
        raise JudgmentError(f"field `{key}` must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _fastchat_judge(row: dict) -> str | None:
    """FastChat's `[judge_model, prompt_name]` as "judge_model/prompt_name"; a plain string is kept."""
    value = row.get("judge")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(part, str) for part in value):
        return "/".join(value)
    raise JudgmentError(f"field `judge` must be a string or a list of strings, got {_type_name(value)}")


def parse_comparison(row: dict) -> Comparison:
    """A plain `winner` line as a `Comparison`.

    Raises:
        JudgmentError: a field is missing, has the wrong type, or `winner` is not one of WINNERS.
    """
    question_id = _question_id(row)
    model_a, model_b = _two_models(row, "model_a", "model_b")
    winner = _field(row, "winner")
    if winner not in WINNERS:
        raise JudgmentError(f"field `winner` must be one of {', '.join(WINNERS)}, got {winner!r}")
    return Comparison(question_id, model_a, model_b, winner,
                      category=_optional_text(row, "category"), judge=_optional_text(row, "judge"))


def parse_score_pair(row: dict) -> ScorePair:
    """A plain `score_a`/`score_b` line as a `ScorePair`.

    Raises:
        JudgmentError: a field is missing, has the wrong type, or a score is outside 1..10.
    """
    question_id = _question_id(row)
    model_a, model_b = _two_models(row, "model_a", "model_b")
    score_a = _number(row, "score_a", *SCORE_PAIR_RANGE)
    score_b = _number(row, "score_b", *SCORE_PAIR_RANGE)
    return ScorePair(question_id, model_a, model_b, score_a, score_b,
                     category=_optional_text(row, "category"), judge=_optional_text(row, "judge"))


def parse_fastchat_pair(row: dict) -> tuple[list[Comparison], int]:
    """The games of a FastChat pairwise line, and how many of them were "error" (see the module docstring).

    Returns:
        (comparisons, failures): one `Comparison` per game the judge decided, `model_a` the model shown
        first; `failures` counts the games whose verdict is "error".

    Raises:
        JudgmentError: a field is missing or has the wrong type, or a verdict is not model_1, model_2,
            tie or error. The whole line is rejected then, not only that game.
    """
    question_id = _question_id(row)
    model_1, model_2 = _two_models(row, "model_1", "model_2")
    judge = _fastchat_judge(row)
    verdicts = [_field(row, "g1_winner"), _field(row, "g2_winner")]
    for key, verdict in zip(("g1_winner", "g2_winner"), verdicts):
        if verdict != FASTCHAT_ERROR and verdict not in _G1:
            raise JudgmentError(f"field `{key}` must be one of model_1, model_2, tie, error, got {verdict!r}")
    games = [(model_1, model_2, _G1, verdicts[0]), (model_2, model_1, _G2, verdicts[1])]
    if "m1_score" in row or "m2_score" in row:
        games = games[:1]  # single-grading fallback: one judgment written twice, not two games
    comparisons = [Comparison(question_id, first, second, mapping[verdict], judge=judge)
                   for first, second, mapping, verdict in games if verdict != FASTCHAT_ERROR]
    return comparisons, len(games) - len(comparisons)


def parse_fastchat_single(row: dict) -> tuple[str, str, float] | None:
    """A FastChat single-answer grade as `(question_id, model, score)`, or None when the score is -1.

    Raises:
        JudgmentError: a field is missing or has the wrong type, or the score is outside 0..10 (and not -1).
    """
    question_id = _question_id(row)
    model = _name(row, "model")
    _fastchat_judge(row)
    if row.get("score") == FASTCHAT_NO_SCORE:
        return None
    return question_id, model, _number(row, "score", *SINGLE_SCORE_RANGE)


def _read_row(location: Location, row: object, result: Judgments) -> None:
    """Adds what one parsed line holds to `result`, or a problem at `location` saying why it holds nothing."""
    if not isinstance(row, dict):
        result.problems.append(location.problem(f"expected a JSON object, got {_type_name(row)}"))
        return
    try:
        if any(key in row for key in ("g1_winner", "g2_winner", "model_1", "model_2")):
            comparisons, failures = parse_fastchat_pair(row)
            result.comparisons += comparisons
            result.parse_failures += failures
        elif "model" in row:
            single = parse_fastchat_single(row)
            if single is None:
                result.parse_failures += 1
            else:
                result.singles.append(single)
        elif "winner" in row or "score_a" in row or "score_b" in row:
            # Parse both before adding either, so a bad line adds nothing.
            comparison = parse_comparison(row) if "winner" in row else None
            pair = parse_score_pair(row) if "score_a" in row or "score_b" in row else None
            result.comparisons += [comparison] if comparison else []
            result.scores += [pair] if pair else []
        elif "model_a" in row or "model_b" in row:
            raise JudgmentError("missing field `winner` (a verdict) or `score_a` and `score_b` (a score pair)")
        else:
            raise JudgmentError(
                "not a judgment: expected `model_a`/`model_b` with `winner` or `score_a`/`score_b`, "
                "or a FastChat `model_1`/`model_2` pairwise or `model`/`score` single-grading line"
            )
    except JudgmentError as exc:
        result.problems.append(location.problem(str(exc)))


def read_judgments(paths: list[Path]) -> Judgments:
    """Every judgment in `paths` (JSON Lines files, or folders of them), in order.

    Never raises for bad content or a missing or unreadable file: every malformed line becomes a
    `Problem` with its file and line, so that all of them are reported in one run.
    """
    result = Judgments()
    for path in paths:
        raw = read_path(Path(path))
        found = len(result.problems)
        for location, row in raw.rows:
            _read_row(location, row, result)
        # The reader reports unparsable lines apart from the rows; merged back, problems read in line order.
        problems = raw.problems + result.problems[found:]
        problems.sort(key=lambda problem: (str(problem.file), problem.line or 0))
        result.problems[found:] = problems
    return result
