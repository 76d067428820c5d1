"""Judgment files made elsewhere, read into one in-memory form: pairwise verdicts, relative score pairs and
single-answer grades. A line that holds no usable judgment is an `Excluded` record with its file, line, the
models it names and a short reason, so that scoring can leave it out, count it and list it.

The layout of each line is recognised from its fields, so files may be mixed and concatenated:

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
    [[A]]/[[B]]/[[C]] verdict) is excluded as unscored and the line's other game is kept.
    Each line is also kept whole as a `FastChatLine`, because FastChat's own show_result.py scores
    lines, not games: it drops a line when either game is an error and counts a line whose two games
    disagree as one tie (scoring.fastchat_pairwise reproduces it).
  * Pairwise lines written by FastChat's single-grading fallback carry `m1_score`/`m2_score` and the
    same verdict in both games: it was one judgment with no presentation order, so it gives ONE
    `Comparison` (model_1 as `model_a`).
  * Single-answer grading lines `{"question_id", "model", "score", "judge", "turn", ...}`: `score` is
    the [[rating]] the judge gave (asked for 1-10; 0-10 is accepted), or -1 when FastChat could not
    parse one, which is excluded as unscored.
  * `judge` becomes "model/prompt" (e.g. "gpt-4/pair-v2"). FastChat lines carry no category (it lives in
    question.jsonl); pairwise `turn` is not kept: both turns of an MT-bench question share its
    `question_id`, so a bootstrap over questions keeps them together.

Arena-Hard-Auto judgments (gen_judgment.py; v2.0 and v0.1):
    {"uid" (v2) | "question_id" (v0.1), "category", "judge", "model", "baseline", "games": [game, game]}
  with each game `{"score": "A>B", "judgment": ..., "prompt" | "user_prompt": ...}` or null. Game 1
  showed the BASELINE's answer as A and the model's as B; game 2 swapped them. Verdicts are A>>B, A>B,
  A=B, B>A, B>>A (and the mirrored spellings show_result.py maps). A strong verdict (>>) weighs
  ARENA_HARD_STRONG_WEIGHT games, as show_result.py counts it. Older files have no `baseline` field: it
  is then the baseline Arena-Hard configures for the row's category (ARENA_HARD_BASELINES), or
  gpt-4-0314 for v0.1 rows, which have no category. A game whose score is null (the judge gave no
  verdict) is excluded as unscored and the row's other game is kept, as v0.1's show_result.py does
  (it gives such a game weight 0); v2's show_result.py drops the whole row when either game is null.

AlpacaEval annotations (annotations.json, a JSON array, or the same objects one per line):
    {"instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference", "dataset"?}
  `preference` is 1 when output_1 (the reference) is preferred, 2 when output_2 is, 1.5 (or 0, the old
  spelling) for a draw, and anything between for weighted annotators (AlpacaEval 2.0), where
  `preference - 1` is the probability that output_2 is better. It becomes a `Comparison` of generator_1
  (`model_a`) with generator_2 whose `result` is that graded preference; AlpacaEval shows the two outputs
  in random order and the file does not record it, so here `model_a` is not the answer shown first. A
  null preference (the annotator gave none) is excluded as unscored. The instruction text is the
  question id and `dataset` the category. When output_1 and output_2 are the same text the preference
  is 1.5 whatever the file says, as AlpacaEval's annotator sets it before asking any judge
  (PairwiseAnnotatorLocal._preprocess). AlpacaEval publishes its reference compared with itself this
  way (generator_1 = generator_2, every preference 1.5) and lists it at 50.0: such a self-comparison is
  kept, a `Comparison` whose `model_a` and `model_b` are the same model (the only layout that allows it).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.readers import Location, json_type_name as _type_name, read_path
from ..core.errors import Problem

Winner = Literal["model_a", "model_b", "tie"]
WINNERS = ("model_a", "model_b", "tie")
SCORE_PAIR_RANGE = (1.0, 10.0)
SINGLE_SCORE_RANGE = (0.0, 10.0)
FASTCHAT_ERROR = "error"
FASTCHAT_NO_SCORE = -1
# FastChat verdicts -> our winner, for the game where model_1 was shown first (g1) and where model_2 was (g2).
_G1 = {"model_1": "model_a", "model_2": "model_b", "tie": "tie"}
_G2 = {"model_1": "model_b", "model_2": "model_a", "tie": "tie"}
# Arena-Hard verdict -> (winner between the answer shown as A and the one shown as B, strong?), with the
# mirrored spellings its show_result.py also maps.
ARENA_HARD_VERDICTS: dict[str, tuple[Winner, bool]] = {
    "A>>B": ("model_a", True), "A>B": ("model_a", False), "A=B": ("tie", False),
    "B>A": ("model_b", False), "B>>A": ("model_b", True),
    "A<<B": ("model_b", True), "A<B": ("model_b", False), "B=A": ("tie", False),
    "B<<A": ("model_a", True), "B<A": ("model_a", False),
}
ARENA_HARD_STRONG_WEIGHT = 3  # show_result.py's `weight`: a >> verdict counts as three battles
# The baselines Arena-Hard-Auto's JUDGE_SETTINGS name per category, for rows written before `baseline` was.
ARENA_HARD_BASELINES = {
    "hard_prompt": "o3-mini-2025-01-31", "coding": "o3-mini-2025-01-31", "math": "o3-mini-2025-01-31",
    "creative_writing": "gemini-2.0-flash-001", "arena-hard-v0.1": "gpt-4-0314",
}
ARENA_HARD_V01_BASELINE = "gpt-4-0314"
ALPACA_PREFERENCE_RANGE = (1.0, 2.0)
ALPACA_DRAW = 1.5
ALPACA_OLD_DRAW = 0  # AlpacaEval 1 wrote draws as 0; its metrics still read 0 as 1.5

# Reasons a line is left out; lines with the same reason are counted together.
NOT_JSON = "not valid JSON"
NOT_UTF8 = "not valid UTF-8"
NOT_A_JUDGMENT = "not a judgment"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
OUT_OF_RANGE = "out of range"
UNKNOWN_VERDICT = "unknown verdict"
SAME_MODEL = "same model twice"
NO_VERDICT = "judge gave no verdict"  # unscored, not malformed: the judging tool recorded the failure


@dataclass(frozen=True)
class Comparison:
    """A pairwise verdict on one question; `model_a` is the answer the judge saw first (see the module
    docstring for AlpacaEval, whose files do not record it, and whose reference may be compared with
    itself: `model_a` == `model_b`, which no other layout allows).

    Attributes:
        weight: how many games this verdict counts as (Arena-Hard's strong verdicts count as several).
        result: model_a's share of the win in [0, 1] when the judge graded its preference (AlpacaEval's
            weighted annotators); None means 1, 0 or 0.5 as `winner` says.
    """

    question_id: str
    model_a: str
    model_b: str
    winner: Winner
    category: str | None = None
    judge: str | None = None
    weight: int = 1
    result: float | None = None


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


@dataclass(frozen=True)
class FastChatLine:
    """One FastChat pairwise line as its show_result.py reads it: the two verdicts as written.

    Attributes:
        g1_winner: game 1's verdict (model_1 shown first): "model_1" | "model_2" | "tie" | "error".
        g2_winner: game 2's verdict (model_2 shown first), in the same model_1/model_2 terms.
        single_grading: written by FastChat's single-grading fallback (one verdict written twice).
    """

    question_id: str
    model_1: str
    model_2: str
    g1_winner: str
    g2_winner: str
    judge: str | None = None
    single_grading: bool = False


@dataclass(frozen=True)
class Grade:
    """A single-answer grade (FastChat's [[rating]]): one model's answer scored on its own."""

    question_id: str
    model: str
    score: float
    turn: int | None = None
    judge: str | None = None


@dataclass(frozen=True)
class Excluded:
    """A judgment left out of the scores.

    Attributes:
        problem: where it is (file and line) and the full message.
        reason: a short reason shared by similar lines (`OUT_OF_RANGE`, `NO_VERDICT`, ...).
        models: the models the line names, as far as they could be read.
        malformed: True for a line that is not a valid judgment (`--strict` refuses those); False for a
            judgment the judging tool itself recorded as having no verdict.
    """

    problem: Problem
    reason: str
    models: tuple[str, ...] = ()
    malformed: bool = True

    def pair(self) -> str:
        """The models as one label, in name order ("m1 vs m2"), so both orders of a pair count together."""
        return " vs ".join(sorted(set(self.models))) if self.models else "(unknown models)"


@dataclass
class Judgments:
    """Everything read from judgment files, in file and line order.

    Attributes:
        comparisons: pairwise verdicts.
        scores: relative score pairs.
        grades: single-answer grades.
        fastchat_lines: FastChat pairwise lines, whole (their games are also in `comparisons`).
        excluded: one record per line (or game) left out, malformed or unscored, in file and line order.
        file_problems: files that could not be read at all (missing, unreadable, not rows); never tolerated.
    """

    comparisons: list[Comparison] = field(default_factory=list)
    scores: list[ScorePair] = field(default_factory=list)
    grades: list[Grade] = field(default_factory=list)
    fastchat_lines: list[FastChatLine] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    file_problems: list[Problem] = field(default_factory=list)

    @property
    def malformed(self) -> list[Excluded]:
        return [entry for entry in self.excluded if entry.malformed]

    @property
    def problems(self) -> list[Problem]:
        """Every file problem and malformed line, in file and line order (what `--strict` refuses)."""
        problems = self.file_problems + [entry.problem for entry in self.malformed]
        return sorted(problems, key=lambda problem: (str(problem.file), problem.line or 0))

    @property
    def parse_failures(self) -> int:
        """Judgments the judging tool recorded without a verdict (FastChat "error", -1, null scores)."""
        return sum(not entry.malformed for entry in self.excluded)

    def excluded_counts(self) -> dict[str, dict[str, int]]:
        """{"m1 vs m2": {reason: count}}, pairs and reasons in name order."""
        counts: dict[str, Counter] = {}
        for entry in self.excluded:
            counts.setdefault(entry.pair(), Counter())[entry.reason] += 1
        return {pair: dict(sorted(reasons.items())) for pair, reasons in sorted(counts.items())}

    def read_count(self) -> int:
        """How many judgments were read, scored or not (a FastChat line counts once per game)."""
        return len(self.comparisons) + len(self.scores) + len(self.grades) + len(self.excluded)


EXCERPT_CHARS = 240


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A judge's reply shortened to about `limit` characters for a message: whitespace runs made one space,
    and a long reply cut in the middle, so that both how it starts and how it ends (where a verdict
    belongs) show."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    head = limit * 2 // 3
    return f"{flat[:head].rstrip()} [...] {flat[len(flat) - (limit - head):].lstrip()}"


def _wrote(text: object) -> str:
    """"; the judge wrote: ..." with the judge's text shortened, or "" when the line does not keep it."""
    return f'; the judge wrote: "{excerpt(text)}"' if isinstance(text, str) and text.strip() else ""


class JudgmentError(ValueError):
    """A line that is not a usable judgment; the message says why, `reason` which kind of problem it is."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _field(row: dict, key: str) -> object:
    if row.get(key) is None:
        raise JudgmentError(f"missing field `{key}`", MISSING_FIELD)
    return row[key]


def _question_id(row: dict, key: str = "question_id") -> str:
    """The question id as a string, so that 7 and "7" from different tools name the same question."""
    value = _field(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise JudgmentError(f"field `{key}` must be an integer or a string, got {_type_name(value)}", WRONG_TYPE)
    if not str(value).strip():
        raise JudgmentError(f"field `{key}` is empty", MISSING_FIELD)
    return str(value)


def _name(row: dict, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise JudgmentError(f"field `{key}` must be a string, got {_type_name(value)}", WRONG_TYPE)
    if not value.strip():
        raise JudgmentError(f"field `{key}` is empty", MISSING_FIELD)
    return value


def _two_models(row: dict, first: str, second: str) -> tuple[str, str]:
    a, b = _name(row, first), _name(row, second)
    if a == b:
        raise JudgmentError(f"`{first}` and `{second}` are the same model, `{a}`", SAME_MODEL)
    return a, b


def _optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise JudgmentError(f"field `{key}` must be a string, got {_type_name(value)}", WRONG_TYPE)
    return value


def _number(row: dict, key: str, low: float, high: float) -> float:
    """`row[key]` as a float in [low, high]; NaN and infinities (which `json` accepts) fail the range check."""
    value = _field(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JudgmentError(f"field `{key}` must be a number, got {_type_name(value)} {json.dumps(value)[:40]}",
                            WRONG_TYPE)
    if not low <= value <= high:
        raise JudgmentError(f"field `{key}` must be between {low:g} and {high:g}, got {value}", OUT_OF_RANGE)
    return float(value)


def _fastchat_judge(row: dict) -> str | None:
    """FastChat's `[judge_model, prompt_name]` as "judge_model/prompt_name"; a plain string is kept."""
    value = row.get("judge")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(part, str) for part in value):
        return "/".join(value)
    raise JudgmentError(f"field `judge` must be a string or a list of strings, got {_type_name(value)}", WRONG_TYPE)


