"""Multiple-choice accuracy (MMLU-style), as the QLoRA paper tracked during training.

Data: a hub dataset laid out like `cais/mmlu` (with network access), the standard MMLU layout (`dev/{subject}_dev.csv` for few-shot examples, `test/{subject}_test.csv`
to score; no header; question, four choices, answer letter), or JSONL rows
`{"subject", "question", "choices": [4 strings], "answer": "A".."D" or 0..3}` with `"split": "dev"|"test"`
(test when absent). The prompt is the original MMLU evaluation's, written raw (no chat template):

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: {letter}            <- for each few-shot example; the question scored ends at "Answer:"

The prediction is the letter whose token the model finds most likely next: an argmax over the logits of
the four letter tokens.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import Problem, UserError

LETTERS = "ABCD"


@dataclass(frozen=True)
class Item:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS


def _item(subject: str, question, choices, answer) -> Item:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ValueError("needs exactly four string choices")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS and answer.strip():
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
        index = answer
    else:
        raise ValueError(f"answer must be A-D or 0-3, got {answer!r}")
    return Item(subject, question, tuple(choices), index)


def _subject_name(file: Path, split: str) -> str:
    return file.stem.removesuffix(f"_{split}")


def read_mmlu(path: Path) -> tuple[dict[str, list[Item]], dict[str, list[Item]]]:
    """(dev items by subject, test items by subject) from an MMLU folder or a JSONL file.

    Raises:
        UserError: missing folders or files, or malformed rows (every one, with its file and line).
    """
    dev: dict[str, list[Item]] = defaultdict(list)
    test: dict[str, list[Item]] = defaultdict(list)
    problems: list[Problem] = []
    if path.is_dir():
        for split, into in (("dev", dev), ("test", test)):
            files = sorted((path / split).glob(f"*_{split}.csv"))
            if split == "test" and not files:
                raise UserError(Problem("no test/*_test.csv files: not an MMLU folder", file=path))
            for file in files:
                with file.open(encoding="utf-8", newline="") as handle:
                    for line, row in enumerate(csv.reader(handle), start=1):
                        try:
                            if len(row) != 6:
                                raise ValueError(f"expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
                            into[_subject_name(file, split)].append(
                                _item(_subject_name(file, split), row[0], row[1:5], row[5]))
                        except ValueError as error:
                            problems.append(Problem(str(error), file=file, line=line))
    elif path.is_file():
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("a row must be an object")
                subject = str(row.get("subject") or "general")
                into = dev if row.get("split") == "dev" else test
                into[subject].append(_item(subject, row.get("question"), row.get("choices"), row.get("answer")))
            except ValueError as error:  # JSONDecodeError is a ValueError
                problems.append(Problem(str(error), file=path, line=line))
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        return read_mmlu_hub(str(path))
    else:
        raise UserError(Problem("MMLU data not found", file=path))
    if problems:
        raise UserError(problems[:20], title=f"{len(problems)} bad multiple-choice row(s):")
    if not test:
        raise UserError(Problem("no test questions", file=path))
    return dict(dev), dict(test)


def read_mmlu_hub(name: str, subset: str = "all") -> tuple[dict[str, list[Item]], dict[str, list[Item]]]:
    """The dev and test splits of a hub dataset laid out like `cais/mmlu` (question, subject, choices,
    answer index). Needs network access.

    Raises:
        UserError: the dataset cannot be loaded, or its rows are not in that layout.
    """
    try:
        from datasets import load_dataset

        splits = {split: load_dataset(name, subset, split=split) for split in ("dev", "test")}
    except Exception as error:  # offline, unknown dataset or split: the library's reason is the message
        raise UserError(f"--data {name}: cannot load the hub dataset ({error}); hub datasets need network access") from None
    result = []
    for split in ("dev", "test"):
        by_subject: dict[str, list[Item]] = defaultdict(list)
        for index, row in enumerate(splits[split], start=1):
            try:
                subject = str(row.get("subject") or subset)
                by_subject[subject].append(_item(subject, row.get("question"), row.get("choices"), row.get("answer")))
            except ValueError as error:
                raise UserError(Problem(str(error), file=f"hub:{name}/{subset}:{split}", key=f"row {index}")) from None
        result.append(dict(by_subject))
    return result[0], result[1]


def format_item(item: Item, with_answer: bool) -> str:
    lines = [item.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices)]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[item.answer]}\n\n" if with_answer else "")


def build_prompt(item: Item, shots: list[Item]) -> str:
    header = f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_item(shot, True) for shot in shots) + format_item(item, False)


def letter_token_ids(tokenizer) -> list[int]:
    """The token of each answer letter as it follows "Answer:" (" A"), falling back to the bare letter."""
    ids = []
    for letter in LETTERS:
        spaced = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        ids.append(spaced[-1] if len(spaced) == 1 else tokenizer(letter, add_special_tokens=False)["input_ids"][0])
    return ids


def predict(model, tokenizer, prompt: str, letters: list[int]) -> int:
    import torch

    from ..data.tokenize import encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0, -1]
    return int(torch.argmax(logits[letters]).item())


def evaluate(model, tokenizer, dev: dict[str, list[Item]], test: dict[str, list[Item]], *, shots: int = 5,
             limit: int | None = None) -> dict:
    """Accuracy per subject, their mean (as MMLU reports it) and over all questions.

    Few-shot examples are the subject's first `shots` dev items (fewer when the dev split has fewer).
    """
    letters = letter_token_ids(tokenizer)
    per_subject, correct_total, count_total = {}, 0, 0
    was_training = model.training
    model.eval()
    for subject, items in sorted(test.items()):
        examples = dev.get(subject, [])[:shots]
        items = items[:limit] if limit else items
        correct = sum(predict(model, tokenizer, build_prompt(item, examples), letters) == item.answer for item in items)
        per_subject[subject] = {"accuracy": correct / len(items), "questions": len(items), "shots": len(examples)}
        correct_total += correct
        count_total += len(items)
    model.train(was_training)
    return {
        "accuracy": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject),
        "accuracy_over_questions": correct_total / count_total,
        "questions": count_total,
        "subjects": per_subject,
    }
