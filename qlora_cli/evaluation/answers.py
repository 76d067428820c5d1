"""Answers of each model under test: generated once with its chat template, saved as JSONL, reused.

Saved rows are `{"question_id", "model", "answer", "turns", "sampling", "seconds"}` (`answer` is the
last turn's reply, `turns` every turn's); each batch is appended as soon as it is answered, so an
interrupted run keeps what it made. Answers made elsewhere can be read too, in this form, FastChat's
(`{"question_id", "model_id", "choices": [{"turns": [...]}]}`) or Arena-Hard-Auto's (`{"uid", "model",
"messages": [..., {"role": "assistant", "content": {"answer": ...}}]}`), and ours can be written in the
last two layouts (`write_answer_layout`) for those tools' own judges.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from ..data.readers import RawRows, jsonl_rows, read_path
from ..core.errors import Problem, UserError
from ..core.files import write_atomic
from ..core.jsonl_log import JsonlLog
from ..inference.sampling import Sampling
from .questions import Question, turn_texts


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


ANSWER_FORMATS = ("fastchat", "arena-hard")


def _arena_hard_turns(messages: object) -> list | None:
    """The assistant replies of an Arena-Hard answer's `messages`; its gen_answer.py stores each reply
    as `{"answer": text}` (with `thought` for reasoning models), older files as plain text."""
    if not isinstance(messages, list):
        return None
    replies = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    return [r.get("answer") if isinstance(r, dict) else r for r in replies]


def _fastchat_turns(turns: object) -> object:
    """FastChat turns are strings; Arena-Hard v0.1 wrote them as `{"content": text}`."""
    return turn_texts(turns) if isinstance(turns, list) else turns


def read_answers(path: Path) -> tuple[str | None, dict[str, list[str]]]:
    """(model name, {question_id: turns}) from an answers file in this project's form, FastChat's or
    Arena-Hard-Auto's (whose model is named by the file, as its load_model_answers does).

    Raises:
        UserError: every malformed row, with its file and line.
    """
    return _answer_rows(path, read_path(path))


def _answer_rows(path: Path, raw: RawRows) -> tuple[str | None, dict[str, list[str]]]:
    """`read_answers` of rows already read from `path`."""
    problems = list(raw.problems)
    answers: dict[str, list[str]] = {}
    model = None
    for location, row in raw.rows:
        key = "question_id" if isinstance(row, dict) and "question_id" in row else "uid"
        if not isinstance(row, dict) or key not in row:
            problems.append(location.problem("expected an object with `question_id` (or Arena-Hard's `uid`)"))
            continue
        if "messages" in row:
            turns, name = _arena_hard_turns(row["messages"]), Path(path).stem
        elif isinstance(row.get("choices"), list) and row["choices"] and isinstance(row["choices"][0], dict):
            turns, name = _fastchat_turns(row["choices"][0].get("turns")), row.get("model_id")
        else:
            turns, name = row.get("turns") or ([row["answer"]] if "answer" in row else None), row.get("model")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            problems.append(location.problem("expected `answer` (a string), `turns` (a list of strings) or "
                                             "`messages` with the assistant's replies"))
            continue
        model = model or (str(name) if name is not None else None)
        answers[str(row[key])] = turns
    if problems:
        raise UserError(problems[:20], title=f"{path}: {len(problems)} bad answer row(s):")
    return model, answers


def generate_answers(loaded, questions: list[Question], sampling: Sampling, batch_size: int = 8
                     ) -> Iterator[dict[str, list[str]]]:
    """The answers of each batch of questions, yielded as soon as the batch is done: every turn of a
    question is asked after its earlier turns and the model's replies to them."""
    from ..inference.generate import generate

    for start in range(0, len(questions), batch_size):
        batch = questions[start: start + batch_size]
        histories: dict[str, list[dict]] = {q.question_id: [] for q in batch}
        answers: dict[str, list[str]] = {q.question_id: [] for q in batch}
        for turn in range(max(len(q.turns) for q in batch)):
            asking = [q for q in batch if turn < len(q.turns)]
            conversations = [histories[q.question_id] + [{"role": "user", "content": q.turns[turn]}] for q in asking]
            replies = generate(loaded, conversations, temperature=sampling.temperature, top_p=sampling.top_p,
                               max_new_tokens=sampling.max_new_tokens, seed=sampling.seed + turn * 7919 + start)
            for question, conversation, reply in zip(asking, conversations, replies):
                histories[question.question_id] = conversation + [{"role": "assistant", "content": reply}]
                answers[question.question_id].append(reply)
        yield answers