def named_models(row: object) -> tuple[str, ...]:
    """The model names a line holds under any of the layouts' keys, for counting what is left out."""
    if not isinstance(row, dict):
        return ()
    keys = ("model_a", "model_b", "model_1", "model_2", "baseline", "model", "generator_1", "generator_2")
    return tuple(dict.fromkeys(row[key] for key in keys if isinstance(row.get(key), str) and row[key].strip()))


def parse_comparison(row: dict) -> Comparison:
    """A plain `winner` line as a `Comparison`.

    Raises:
        JudgmentError: a field is missing, has the wrong type, or `winner` is not one of WINNERS.
    """
    question_id = _question_id(row)
    model_a, model_b = _two_models(row, "model_a", "model_b")
    winner = _field(row, "winner")
    if winner not in WINNERS:
        raise JudgmentError(f"field `winner` must be one of {', '.join(WINNERS)}, got {winner!r}", UNKNOWN_VERDICT)
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


def parse_fastchat_pair(row: dict) -> FastChatLine:
    """A FastChat pairwise line, checked (see the module docstring).

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
            raise JudgmentError(f"field `{key}` must be one of model_1, model_2, tie, error, got {verdict!r}",
                                UNKNOWN_VERDICT)
    return FastChatLine(question_id, model_1, model_2, *verdicts, judge=judge,
                        single_grading="m1_score" in row or "m2_score" in row)


def fastchat_games(line: FastChatLine) -> tuple[list[Comparison], int]:
    """The games of a FastChat pairwise line, and how many of them were "error".

    Returns:
        (comparisons, failures): one `Comparison` per game the judge decided, `model_a` the model shown
        first; a single-grading line gives one (model_1 as `model_a`: it was one judgment with no
        presentation order); `failures` counts the games whose verdict is "error".
    """
    games = [(line.model_1, line.model_2, _G1, line.g1_winner), (line.model_2, line.model_1, _G2, line.g2_winner)]
    if line.single_grading:
        games = games[:1]
    comparisons = [Comparison(line.question_id, first, second, mapping[verdict], judge=line.judge)
                   for first, second, mapping, verdict in games if verdict != FASTCHAT_ERROR]
    return comparisons, len(games) - len(comparisons)


def parse_fastchat_single(row: dict) -> Grade | None:
    """A FastChat single-answer grade, or None when the score is -1 (FastChat found no [[rating]]).

    Raises:
        JudgmentError: a field is missing or has the wrong type, or the score is outside 0..10 (and not -1).
    """
    question_id = _question_id(row)
    model = _name(row, "model")
    judge = _fastchat_judge(row)
    turn = row.get("turn")
    if turn is not None and (isinstance(turn, bool) or not isinstance(turn, int)):
        raise JudgmentError(f"field `turn` must be an integer, got {_type_name(turn)}", WRONG_TYPE)
    if row.get("score") == FASTCHAT_NO_SCORE:
        return None
    return Grade(question_id, model, _number(row, "score", *SINGLE_SCORE_RANGE), turn=turn, judge=judge)


def _arena_hard_baseline(row: dict) -> str:
    if row.get("baseline") is not None:
        return _name(row, "baseline")
    category = _optional_text(row, "category")
    if category is None:
        return ARENA_HARD_V01_BASELINE
    if category not in ARENA_HARD_BASELINES:
        raise JudgmentError(f"missing field `baseline`, and Arena-Hard names no baseline for category {category!r}",
                            MISSING_FIELD)
    return ARENA_HARD_BASELINES[category]


def parse_arena_hard(row: dict) -> tuple[list[Comparison], int]:
    """The games of an Arena-Hard-Auto judgment line (see the module docstring).

    Returns:
        (comparisons, failures): one `Comparison` per game with a verdict, `model_a` the answer shown as A
        (the baseline in game 1, the model in game 2), strong verdicts weighing ARENA_HARD_STRONG_WEIGHT;
        `failures` counts games with a null score or no game at all.

    Raises:
        JudgmentError: a field is missing or has the wrong type, or a verdict is not one Arena-Hard writes.
    """
    question_id = _question_id(row, "uid" if "uid" in row else "question_id")
    model, baseline = _name(row, "model"), _arena_hard_baseline(row)
    if model == baseline:
        raise JudgmentError(f"`model` and the baseline are the same model, `{model}`", SAME_MODEL)
    category, judge = _optional_text(row, "category"), _optional_text(row, "judge")
    games = _field(row, "games")
    if not isinstance(games, list) or not 1 <= len(games) <= 2:
        raise JudgmentError("field `games` must be an array of one or two games", WRONG_TYPE)
    comparisons, failures = [], 0
    for number, game, (shown_a, shown_b) in zip((1, 2), games, ((baseline, model), (model, baseline))):
        if game is not None and not isinstance(game, dict):
            raise JudgmentError(f"game {number} must be an object, got {_type_name(game)}", WRONG_TYPE)
        score = None if game is None else game.get("score")
        if score is None:
            failures += 1
            continue
        label = score.strip().upper() if isinstance(score, str) else None
        if label not in ARENA_HARD_VERDICTS:
            raise JudgmentError(f"game {number}: `score` must be one of {', '.join(list(ARENA_HARD_VERDICTS)[:5])}, "
                                f"got {score!r}", UNKNOWN_VERDICT)
        winner, strong = ARENA_HARD_VERDICTS[label]
        comparisons.append(Comparison(question_id, shown_a, shown_b, winner, category=category, judge=judge,
                                      weight=ARENA_HARD_STRONG_WEIGHT if strong else 1))
    return comparisons, failures


def parse_alpaca_eval(row: dict) -> Comparison | None:
    """An AlpacaEval annotation as a `Comparison` of generator_1 with generator_2, or None when its
    preference is null (the annotator gave none). Identical outputs are a draw; generator_1 and
    generator_2 may be the same model (see the module docstring).

    Raises:
        JudgmentError: a field is missing or has the wrong type, or the preference is outside 1..2 (and not 0).
    """
    question_id = _question_id(row, "instruction")
    model_a, model_b = _name(row, "generator_1"), _name(row, "generator_2")  # the same for a self-comparison
    category, judge = _optional_text(row, "dataset"), _optional_text(row, "annotator")
    preference = row.get("preference")
    if isinstance(row.get("output_1"), str) and row.get("output_1") == row.get("output_2"):
        preference = ALPACA_DRAW  # identical outputs are a draw, as AlpacaEval's annotator decides them
    if preference is None or (isinstance(preference, float) and math.isnan(preference)):
        return None
    if isinstance(preference, (int, float)) and not isinstance(preference, bool) and preference == ALPACA_OLD_DRAW:
        preference = ALPACA_DRAW
    preference = _number({"preference": preference}, "preference", *ALPACA_PREFERENCE_RANGE)
    result_a = 2.0 - preference  # preference - 1 is generator_2's chance of being the better one
    winner = "model_a" if result_a > 0.5 else "model_b" if result_a < 0.5 else "tie"
    return Comparison(question_id, model_a, model_b, winner, category=category, judge=judge, result=result_a)


def _is_arena_hard(row: dict) -> bool:
    return "games" in row


def _is_alpaca_eval(row: dict) -> bool:
    return "preference" in row or "generator_1" in row or "generator_2" in row


def _is_fastchat_pair(row: dict) -> bool:
    return any(key in row for key in ("g1_winner", "g2_winner", "model_1", "model_2"))


def _read_row(location: Location, row: object, result: Judgments) -> None:
    """Adds what one parsed line holds to `result`, and an `Excluded` record for what it cannot use."""
    if not isinstance(row, dict):
        result.excluded.append(Excluded(location.problem(f"expected a JSON object, got {_type_name(row)}"),
                                        NOT_A_JUDGMENT))
        return
    models = named_models(row)

    def unscored(count: int, what: str) -> None:
        result.excluded += [Excluded(location.problem(what), NO_VERDICT, models, malformed=False)] * count

    try:
        if _is_arena_hard(row):
            comparisons, failures = parse_arena_hard(row)
            result.comparisons += comparisons
            for number, game in enumerate(row["games"], start=1):
                if game is None or game.get("score") is None:
                    unscored(1, f"game {number} has no verdict (null score)"
                                + _wrote(game.get("judgment") if game else None))
        elif _is_alpaca_eval(row):
            comparison = parse_alpaca_eval(row)
            result.comparisons += [comparison] if comparison else []
            unscored(comparison is None, "no preference (null)" + _wrote(row.get("raw_completion")))
        elif _is_fastchat_pair(row):
            line = parse_fastchat_pair(row)
            comparisons, _ = fastchat_games(line)
            result.fastchat_lines.append(line)
            result.comparisons += comparisons
            games = [(1, line.g1_winner)] + ([] if line.single_grading else [(2, line.g2_winner)])
            for number, verdict in games:
                if verdict == FASTCHAT_ERROR:
                    unscored(1, f"game {number}: the judge gave no verdict (FastChat `error`)"
                                + _wrote(row.get(f"g{number}_judgment")))
        elif "model" in row:
            grade = parse_fastchat_single(row)
            result.grades += [grade] if grade else []
            unscored(grade is None, "no rating (FastChat score -1)" + _wrote(row.get("judgment")))
        elif "winner" in row or "score_a" in row or "score_b" in row:
            # Parse both before adding either, so a bad line adds nothing.
            comparison = parse_comparison(row) if "winner" in row else None
            pair = parse_score_pair(row) if "score_a" in row or "score_b" in row else None
            result.comparisons += [comparison] if comparison else []
            result.scores += [pair] if pair else []
        elif "model_a" in row or "model_b" in row:
            raise JudgmentError("missing field `winner` (a verdict) or `score_a` and `score_b` (a score pair)",
                                MISSING_FIELD)
        else:
            raise JudgmentError(
                "not a judgment: expected `model_a`/`model_b` with `winner` or `score_a`/`score_b`, "
                "a FastChat `model_1`/`model_2` pairwise or `model`/`score` single-grading line, "
                "an Arena-Hard line with `games`, or an AlpacaEval annotation with `preference`",
                NOT_A_JUDGMENT,
            )
    except JudgmentError as exc:
        result.excluded.append(Excluded(location.problem(str(exc)), exc.reason, models))


_JSON_BLANK = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between values


def _array_element_lines(path: Path) -> list[int] | None:
    """The line each element of a top-level JSON array starts on, or None when the file is not one.

    AlpacaEval writes annotations.json indented, one element over many lines; naming an element by
    its first line lets an editor jump to it, which `row 812` does not. One pass over the text: the
    newlines are counted from one element's start to the next's, never from the top of the file.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    decoder, lines = json.JSONDecoder(), []

    def skip(at: int) -> int:  # the index of the next character that is not JSON whitespace
        return _JSON_BLANK.match(text, at).end()

    index = skip(0)
    if not text.startswith("[", index):
        return None
    index = skip(index + 1)
    line, counted = 1, 0  # `line` is the line of text[counted]
    try:
        while index < len(text) and text[index] != "]":
            line, counted = line + text.count("\n", counted, index), index
            lines.append(line)
            _, index = decoder.raw_decode(text, index)
            index = skip(index)
            if text.startswith(",", index):
                index = skip(index + 1)
    except (ValueError, RecursionError):
        return None
    return lines


