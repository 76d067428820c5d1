"""Preference data: rows that say which of two answers to a prompt is better (DPO, ORPO), or whether one answer is
good or bad (KTO), read into `PreferenceExample`s and tokenized into the sequences those methods train on.

Row layouts (`format`, or `auto` to tell each row's from its columns):
  - `preference`: `prompt`, `chosen`, `rejected` as strings (template-free text, EOS appended, as TRL's "standard"
    layout) or as message lists (the prompt's turns, and the assistant turn(s) of each answer: TRL's
    "conversational" layout). `chosen` and `rejected` may also be whole conversations sharing their first turns,
    as UltraFeedback-binarized writes them; the shared turns are then the prompt (a `prompt` column is ignored).
  - `hh-rlhf`: Anthropic HH-RLHF's `chosen` and `rejected` texts of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..."
    turns, which differ in their last assistant turn.
  - `kto`: unpaired `prompt`, `completion` and `label` (true: a desirable answer, false: an undesirable one), with
    prompt and completion as strings or message lists like `preference`.

The loss is taken on the answer only. A conversation is rendered with the chat template exactly as supervised
fine-tuning renders it (data/templates.py: the reply and its end-of-turn token are trained, earlier assistant turns
of the prompt are not); text rows get the EOS token after the answer. A sequence longer than `data.max_seq_len`
loses the start of its prompt first (after the BOS), the same tokens for both answers of a pair, and only then the
end of its answer; `truncation: drop` skips it instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from ..core.errors import UserError
from .formats import ROLES, RowError, _check_conversation, _messages, _text, renamed_with_layout
from .readers import Location
from .templates import Segment, render_segments
from .tokenize import IGNORE_INDEX, TokenizeOptions, TokenizeStats, encode_batch, tokenizer_adds_bos

PREFERENCE_FORMATS = ("preference", "hh-rlhf", "kto")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")

# A prompt or an answer: chat messages (rendered with the template) or text (tokenized as given).
Part = Union[list[dict[str, str]], str]


@dataclass
class PreferenceExample:
    """A prompt with a preferred answer, a dispreferred one, or both, and where its row came from.

    A pair (DPO, ORPO) has both `chosen` and `rejected`; an unpaired row (KTO) has one of them. The prompt and the
    answers are all messages or all text.
    """

    location: Location
    prompt: Part
    chosen: Part | None = None
    rejected: Part | None = None

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None


def _answer(row: dict, key: str) -> Part:
    """An answer column: assistant message(s), or text."""
    value = row.get(key)
    if isinstance(value, list):
        messages = _messages(value, key, "role", "content", {r: r for r in ROLES})
        if not messages or any(m["role"] != "assistant" for m in messages):
            raise RowError(f"field `{key}` must hold assistant messages only (after a prompt of messages)")
        if not any(m["content"].strip() for m in messages):
            raise RowError(f"field `{key}`: the answer is empty")
        return messages
    return _text(row, key)


def _shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) of two whole conversations: the turns before each one's last
    assistant turn, which must be the same."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise RowError(f"field `{name}`: a whole conversation must end with the assistant's answer")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        raise RowError("`chosen` and `rejected` are whole conversations whose turns before the last answer differ; "
                       "they must share their prompt")
    _check_conversation(chosen)
    _check_conversation(rejected)
    return prompt, chosen[-1:], rejected[-1:]


def preference_row(row: dict, location: Location) -> PreferenceExample:
    """`prompt` / `chosen` / `rejected`, as strings, message lists, or two whole conversations."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise RowError(f"missing field `{'chosen' if chosen is None else 'rejected'}`")
    whole = isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and chosen[0].get("role") in ("user", "system")
    if whole:
        if not isinstance(rejected, list):
            raise RowError("field `rejected` must be a list of messages like `chosen`")
        chosen_messages = _messages(chosen, "chosen", "role", "content", {r: r for r in ROLES})
        rejected_messages = _messages(rejected, "rejected", "role", "content", {r: r for r in ROLES})
        prompt, chosen_answer, rejected_answer = _shared_prompt(chosen_messages, rejected_messages)
        return PreferenceExample(location, prompt, chosen_answer, rejected_answer)
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt", "role", "content", {r: r for r in ROLES})
        chosen_part, rejected_part = _answer(row, "chosen"), _answer(row, "rejected")
        if isinstance(chosen_part, str):
            chosen_part = [{"role": "assistant", "content": chosen_part}]
        if isinstance(rejected_part, str):
            rejected_part = [{"role": "assistant", "content": rejected_part}]
        _check_conversation(messages + chosen_part)
        _check_conversation(messages + rejected_part)
        return PreferenceExample(location, messages, chosen_part, rejected_part)
    prompt_text = _text(row, "prompt")
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str):
            raise RowError(f"field `{key}` must be a string when `prompt` is one, got {type(row[key]).__name__}")
    return PreferenceExample(location, prompt_text, _text(row, "chosen"), _text(row, "rejected"))


