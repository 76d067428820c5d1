"""Judging answers with an LLM, as the QLoRA paper did with GPT-4: each pair of answers to a question is
judged in BOTH presentation orders, either as a verdict (A, B or tie) or as two 1-10 scores.

This module says what a judge is (`Judge`: an HTTP endpoint, http_judge.py, or a local model, local_judge.py)
and asks it about every pair (`judge_pairs`), through the cache of replies (judge_cache.py), with the prompts
of judge_prompts.py and the reply parsers of verdicts.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from ..core.errors import UserError
from .judge_cache import JudgmentCache, cache_key
from .judge_prompts import TEMPLATES, Answer, Mode, build_prompt, prompt_kind
from .judgments import Comparison, ScorePair
from .questions import Question
from .verdicts import judgment_of


@dataclass(frozen=True)
class JudgeReply:
    """A judge's reply; token counts are None when the judge does not report them, seconds is wall time."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float


class JudgeError(Exception):
    """A judge call that failed for good; the message names the URL, the status and the attempts, never a key."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.url, self.status, self.attempts = url, status, attempts


class Judge(Protocol):
    """A judge: `complete(prompt)` gives its reply or raises JudgeError; one that can ask several prompts at once
    also has `complete_many` (HttpJudge), which `judge_pairs` then uses."""

    name: str

    def complete(self, prompt: str) -> JudgeReply: ...


def _games(questions: list[Question], answers: dict[str, dict[str, Answer]],
           pairs: list[tuple[str, str]]) -> list[tuple[Question, str, str]]:
    """(question, model shown first, model shown second) for every question and pair, in both orders.

    Raises:
        UserError: a model of a pair has no answer to some question. ValueError: a pair names one model twice.
    """
    if any(first == second for first, second in pairs):
        raise ValueError("a pair compares a model with itself")
    problems = []
    for model in dict.fromkeys(model for pair in pairs for model in pair):
        missing = [q.question_id for q in questions if q.question_id not in answers.get(model, {})]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            problems.append(f"model `{model}` has no answer to question(s) {', '.join(missing[:10])}{more}")
    if problems:
        raise UserError(problems, title="cannot judge: answers are missing:")
    return [(q, one, two) for q in questions for first, second in pairs
            for one, two in ((first, second), (second, first))]


def _complete_all(judge: Judge, prompts: list[str], on_reply: Callable[[int, JudgeReply | JudgeError], None]) -> None:
    """Every prompt through `judge.complete_many` when the judge has one (concurrent), else one by one."""
    if hasattr(judge, "complete_many"):
        judge.complete_many(prompts, on_reply=on_reply)
        return
    for index, prompt in enumerate(prompts):
        try:
            reply = judge.complete(prompt)
        except JudgeError as error:
            reply = error
        on_reply(index, reply)


def judge_pairs(judge: Judge, questions: list[Question], answers: dict[str, dict[str, Answer]],
                pairs: list[tuple[str, str]], *, mode: Mode, cache: JudgmentCache | None = None,
                progress: Callable[[int], object] | None = None,
                ) -> tuple[list[Comparison] | list[ScorePair], int, list[dict]]:
    """Judges every pair on every question in both orders (A/B, then B/A), asking only what `cache` lacks.

    Args:
        answers: {model: {question_id: answer}}; an answer is one string, or one string per turn.
        mode: "pairwise" gives `Comparison`s, "relative" gives `ScorePair`s.
        progress: `progress(calls to make)` gives a context manager with `advance(n)`, told of each reply.

    Returns:
        (judgments, parse_failures, calls): one judgment per reply the parser read, in game order; how
        many replies it could not read (never scored); and one dict per game, {question_id, model_a,
        model_b, judge, seconds, prompt_tokens, completion_tokens, cached, parsed}, `cached` True when this
        run made no call for it (its seconds and tokens are then those of the call that did), `parsed`
        False when the reply held no judgment, and then `reply`, the reply's text.

    Raises:
        UserError: answers are missing. JudgeError: some calls failed; the others are cached first, so
            running again asks only for the failed ones.
    """
    if mode not in TEMPLATES:
        raise ValueError(f"`mode` must be one of {', '.join(TEMPLATES)}, got {mode!r}")
    games, kind = _games(questions, answers, pairs), prompt_kind(mode)
    shown = [(q, answers[a][q.question_id], answers[b][q.question_id]) for q, a, b in games]
    keys = [cache_key(judge.name, kind, *game) for game in shown]
    todo: dict[str, tuple[str, str]] = {}  # key -> (question id, prompt); asked once even if two games share it
    for key, game in zip(keys, shown):
        if key not in todo and (cache is None or cache.get(key) is None):
            todo[key] = (game[0].question_id, build_prompt(mode, *game))
    todo_keys, fresh, errors = list(todo), {}, []
    bar = progress(len(todo)) if progress is not None and todo else None

    def on_reply(index: int, reply: JudgeReply | JudgeError) -> None:
        if bar is not None:
            bar.advance(1)
        if isinstance(reply, JudgeError):
            errors.append(reply)
            return
        key = todo_keys[index]
        fresh[key] = {"judge": judge.name, "kind": kind, "question_id": todo[key][0], **asdict(reply)}
        if cache is not None:
            cache.put(key, fresh[key])

    with bar if bar is not None else nullcontext():
        _complete_all(judge, [prompt for _, prompt in todo.values()], on_reply)
    if errors:
        raise JudgeError(f"{len(errors)} of {len(todo)} judge calls failed ({len(fresh)} succeeded"
                         f"{' and are cached' if cache is not None else ''}); first: {errors[0]}",
                         url=errors[0].url, status=errors[0].status, attempts=errors[0].attempts)
    judgments, calls, made = [], [], set(fresh)
    for key, (question, a, b) in zip(keys, games):
        record = fresh.get(key) or cache.get(key)
        calls.append({"question_id": question.question_id, "model_a": a, "model_b": b, "judge": judge.name,
                      "seconds": record.get("seconds"), "prompt_tokens": record.get("prompt_tokens"),
                      "completion_tokens": record.get("completion_tokens"), "cached": key not in made})
        made.discard(key)  # a second game with the same key made no call of its own
        judgment = judgment_of(mode, record["text"], question, a, b, judge.name)
        calls[-1]["parsed"] = judgment is not None
        if judgment is None:
            calls[-1]["reply"] = record["text"]  # so that a run that scores nothing can show why
        judgments += [judgment] if judgment is not None else []
    return judgments, len(games) - len(judgments), calls