def _with_lines(path: Path, rows: list[tuple[Location, object]]) -> list[tuple[Location, object]]:
    """Rows of a JSON array located by line rather than by row number, when the lines can be found."""
    if not rows or rows[0][0].line is not None or not path.is_file():
        return rows
    lines = _array_element_lines(path)
    if lines is None or len(lines) != len(rows):
        return rows
    return [(Location(location.file, line=line), row) for (location, row), line in zip(rows, lines)]


def _reason_of(problem: Problem) -> str:
    return NOT_UTF8 if "UTF-8" in problem.message else NOT_JSON


def read_judgments(paths: list[Path]) -> Judgments:
    """Every judgment in `paths` (JSON Lines or JSON array files, or folders of them), in order.

    Never raises for bad content or a missing or unreadable file: every line it cannot use becomes an
    `Excluded` record with its file and line, and every file it cannot read a `file_problems` entry,
    so that all of them are reported in one run.
    """
    result = Judgments()
    for path in paths:
        raw = read_path(Path(path))
        found = len(result.excluded)
        for location, row in _with_lines(Path(path), raw.rows):
            _read_row(location, row, result)
        for problem in raw.problems:
            # A whole-file JSON document that does not parse is an unreadable file, not one bad line.
            if problem.line is None or str(problem.file).lower().endswith(".json"):
                result.file_problems.append(problem)
            else:
                result.excluded.append(Excluded(problem, _reason_of(problem)))
        # The reader reports unparsable lines apart from the rows; merged back, they read in line order.
        result.excluded[found:] = sorted(result.excluded[found:],
                                         key=lambda entry: (str(entry.problem.file), entry.problem.line or 0))
    return result
