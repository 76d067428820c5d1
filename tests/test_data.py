"""What the model trains on, decoded: labels, EOS, BOS, padding and bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA_ROWS, CHAT_ROWS, write_jsonl
from qlora_cli.data.formats import Example, detect_format, read_jsonl
from qlora_cli.data.templates import GUANACO_TEMPLATE, resolve_template
from qlora_cli.data.tokenize import IGNORE_INDEX, PadToLongest, tokenize_examples

CHATML_WITH_BOS = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|system|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def trained_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of trained label ids."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


def tokenize(tokenizer, rows, template=None, tmp_path=None, **options):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = read_jsonl(path, "auto")
    assert not result.problems, result.problems
    kwargs = {"max_seq_len": 512, "train_on_prompt": False, **options}
    return tokenize_examples(tokenizer, template or tokenizer.chat_template, result.examples, **kwargs)


def test_alpaca_trains_on_response_and_eos_only(tiny_tokenizer, tmp_path):
    rows, stats = tokenize(tiny_tokenizer, ALPACA_ROWS, tmp_path=tmp_path)
    assert stats.examples == len(ALPACA_ROWS)
    for row, source in zip(rows, ALPACA_ROWS):
        spans = trained_spans(row["labels"])
        assert len(spans) == 1
        assert tiny_tokenizer.decode(spans[0]) == source["output"] + "</s>"
        # Context tokens are present in the input but not trained on.
        decoded_input = tiny_tokenizer.decode(row["input_ids"])
        assert source["instruction"] in decoded_input
        if source["input"]:
            assert f"{source['instruction']}\n\n{source['input']}" in decoded_input


def test_every_assistant_turn_is_trained_in_multi_turn_chat(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, CHAT_ROWS, tmp_path=tmp_path)
    first = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    assert first == ["Paris.</s>", "Tokyo, matey.</s>"]
    second = [tiny_tokenizer.decode(span) for span in trained_spans(rows[1]["labels"])]
    assert second == ["Five.</s>"]


def test_exactly_one_bos(tiny_tokenizer, tmp_path):
    # This tokenizer adds BOS by default, so the sequence must start with exactly one.
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS, tmp_path=tmp_path)
    bos = tiny_tokenizer.bos_token_id
    for row in rows:
        assert row["input_ids"][0] == bos
        assert row["input_ids"].count(bos) == 1
        assert row["labels"][0] == IGNORE_INDEX
    # A template that writes the BOS token itself must not get a second one.
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS, template=CHATML_WITH_BOS, tmp_path=tmp_path)
    for row in rows:
        assert row["input_ids"].count(bos) == 1 and row["input_ids"][0] == bos


def test_end_of_turn_token_other_than_eos_is_trained(tiny_tokenizer, tmp_path):
    # The turn ends with <|system|> (standing in for <|im_end|> or <|eot_id|>); the newline after it is context.
    rows, _ = tokenize(tiny_tokenizer, CHAT_ROWS[:1], template=CHATML_WITH_BOS, tmp_path=tmp_path)
    spans = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    assert spans == ["Paris.<|system|>", "Tokyo, matey.<|system|>"]


def test_template_without_end_token_gets_eos_appended(tiny_tokenizer, tmp_path):
    no_end = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:1], template=no_end, tmp_path=tmp_path)
    spans = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    assert spans == ["The capital of France is Paris.</s>"]


def test_guanaco_template(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:1], template=GUANACO_TEMPLATE, tmp_path=tmp_path)
    text = tiny_tokenizer.decode(rows[0]["input_ids"])
    assert text == "<s>### Human: What is the capital of France?\n### Assistant: The capital of France is Paris.</s>\n"
    spans = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    assert spans == ["The capital of France is Paris.</s>"]


def test_train_on_prompt_trains_everything_but_bos(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:1], tmp_path=tmp_path, train_on_prompt=True)
    assert rows[0]["labels"][1:] == rows[0]["input_ids"][1:]


def test_truncation_counts_and_drops_examples_without_trained_tokens(tiny_tokenizer, tmp_path):
    long_prompt = {"instruction": "question " * 200, "input": "", "output": "answer"}
    rows, stats = tokenize(tiny_tokenizer, [long_prompt, ALPACA_ROWS[0]], tmp_path=tmp_path, max_seq_len=64)
    assert stats.dropped_no_trained_tokens == 1 and len(rows) == 1
    assert all(len(r["input_ids"]) <= 64 for r in rows)


def test_collator_masks_padding_by_position_when_pad_is_eos(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:2], tmp_path=tmp_path)
    eos = tiny_tokenizer.eos_token_id
    batch = PadToLongest(pad_token_id=eos)(rows)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        assert batch["attention_mask"][index].sum() == length
        assert batch["labels"][index, :length].tolist() == row["labels"]
        assert (batch["labels"][index, length:] == IGNORE_INDEX).all()
        # The EOS that closes the reply is still a label although it equals the pad id.
        assert eos in batch["labels"][index].tolist()
    assert batch["input_ids"].dtype == torch.long


def test_resolve_template_auto_falls_back_to_guanaco(tiny_tokenizer):
    class NoTemplate:
        chat_template = None

    assert resolve_template("auto", tiny_tokenizer) == tiny_tokenizer.chat_template
    assert resolve_template("auto", NoTemplate()) == GUANACO_TEMPLATE


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": []}, "chat"),
        ({"conversations": []}, "chat"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a"}, "alpaca"),
        ({"text": "a"}, None),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    lines = [
        json.dumps(ALPACA_ROWS[0]),
        "{not json",
        json.dumps({"instruction": "Say hi."}),
        json.dumps({"instruction": "Say hi.", "output": ""}),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"instruction": 3, "output": "x"}),
        json.dumps(["a list"]),
        "",
        json.dumps({"text": "raw"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_jsonl(path, "auto")
    assert len(result.examples) == 1
    found = {p.line: p.message for p in result.problems}
    assert all(p.file == path for p in result.problems)
    assert "not valid JSON" in found[2]
    assert "missing field `output`" in found[3]
    assert "field `output` is empty" in found[4]
    assert "unknown role 'wizard'" in found[5]
    assert "no assistant message" in found[6]
    assert "must be a string" in found[7]
    assert "must be a JSON object" in found[8]
    assert "cannot detect the format" in found[10]
    assert 9 not in found  # blank lines are skipped


def test_explicit_format_mismatch_is_a_row_error(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ALPACA_ROWS[0]])
    result = read_jsonl(path, "chat")
    assert [p.line for p in result.problems] == [1]
    assert "missing field `messages`" in result.problems[0].message


def test_roles_must_alternate(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    result = read_jsonl(write_jsonl(tmp_path / "rows.jsonl", [row]), "auto")
    assert "roles must alternate" in result.problems[0].message


def test_examples_keep_their_origin(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS[:2])
    result = read_jsonl(path, "alpaca")
    assert [(e.file, e.line) for e in result.examples] == [(path, 1), (path, 2)]
    assert isinstance(result.examples[0], Example)
    assert result.formats == {"alpaca": 2}
