"""The judge's prompt, as the QLoRA paper asked GPT-4: a question (or a conversation of several user turns)
and two assistants' answers, then the output format: a verdict (pairwise) or two 1-10 scores (relative).

Each pair is shown in both orders by the caller (judges.judge_pairs); the parsers of the replies are in
verdicts.py.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

from .questions import Question

Mode = Literal["pairwise", "relative"]
Answer = str | Sequence[str]  # one string, or one string per turn of a multi-turn question

_INTRO = (
    "[Instruction]\nAct as an impartial judge of two AI assistants. Below is a user's question (or a "
    "conversation of several user turns) and the answers of Assistant A and Assistant B. Judge how helpful, "
    "relevant, accurate, deep and detailed each answer is, and whether it does what the user asked; for a "
    "conversation, judge every turn. Do not let the order in which the answers appear, their length or the "
    "assistants' names sway you: judge the content only.\n\n{dialogue}\n[Your Task]\n"
)
# The output format comes last, after the answers, where judges follow it most reliably.
PAIRWISE = _INTRO + (
    "Compare the two answers and explain your reasoning briefly and objectively. Then give your verdict on "
    "the last line in exactly this form: [[A]] if Assistant A is better, [[B]] if Assistant B is better, "
    "or [[C]] if they are equally good. Write no other text in double brackets."
)
RELATIVE = _INTRO + (
    "Give each answer an overall score from 1 to 10, where a higher score means a better answer. Your "
    "FIRST line must hold only the two scores, in exactly this form:\nScore A: <score> Score B: <score>\n"
    "Then, from the second line on, explain your scores."
)
TEMPLATES = {"pairwise": PAIRWISE, "relative": RELATIVE}


def as_turns(answer: Answer) -> tuple[str, ...]:
    return (answer,) if isinstance(answer, str) else tuple(answer)


def render_dialogue(question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """The question and both answers as the judge sees them. Answers with one string per turn are shown as
    two conversations; single strings are shown after all the turns.

    Raises:
        ValueError: the answers are not both one string or both one string per turn.
    """
    parts = []
    answers = {"A": as_turns(answer_a), "B": as_turns(answer_b)}
    if not (len(answers["A"]) == len(answers["B"]) and len(answers["A"]) in (1, len(question.turns))):
        raise ValueError(f"question {question.question_id}: the answers must both be one string or both one per turn")
    if len(answers["A"]) == 1:
        for number, turn in enumerate(question.turns, start=1):
            label = "User Question" if len(question.turns) == 1 else f"User Question, turn {number}"
            parts.append(f"[{label}]\n{turn}\n")
        for name, (text,) in answers.items():
            parts.append(f"[The Start of Assistant {name}'s Answer]\n{text}\n[The End of Assistant {name}'s Answer]\n")
        return "\n".join(parts)
    for name, replies in answers.items():
        lines = [f"[The Start of Assistant {name}'s Conversation with User]"]
        for turn, reply in zip(question.turns, replies):
            lines += ["", "### User:", turn, "", f"### Assistant {name}:", reply]
        parts.append("\n".join(lines + [f"[The End of Assistant {name}'s Conversation with User]\n"]))
    return "\n".join(parts)


def build_prompt(mode: Mode, question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """The full judge prompt: PAIRWISE or RELATIVE with the question and both answers filled in."""
    return TEMPLATES[mode].format(dialogue=render_dialogue(question, answer_a, answer_b))


def prompt_kind(mode: Mode) -> str:
    """`mode` plus a digest of its template, so that editing a prompt never reuses replies to the old one."""
    return f"{mode}:{hashlib.sha256(TEMPLATES[mode].encode()).hexdigest()[:12]}"
