"""Answers of each model under test: generated once with its chat template, saved as JSONL, reused.

Saved rows are `{"question_id", "model", "answer", "turns", "sampling", "seconds"}` (`answer` is the
last turn's reply, `turns` every turn's). Answers made elsewhere can be read too, in this form or in
FastChat's (`{"question_id", "model_id", "choices": [{"turns": [...]}]}`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.readers import read_path
from ..errors import Problem, UserError
from .questions import Question


@dataclass(frozen=True)
class Sampling:
    """The paper's sampling for benchmark answers: nucleus 0.9, temperature 0.7, a fixed seed."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def read_answers(path: Path) -> tuple[str | None, dict[str, list[str]]]:
    """(model name, {question_id: turns}) from an answers file in this project's form or FastChat's.

    Raises:
        UserError: every malformed row, with its file and line.
    """
    raw = read_path(path)
    problems = list(raw.problems)
    answers: dict[str, list[str]] = {}
    model = None
    for location, row in raw.rows:
        if not isinstance(row, dict) or "question_id" not in row:
            problems.append(location.problem("expected an object with `question_id`"))
            continue
        if isinstance(row.get("choices"), list) and row["choices"] and isinstance(row["choices"][0], dict):
            turns, name = row["choices"][0].get("turns"), row.get("model_id")
        else:
            turns, name = row.get("turns") or ([row["answer"]] if "answer" in row else None), row.get("model")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            problems.append(location.problem("expected `answer` (a string) or `turns` (a list of strings)"))
            continue
        model = model or (str(name) if name is not None else None)
        answers[str(row["question_id"])] = turns
    if problems:
        raise UserError(problems[:20], title=f"{path}: {len(problems)} bad answer row(s):")
    return model, answers


def generate_answers(loaded, questions: list[Question], sampling: Sampling, batch_size: int = 8) -> dict[str, list[str]]:
    """Each question answered turn by turn (earlier turns and replies as history), in batches."""
    from ..generate import generate

    histories = {q.question_id: [] for q in questions}
    answers: dict[str, list[str]] = {q.question_id: [] for q in questions}
    for turn in range(max(len(q.turns) for q in questions)):
        asking = [q for q in questions if turn < len(q.turns)]
        for start in range(0, len(asking), batch_size):
            batch = asking[start: start + batch_size]
            conversations = [histories[q.question_id] + [{"role": "user", "content": q.turns[turn]}] for q in batch]
            replies = generate(loaded, conversations, temperature=sampling.temperature, top_p=sampling.top_p,
                               max_new_tokens=sampling.max_new_tokens, seed=sampling.seed + turn * 7919 + start)
            for question, conversation, reply in zip(batch, conversations, replies):
                histories[question.question_id] = conversation + [{"role": "assistant", "content": reply}]
                answers[question.question_id].append(reply)
    return answers


def ensure_answers(path: Path, model: str, questions: list[Question], sampling: Sampling, load, say=print,
                   ) -> tuple[dict[str, list[str]], float]:
    """The model's answers to every question: those already in `path` are reused, the rest generated
    (loading the model through `load()` only if needed) and appended. Returns (answers, seconds spent)."""
    existing: dict[str, list[str]] = read_answers(path)[1] if path.is_file() else {}
    missing = [q for q in questions if q.question_id not in existing]
    if not missing:
        say(f"Answers of {model}: all {len(questions)} reused from {path}")
        return existing, 0.0
    say(f"Answers of {model}: generating {len(missing)} ({len(questions) - len(missing)} reused)")
    started = time.perf_counter()
    generated = generate_answers(load(), missing, sampling)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for question in missing:
            turns = generated[question.question_id]
            handle.write(json.dumps({"question_id": question.question_id, "model": model, "answer": turns[-1],
                                     "turns": turns, "sampling": asdict(sampling),
                                     "seconds": round(seconds / len(missing), 3)}) + "\n")
    return {**existing, **generated}, seconds


def answers_for_judging(answers: dict[str, list[str]]) -> dict[str, str | list[str]]:
    """One string for a one-turn answer, the list of turns otherwise (the judges' form)."""
    return {qid: turns[0] if len(turns) == 1 else turns for qid, turns in answers.items()}


def missing_answers(model: str, answers: dict, questions: list[Question]) -> None:
    gaps = [q.question_id for q in questions if q.question_id not in answers]
    if gaps:
        raise UserError(Problem(f"{model} has no answer to {len(gaps)} question(s), e.g. {', '.join(gaps[:5])}"))
