"""Tokenization with labels, and the collator that pads batches.

Labels are the input ids where the loss is taken and IGNORE_INDEX elsewhere. Padding is masked by
position, never by comparing ids with the pad id: many chat models pad with their EOS token, and
masking by id would silently stop the model from learning to end its replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import Problem, UserError
from .formats import Example
from .templates import Segment, render_segments

IGNORE_INDEX = -100


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the model expects a BOS token first: its tokenizer puts one there by default."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_segments(tokenizer, segments: list[Segment], *, bos_id: int | None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a rendered conversation.

    Args:
        bos_id: the BOS id to start with, or None if the model uses none. A template that already
            writes the BOS token keeps its own: there is exactly one either way.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        input_ids += piece
        labels += piece if segment.trained else [IGNORE_INDEX] * len(piece)
    if bos_id is not None and (not input_ids or input_ids[0] != bos_id):
        input_ids.insert(0, bos_id)
        labels.insert(0, IGNORE_INDEX)
    return input_ids, labels


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    dropped_rows: list[str] = field(default_factory=list)


def tokenize_examples(
    tokenizer, template: str, examples: list[Example], *, max_seq_len: int, train_on_prompt: bool
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenize every example, truncating to `max_seq_len` tokens.

    Examples left with no trained token (their replies truncated away) are dropped and counted.

    Raises:
        UserError: the template cannot render an example; names the file and line.
    """
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    stats = TokenizeStats()
    rows: list[dict[str, list[int]]] = []
    problems: list[Problem] = []
    for example in examples:
        try:
            segments = render_segments(tokenizer, template, example.messages, train_on_prompt)
        except Exception as exc:  # a Jinja template is user input: any failure is theirs to fix
            problems.append(Problem(f"the chat template cannot render this row: {exc}", file=example.file, line=example.line))
            continue
        input_ids, labels = encode_segments(tokenizer, segments, bos_id=bos_id)
        if len(input_ids) > max_seq_len:
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
            stats.truncated += 1
        trained = sum(label != IGNORE_INDEX for label in labels)
        if trained == 0:
            stats.dropped_no_trained_tokens += 1
            stats.dropped_rows.append(f"{example.file}:{example.line}")
            continue
        rows.append({"input_ids": input_ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(input_ids)
        stats.trained_tokens += trained
        stats.longest = max(stats.longest, len(input_ids))
    if problems:
        raise UserError(problems[:20], title=f"{len(problems)} row(s) cannot be rendered:")
    if not rows:
        raise UserError("no example is left to train on: every reply was truncated away; raise data.max_seq_len")
    return rows, stats


@dataclass
class PadToLongest:
    """Collate examples into a right-padded batch; padding positions get IGNORE_INDEX labels."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