def ensure_answers(path: Path, model: str, questions: list[Question], sampling: Sampling, load, say=print,
                   progress: Callable[[str, int], object] | None = None) -> tuple[dict[str, list[str]], float]:
    """The model's answers to every question: those already in `path` are reused, the rest generated
    (loading the model through `load()` only if needed) and appended batch by batch, so that an
    interrupted run keeps every finished batch. A last line cut short by a kill is left out and cut
    off (see `JsonlLog`), so the next run answers that question again.

    Args:
        progress: `progress(description, total)` gives a context manager with `advance(n)`, told of
            each answered batch.

    Returns:
        (answers, seconds spent generating).

    Raises:
        UserError: a line of `path` other than a last one cut short is not an answer.
    """
    log = JsonlLog(path)
    existing = _answer_rows(path, jsonl_rows(log.read(), str(path)))[1]
    missing = [q for q in questions if q.question_id not in existing]
    if not missing:
        say(f"Answers of {model}: all {len(questions)} reused from {path}")
        return existing, 0.0
    say(f"Answers of {model}: generating {len(missing)} ({len(questions) - len(missing)} reused)")
    started = time.perf_counter()
    loaded = load()
    made: dict[str, list[str]] = {}
    bar = progress(f"Answers of {model}", len(missing)) if progress else None
    with bar or nullcontext():
        batch_started = time.perf_counter()
        for batch in generate_answers(loaded, missing, sampling):
            seconds = (time.perf_counter() - batch_started) / len(batch)
            log.append("".join(json.dumps({"question_id": qid, "model": model, "answer": turns[-1], "turns": turns,
                                           "sampling": asdict(sampling), "seconds": round(seconds, 3)}) + "\n"
                               for qid, turns in batch.items()).encode())
            made.update(batch)
            if bar is not None:
                bar.advance(len(batch))
            batch_started = time.perf_counter()
    return {**existing, **made}, time.perf_counter() - started


def answer_id(model: str, question_id: str, turns: list[str]) -> str:
    """A stable id for one answer (the tools use random ones; a digest makes rewritten files identical)."""
    return hashlib.sha256(json.dumps([model, question_id, turns]).encode()).hexdigest()[:22]


def fastchat_answer(question: Question, model: str, turns: list[str], tstamp: float) -> dict:
    """One answer as FastChat's gen_model_answer.py writes it to model_answer/<model>.jsonl."""
    return {"question_id": question.source_id, "answer_id": answer_id(model, question.question_id, turns),
            "model_id": model, "choices": [{"index": 0, "turns": list(turns)}], "tstamp": tstamp}


def arena_hard_answer(question: Question, model: str, turns: list[str], tstamp: float) -> dict:
    """One answer as Arena-Hard-Auto v2's gen_answer.py writes it (its judge reads the last message's
    `content.answer`). The `metadata` it adds for style control (tiktoken lengths, markdown counts) is
    left out rather than counted with another tokenizer."""
    messages = []
    for asked, reply in zip(question.turns, turns):
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": {"answer": reply}}]
    return {"uid": str(question.source_id), "ans_id": answer_id(model, question.question_id, turns), "model": model,
            "messages": messages, "tstamp": tstamp}


_LAYOUTS = {"fastchat": ("fastchat", fastchat_answer), "arena-hard": ("arena-hard", arena_hard_answer)}


def write_answer_layout(folder: Path, layout: str, model: str, questions: list[Question],
                        answers: dict[str, list[str]]) -> Path:
    """`folder/<layout>/model_answer/<model>.jsonl`: the answers in FastChat's or Arena-Hard-Auto's layout,
    in question order, written whole (to a temporary file first, so a reader never sees half of it).

    Both tools name a model by its answer file, so the file is named after the model.

    Raises:
        ValueError: `layout` is not one of ANSWER_FORMATS.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"`layout` must be one of {', '.join(ANSWER_FORMATS)}, got {layout!r}")
    subfolder, make = _LAYOUTS[layout]
    target = folder / subfolder / "model_answer" / f"{slug(model)}.jsonl"
    tstamp = time.time()
    rows = [make(q, model, answers[q.question_id], tstamp) for q in questions if q.question_id in answers]
    write_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return target


def answers_for_judging(answers: dict[str, list[str]]) -> dict[str, str | list[str]]:
    """One string for a one-turn answer, the list of turns otherwise (the judges' form)."""
    return {qid: turns[0] if len(turns) == 1 else turns for qid, turns in answers.items()}


def missing_answers(model: str, answers: dict, questions: list[Question]) -> None:
    gaps = [q.question_id for q in questions if q.question_id not in answers]
    if gaps:
        raise UserError(Problem(f"{model} has no answer to {len(gaps)} question(s), e.g. {', '.join(gaps[:5])}"))