def _hh_turns(text: str, key: str) -> list[dict[str, str]]:
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise RowError(f"field `{key}`: text before the first `\\n\\nHuman:`")
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if not messages:
        raise RowError(f"field `{key}` has no `\\n\\nHuman:` / `\\n\\nAssistant:` turns")
    return messages


def hh_rlhf_row(row: dict, location: Location) -> PreferenceExample:
    """Anthropic HH-RLHF: `chosen` and `rejected` dialogues that differ in their last assistant turn."""
    chosen = _hh_turns(_text(row, "chosen"), "chosen")
    rejected = _hh_turns(_text(row, "rejected"), "rejected")
    prompt, chosen_answer, rejected_answer = _shared_prompt(chosen, rejected)
    for name, answer in (("chosen", chosen_answer), ("rejected", rejected_answer)):
        if not answer[0]["content"]:
            raise RowError(f"field `{name}`: the last assistant turn is empty")
    return PreferenceExample(location, prompt, chosen_answer, rejected_answer)


def kto_row(row: dict, location: Location) -> PreferenceExample:
    """Unpaired: `prompt`, `completion` and a true/false `label` (desirable or not)."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise RowError("field `label` must be true (a desirable completion) or false (an undesirable one)"
                       + ("" if label is None else f", got {label!r}"))
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt", "role", "content", {r: r for r in ROLES})
        answer = _answer(row, "completion")
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        _check_conversation(messages + answer)
        prompt_part: Part = messages
    else:
        prompt_part = _text(row, "prompt")
        if not isinstance(row.get("completion"), str):
            raise RowError("field `completion` must be a string when `prompt` is one"
                           if "completion" in row else "missing field `completion`")
        answer = _text(row, "completion")
    return PreferenceExample(location, prompt_part, answer if label else None, None if label else answer)


READERS = {"preference": preference_row, "hh-rlhf": hh_rlhf_row, "kto": kto_row}


def detect_preference_format(row: dict) -> str | None:
    """The preference layout a row's columns say it is in, or None."""
    if "chosen" in row or "rejected" in row:
        if "prompt" not in row and isinstance(row.get("chosen"), str) and "\n\nHuman:" in row["chosen"]:
            return "hh-rlhf"
        return "preference"
    if "label" in row or ("prompt" in row and "completion" in row):
        return "kto"
    return None


def to_preference_example(row: object, location: Location, data_format: str, columns: dict[str, str],
                          accepted: tuple[str, ...]) -> PreferenceExample:
    """Convert one raw row of a preference method, which takes the layouts `accepted`.

    Raises:
        RowError: the row is not an object, its layout cannot be told or is not one the method takes, or it breaks
            its layout's rules.
    """
    row, row_format = renamed_with_layout(
        row, columns, data_format, detect_preference_format, "preference layout",
        "`prompt`+`chosen`+`rejected`, `chosen`+`rejected` (HH-RLHF or whole conversations) or "
        "`prompt`+`completion`+`label` (KTO)")
    if row_format not in accepted:
        if row_format in PREFERENCE_FORMATS:
            raise RowError(f"a `{row_format}` row is unpaired (prompt, completion, label), which only "
                           "training.method: kto trains on; this method needs `chosen` and `rejected`")
        raise RowError(f"format `{row_format}` is a supervised fine-tuning layout; this method takes "
                       + ", ".join(f"`{name}`" for name in accepted))
    try:
        return READERS[row_format](row, location)
    except RowError as error:
        raise RowError(f"{row_format} row: {error}") from None


# ---------------------------------------------------------------------------------------------
# Tokenization

