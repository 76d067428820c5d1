"""Reading a judge's reply: the verdict of a pairwise prompt ([[A]], [[B]] or [[C]]) or the two scores of a
relative one. A reply these cannot read is a parse failure, never scored.
"""

from __future__ import annotations

import re

from .judge_prompts import Mode
from .judgments import Comparison, ScorePair, Winner
from .questions import Question

SCORE_RANGE = (1.0, 10.0)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_VERDICTS: dict[str, Winner] = {"A": "model_a", "B": "model_b", "C": "tie"}
# Labelled scores rather than Vicuna's bare "8 7": a first line such as "1. Assistant A ..." can never be
# read as scores by mistake, and the labels say which score is whose.
_SCORES = re.compile(r"Score A:\s*(\d+(?:\.\d+)?)\s*[,;]?\s*Score B:\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_pairwise(text: str) -> Winner | None:
    """The verdict of a pairwise reply, or None when it holds no [[A]]/[[B]]/[[C]] or several different ones."""
    found = set(_VERDICT.findall(text))
    return _VERDICTS[found.pop()] if len(found) == 1 else None


def parse_relative(text: str) -> tuple[float, float] | None:
    """(score A, score B) from the first non-blank line, which must be exactly `Score A: x Score B: y`;
    None when it is not, or when a score is outside 1..10."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    match = _SCORES.fullmatch(first)
    if match is None:
        return None
    scores = float(match[1]), float(match[2])
    return scores if all(SCORE_RANGE[0] <= s <= SCORE_RANGE[1] for s in scores) else None


def judgment_of(mode: Mode, text: str, question: Question, a: str, b: str, judge: str) -> Comparison | ScorePair | None:
    """The judgment a reply to the `mode` prompt gives on `question`, with `a` shown first; None when unreadable."""
    common = {"category": question.category, "judge": judge}
    if mode == "pairwise":
        verdict = parse_pairwise(text)
        return None if verdict is None else Comparison(question.question_id, a, b, verdict, **common)
    scores = parse_relative(text)
    return None if scores is None else ScorePair(question.question_id, a, b, *scores, **common)
