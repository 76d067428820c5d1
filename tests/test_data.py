"""What the model trains on, decoded: labels, EOS, BOS, padding and bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA_ROWS, CHAT_ROWS, trained_spans, write_jsonl
from qlora_cli.data.formats import detect_format
from qlora_cli.data.sources import load_datasets
from qlora_cli.data.templates import GUANACO_TEMPLATE, resolve_template
from qlora_cli.data.tokenize import IGNORE_INDEX, PadToLongest, TokenizeOptions, tokenize_examples
from qlora_cli.core.errors import UserError
from qlora_cli.core.recipe import DataSection

CHATML_WITH_BOS = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|system|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def read(tmp_path, rows, name="rows.jsonl", **source):
    """Examples of rows written to a JSONL file, read through the recipe's data section."""
    path = write_jsonl(tmp_path / name, rows)
    data = DataSection(train=[{"path": path, **source}])
    return load_datasets(data, seed=0).train


def tokenize(tokenizer, rows, template=None, tmp_path=None, **options):
    examples = read(tmp_path, rows)
    kwargs = {"max_seq_len": 512, **options}
    return tokenize_examples(tokenizer, template or tokenizer.chat_template, examples, TokenizeOptions(**kwargs))


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
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:1], template=no_end, tmp_path=tmp_path)
    spans = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    # The space after "assistant:" is the reply's to generate (" The"), so it is trained with it.
    assert spans == [" The capital of France is Paris.</s>"]


def test_a_token_straddling_prompt_and_reply_is_trained(tiny_tokenizer, tmp_path):
    # The generation prompt ends in a space that merges with the reply's first word (" The").
    trailing_space = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:1], template=trailing_space, tmp_path=tmp_path)
    spans = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    assert spans == [" The capital of France is Paris.</s>"]


def test_guanaco_template(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, ALPACA_ROWS[:1], template=GUANACO_TEMPLATE, tmp_path=tmp_path)
    text = tiny_tokenizer.decode(rows[0]["input_ids"])
    assert text == "<s>### Human: What is the capital of France?\n### Assistant: The capital of France is Paris.</s>\n"
    spans = [tiny_tokenizer.decode(span) for span in trained_spans(rows[0]["labels"])]
    assert spans == [" The capital of France is Paris.</s>"]


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


def bad_rows(tmp_path, lines: list[str], **source) -> dict[int, str]:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_datasets(DataSection(train=[{"path": path, **source}]), seed=0)
    assert all(p.file == str(path) or p.file == path for p in caught.value.problems)
    return {p.line: p.message for p in caught.value.problems}


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
        json.dumps({"colour": "raw"}),
        json.dumps({"text": "### Human: hi"}),
        json.dumps({"segments": [{"text": "a", "label": False}]}),
        json.dumps({"prompt": "p"}),
    ]
    found = bad_rows(tmp_path, lines)
    assert "not valid JSON" in found[2]
    assert "missing field `output`" in found[3]
    assert "field `output` is empty" in found[4]
    assert "unknown role 'wizard'" in found[5]
    assert "no assistant message" in found[6]
    assert "must be a string" in found[7]
    assert "must be an object" in found[8]
    assert "cannot tell the format" in found[10]
    assert "oasst row" in found[11] and "no assistant message" in found[11]
    assert "nothing would be trained" in found[12]
    assert "missing field `completion`" in found[13]
    assert 1 not in found and 9 not in found  # a good row and a blank line


def test_explicit_format_mismatch_is_a_row_error(tmp_path):
    found = bad_rows(tmp_path, [json.dumps(ALPACA_ROWS[0])], format="chat")
    assert list(found) == [1] and "missing field `messages`" in found[1]