def answer_segments(tokenizer, template: str, prompt: Part, answer: Part) -> list[Segment]:
    """The segments of prompt + answer, only the answer trained (with the EOS or end-of-turn token after it).

    Raises:
        ValueError: the chat template cannot render the conversation (see templates.render_segments).
    """
    if isinstance(prompt, str):
        return [Segment(prompt, False), Segment(answer, True), Segment(tokenizer.eos_token, True)]
    segments = render_segments(tokenizer, template, prompt + answer)
    # render_segments trains every assistant turn; those of the prompt are context here.
    earlier_replies = sum(message["role"] == "assistant" for message in prompt)
    result = []
    for segment in segments:
        if segment.trained and earlier_replies:
            earlier_replies -= 1
            segment = Segment(segment.text, False)
        result.append(segment)
    return result


def prompt_length(labels: list[int]) -> int:
    """Positions before the first trained one."""
    return next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def fit_to_length(sequences: list[tuple[list[int], list[int]]], options: TokenizeOptions, has_bos: bool):
    """Sequences that share a prompt, cut to `options.max_seq_len`: the start of the prompt goes first (after the
    BOS), the same number of its tokens in each sequence, then the end of a still too long answer. None when the
    policy drops them (`truncation: drop`).

    Returns:
        (sequences, whether any was cut), or None.
    """
    limit = options.max_seq_len
    excess = max(len(ids) - limit for ids, _ in sequences)
    if excess <= 0:
        return sequences, False
    if options.truncation == "drop":
        return None
    head = 1 if has_bos else 0
    removable = min(prompt_length(labels) for _, labels in sequences) - head
    cut = max(0, min(excess, removable))
    result = []
    for ids, labels in sequences:
        ids, labels = ids[:head] + ids[head + cut:], labels[:head] + labels[head + cut:]
        result.append((ids[:limit], labels[:limit]))
    return result, True


def tokenize_preferences(tokenizer, template: str, examples: list[PreferenceExample], options: TokenizeOptions,
                         unpaired: bool) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenized rows of preference examples.

    Args:
        unpaired: KTO's rows, one per answer: `input_ids`, `labels` and `desirable` ([1] or [0]); a pair gives two.
            Otherwise one row per pair: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`.

    Raises:
        UserError: the chat template cannot render some examples; names their rows.
    """
    has_bos = tokenizer_adds_bos(tokenizer)
    bos_id = tokenizer.bos_token_id if has_bos else None
    stats = TokenizeStats()
    problems, groups, batch = [], [], []
    for example in examples:
        answers = [(name, part) for name, part in (("chosen", example.chosen), ("rejected", example.rejected)) if part is not None]
        try:
            rendered = [answer_segments(tokenizer, template, example.prompt, part) for _, part in answers]
        except Exception as error:  # a Jinja template is user input: any failure is theirs to fix
            problems.append(example.location.problem(f"the chat template cannot render this row: {error}"))
            continue
        groups.append((example, [name for name, _ in answers], len(batch)))
        batch += rendered
    if problems:
        raise UserError(problems[:20], title=f"{len(problems)} row(s) cannot be rendered with the chat template:")
    encoded = encode_batch(tokenizer, batch, bos_id=bos_id)
    rows: list[dict[str, list[int]]] = []
    for example, names, start in groups:
        sequences = encoded[start: start + len(names)]
        # A pair shares its prompt's cut; KTO's answers are rows of their own.
        units = [list(zip(names, sequences))] if not unpaired else [[pair] for pair in zip(names, sequences)]
        for unit in units:
            fitted = fit_to_length([sequence for _, sequence in unit], options, has_bos)
            if fitted is None:
                stats.dropped_too_long += 1
                stats.dropped_rows.append(str(example.location))
                continue
            cut_sequences, was_cut = fitted
            if any(all(label == IGNORE_INDEX for label in labels) for _, labels in cut_sequences):
                stats.dropped_no_trained_tokens += 1
                stats.dropped_rows.append(str(example.location))
                continue
            stats.truncated += was_cut
            row: dict[str, list[int]] = {}
            for (name, _), (ids, labels) in zip(unit, cut_sequences):
                stats.tokens += len(ids)
                stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
                stats.longest = max(stats.longest, len(ids))
                if unpaired:
                    row = {"input_ids": ids, "labels": labels, "desirable": [int(name == "chosen")]}
                else:
                    row[f"{name}_input_ids"], row[f"{name}_labels"] = ids, labels
            rows.append(row)
            stats.examples += 1
    return rows, stats