def test_roles_must_alternate(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    assert "roles must alternate" in bad_rows(tmp_path, [json.dumps(row)])[1]


def test_skip_bad_rows_keeps_the_good_ones(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n{oops\n" + json.dumps(ALPACA_ROWS[1]) + "\n")
    datasets = load_datasets(DataSection(train=[{"path": path}], on_bad_row="skip"), seed=0)
    assert [e.location.line for e in datasets.train] == [1, 3]
    assert [p.line for p in datasets.skipped] == [2]


def test_examples_keep_their_origin(tmp_path):
    examples = read(tmp_path, ALPACA_ROWS[:2], format="alpaca")
    assert [(str(e.location.file), e.location.line) for e in examples] == [(str(tmp_path / "rows.jsonl"), 1), (str(tmp_path / "rows.jsonl"), 2)]


# --- every format, decoded -----------------------------------------------------------------------

def decoded_spans(tokenizer, rows):
    return [[tokenizer.decode(span) for span in trained_spans(row["labels"])] for row in rows]


def test_oasst_multi_turn_trains_every_assistant_turn(tiny_tokenizer, tmp_path):
    row = {"text": "### Human: What is the capital of France?### Assistant: Paris.### Human: And of Japan?### Assistant: Tokyo, matey."}
    rows, _ = tokenize(tiny_tokenizer, [row], tmp_path=tmp_path)
    assert decoded_spans(tiny_tokenizer, rows) == [["Paris.</s>", "Tokyo, matey.</s>"]]
    rows, _ = tokenize(tiny_tokenizer, [row], template=GUANACO_TEMPLATE, tmp_path=tmp_path)
    assert decoded_spans(tiny_tokenizer, rows) == [[" Paris.</s>", " Tokyo, matey.</s>"]]
    # With the paper's own template the text comes back in the Guanaco form.
    rows, _ = tokenize(tiny_tokenizer, [row], template=GUANACO_TEMPLATE, tmp_path=tmp_path)
    assert tiny_tokenizer.decode(rows[0]["input_ids"]) == (
        "<s>### Human: What is the capital of France?\n### Assistant: Paris.</s>\n"
        "### Human: And of Japan?\n### Assistant: Tokyo, matey.</s>\n"
    )


def test_sharegpt_conversations(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, [CHAT_ROWS[1]], tmp_path=tmp_path)
    assert decoded_spans(tiny_tokenizer, rows) == [["Five.</s>"]]


def test_input_output_is_template_free(tiny_tokenizer, tmp_path):
    row = {"segments": [{"text": "Q: capital of France?\nA:", "label": False}, {"text": " Paris.</s>", "label": True}]}
    rows, _ = tokenize(tiny_tokenizer, [row], tmp_path=tmp_path)
    assert tiny_tokenizer.decode(rows[0]["input_ids"]) == "<s>Q: capital of France?\nA: Paris.</s>"
    assert decoded_spans(tiny_tokenizer, rows) == [[" Paris.</s>"]]


def test_prompt_completion_strings_and_messages(tiny_tokenizer, tmp_path):
    plain = {"prompt": "Add two and three. ", "completion": "Five."}
    conversational = {"prompt": [{"role": "user", "content": "Add two and three."}], "completion": "Five."}
    rows, _ = tokenize(tiny_tokenizer, [plain, conversational], tmp_path=tmp_path)
    assert tiny_tokenizer.decode(rows[0]["input_ids"]) == "<s>Add two and three. Five.</s>"
    assert decoded_spans(tiny_tokenizer, rows) == [["Five.</s>"], ["Five.</s>"]]
    assert "<|assistant|>" in tiny_tokenizer.decode(rows[1]["input_ids"])


def test_text_trains_on_everything_with_eos(tiny_tokenizer, tmp_path):
    rows, _ = tokenize(tiny_tokenizer, [{"text": "Waves fold into foam."}], tmp_path=tmp_path)
    assert decoded_spans(tiny_tokenizer, rows) == [["Waves fold into foam.</s>"]]
    assert rows[0]["input_ids"][0] == tiny_tokenizer.bos_token_id and rows[0]["labels"][0] == IGNORE_INDEX


def test_column_mapping(tiny_tokenizer, tmp_path):
    rows = [{"question": "What is the capital of France?", "answer": "Paris."}]
    examples = read(tmp_path, rows, columns={"instruction": "question", "output": "answer"})
    assert examples[0].messages[-1] == {"role": "assistant", "content": "Paris."}


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": []}, "chat"),
        ({"conversations": []}, "chat"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt-completion"),
        ({"segments": []}, "input-output"),
        ({"text": "### Human: a ### Assistant: b"}, "oasst"),
        ({"text": "plain"}, "text"),
        ({"colour": "a"}, None),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected


# --- length ---------------------------------------------------------------------------------------

def test_truncation_policies(tiny_tokenizer, tmp_path):
    long_row = {"instruction": "Add two and three.", "input": "", "output": "Two plus three makes five. " * 20}
    rows, stats = tokenize(tiny_tokenizer, [long_row], tmp_path=tmp_path, max_seq_len=40)
    assert len(rows[0]["input_ids"]) == 40 and stats.truncated == 1
    assert tiny_tokenizer.decode(rows[0]["input_ids"]).startswith("<s><|user|>\nAdd two")
    rows, _ = tokenize(tiny_tokenizer, [long_row], tmp_path=tmp_path, max_seq_len=40, truncation="left")
    assert len(rows[0]["input_ids"]) == 40 and rows[0]["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(rows[0]["input_ids"]).endswith("five. </s>\n")
    rows, stats = tokenize(tiny_tokenizer, [long_row, ALPACA_ROWS[0]], tmp_path=tmp_path, max_seq_len=40, truncation="drop")
    assert len(rows) == 1 and stats.dropped_too_long == 1


# --- sources: mixing and evaluation split ---------------------------------------------------------

def test_mixture_respects_weights_and_samples(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": f"c{i}"} for i in range(10)])
    data = DataSection(train=[{"path": a, "weight": 2.5}, {"path": b, "weight": 0.3}, {"path": c, "samples": 4}])
    datasets = load_datasets(data, seed=0)
    counts = {}
    for example in datasets.train:
        counts[example.segments[0].text[0]] = counts.get(example.segments[0].text[0], 0) + 1
    assert counts == {"a": 25, "b": 3, "c": 4}
    assert datasets.rows_per_source == {str(a): 25, str(b): 3, str(c): 4}
    # Every row of `a` is used twice, and half of them a third time.
    texts = [e.segments[0].text for e in datasets.train if e.segments[0].text[0] == "a"]
    assert sorted(set(texts)) == [f"a{i}" for i in range(10)]
    # Same seed, same mixture.
    again = load_datasets(data, seed=0)
    assert [e.segments[0].text for e in again.train] == [e.segments[0].text for e in datasets.train]


def test_eval_split_is_held_out_before_mixing(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    datasets = load_datasets(DataSection(train=[{"path": a, "weight": 3}], eval_size=0.25), seed=1)
    held = {e.segments[0].text for e in datasets.eval}
    trained = {e.segments[0].text for e in datasets.train}
    assert len(held) == 5 and len(datasets.train) == 45
    assert not held & trained
    counted = load_datasets(DataSection(train=[{"path": a}], eval_size=3), seed=1)
    assert len(counted.eval) == 3 and len(counted.train) == 17


def test_eval_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", CHAT_ROWS)
    datasets = load_datasets(DataSection(train=[{"path": a}], eval=[{"path": b}]), seed=0)
    assert len(datasets.train) == len(ALPACA_ROWS) and len(datasets.eval) == len(CHAT_ROWS)


def test_bad_rows_are_reported_in_file_order_with_the_way_to_skip_them(tmp_path):
    lines = [json.dumps(row) for row in ALPACA_ROWS] + [
        json.dumps({"instruction": "no answer"}),  # line 5: a row without its output
        "{not json",  # line 6: not even JSON
        json.dumps({"instruction": "again", "input": ""}),  # line 7
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        load_datasets(DataSection(train=[{"path": tmp_path / "rows.jsonl"}]), seed=0)
    rendered = error.value.render()
    assert "data.on_bad_row: skip" in rendered
    positions = [rendered.index(f"rows.jsonl:{line}:") for line in (5, 6, 7)]
    assert positions == sorted(positions)


def test_every_row_the_template_cannot_render_is_named_among_rows_it_renders(tiny_tokenizer, tmp_path):
    # Conversations are rendered in one batch; when the batch fails, each bad row must still be named.
    picky = "{% for m in messages %}{% if 'Japan' in m['content'] %}{{ raise_exception('no Japan') }}{% endif %}" \
            "{{ m['role'] + ': ' + m['content'] + '</s>\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    rows = [dict(row) for row in ALPACA_ROWS]
    with pytest.raises(UserError) as caught:
        tokenize(tiny_tokenizer, rows, template=picky, tmp_path=tmp_path)
    problems = caught.value.problems
    assert len(problems) == 1 and problems[0].line == 3 and "no Japan" in problems[0].message
    good = [row for row in rows if "Japan" not in row["input"]]
    tokenized, stats = tokenize(tiny_tokenizer, good, template=picky, tmp_path=tmp_path)
    assert stats.examples == 3
    assert [tiny_tokenizer.decode(trained_spans(row["labels"])[0]).strip() for row in tokenized] == \
        [row["output"] + "</s>" for row in good]


def test_a_reply_is_cut_after_the_first_special_token_after_its_content():
    import random

    from qlora_cli.data.templates import split_reply

    def by_the_rule(reply_text, content, special_tokens, eos_token):
        # The earliest special token after the content ends the trained part; of two at one place, the one that sorts first.
        stripped = content.strip()
        start = reply_text.find(stripped) if stripped else -1
        content_end = start + len(stripped) if start >= 0 else len(reply_text.rstrip())
        ends = [(reply_text.find(token, content_end), token) for token in special_tokens]
        ends = [(index, token) for index, token in ends if index >= 0]
        if ends:
            index, token = min(ends)
            return reply_text[:index + len(token)], reply_text[index + len(token):]
        return reply_text[:content_end] + eos_token, reply_text[content_end:]

    rng = random.Random(0)
    letters = "ab<>|e"
    for _ in range(5000):
        tokens = list({"".join(rng.choice(letters) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 5))})
        text = "".join(rng.choice(letters + " x") for _ in range(rng.randint(0, 20)))
        content = text[rng.randint(0, len(text)):][:rng.randint(0, 5)]
        assert split_reply(text, content, tokens, "E") == by_the_rule(text, content, tokens, "E"), (text, content, tokens)
    assert split_reply(" Hi<|im_end|>\n", "Hi", ["<|im_end|>", "<|im_start|>"], "</s>") == (" Hi<|im_end|>", "\n")
