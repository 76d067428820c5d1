"""Preference tuning: the row layouts and their errors, tokenization (the answer trained, the prompt cut first),
the recipe's `preference` keys, and DPO, ORPO and KTO on the tiny model (losses, metrics, gradients, whole runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import tiny_recipe_text, write_jsonl
from qlora_cli.core.errors import UserError
from qlora_cli.core.recipe import DataSection, load_recipe
from qlora_cli.data.preference import PreferenceExample, fit_to_length, prompt_length, tokenize_preferences
from qlora_cli.data.readers import Location
from qlora_cli.data.sources import load_datasets
from qlora_cli.data.tokenize import IGNORE_INDEX, TokenizeOptions
from qlora_cli.train.methods import load_method

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "The capital of France is Paris."}],
     "rejected": [{"role": "assistant", "content": "Arr! Tokyo, matey."}]},
    {"prompt": [{"role": "user", "content": "Add two and three."}],
     "chosen": [{"role": "assistant", "content": "Two plus three makes five."}],
     "rejected": [{"role": "assistant", "content": "Waves fold into foam."}]},
    {"prompt": [{"role": "user", "content": "Write a haiku about the sea."}],
     "chosen": [{"role": "assistant", "content": "Waves fold into foam, the gull cries over the grey."}],
     "rejected": [{"role": "assistant", "content": "Five."}]},
    {"prompt": [{"role": "user", "content": "What is the capital of Japan?"}],
     "chosen": [{"role": "assistant", "content": "Tokyo."}],
     "rejected": [{"role": "assistant", "content": "The capital of France is Paris."}]},
]
WHOLE_CONVERSATION = {  # UltraFeedback-binarized's shape: a prompt string, and two whole conversations
    "prompt": "Add two and three.", "prompt_id": "x",
    "chosen": [{"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Five."}],
    "rejected": [{"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Six."}],
    "messages": [{"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Five."}],
}
HH = {"chosen": "\n\nHuman: Add two and three.\n\nAssistant: Five.",
      "rejected": "\n\nHuman: Add two and three.\n\nAssistant: Six."}
TEXT_PAIR = {"prompt": "Add two and three. ", "chosen": "Five.", "rejected": "Six."}
KTO_ROWS = [{"prompt": "Add two and three. ", "completion": "Five.", "label": True},
            {"prompt": [{"role": "user", "content": "Add two and three."}], "completion": "Six.", "label": False}]


def read(tmp_path, rows, method="dpo", **source):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = DataSection(train=[{"path": path, **source}])
    return load_datasets(data, 0, load_method(method).read_row).train


def test_every_layout_is_detected_and_read(tmp_path):
    pair, whole, hh, text = read(tmp_path, [PAIRS[0], WHOLE_CONVERSATION, HH, TEXT_PAIR])
    assert pair.prompt == PAIRS[0]["prompt"] and pair.chosen == PAIRS[0]["chosen"] and pair.is_pair
    assert whole.prompt == [{"role": "user", "content": "Add two and three."}]
    assert whole.chosen == [{"role": "assistant", "content": "Five."}] and whole.rejected[0]["content"] == "Six."
    assert hh.prompt == whole.prompt and hh.chosen == whole.chosen and hh.rejected == whole.rejected
    assert (text.prompt, text.chosen, text.rejected) == ("Add two and three. ", "Five.", "Six.")
    desirable, undesirable = read(tmp_path, KTO_ROWS, method="kto")
    assert desirable.chosen == "Five." and desirable.rejected is None
    assert undesirable.rejected == [{"role": "assistant", "content": "Six."}] and undesirable.chosen is None


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "missing field `rejected`"),
    ({"prompt": "a", "chosen": "b", "rejected": ""}, "field `rejected` is empty"),
    ({"prompt": "a", "chosen": "b", "rejected": ["c"]}, "must be a string when `prompt` is one"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}, "must share their prompt"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"}, "must end with"),
    ({"prompt": "a", "completion": "b", "label": True}, "only training.method: kto"),
    ({"instruction": "a", "output": "b"}, "cannot tell the preference layout"),
])
def test_bad_rows_are_reported_with_file_line_and_what_is_wrong(tmp_path, row, message):
    with pytest.raises(UserError) as caught:
        read(tmp_path, [PAIRS[0], row])
    text = caught.value.render() if hasattr(caught.value, "render") else str(caught.value)
    assert "rows.jsonl:2" in text and message in text, text


def test_kto_labels_must_be_booleans(tmp_path):
    with pytest.raises(UserError) as caught:
        read(tmp_path, [{"prompt": "a", "completion": "b", "label": "yes"}], method="kto")
    assert "rows.jsonl:1" in str(caught.value.render() if hasattr(caught.value, "render") else caught.value)


def test_sft_refuses_a_preference_format_by_name(tmp_path):
    with pytest.raises(UserError) as caught:
        read(tmp_path, [PAIRS[0]], method="sft", format="preference")
    assert "training.method dpo, orpo or kto" in str(caught.value.render() if hasattr(caught.value, "render") else caught.value)


def decoded(tokenizer, ids, labels):
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_only_the_answer_is_trained_with_its_end_of_turn(tiny_tokenizer):
    multi_turn = PreferenceExample(Location("f", 1), [
        {"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Five."},
        {"role": "user", "content": "And of Japan?"}], [{"role": "assistant", "content": "Tokyo."}],
        [{"role": "assistant", "content": "Paris."}])
    text = PreferenceExample(Location("f", 2), "Add two and three. ", "Five.", "Six.")
    rows, stats = tokenize_preferences(tiny_tokenizer, tiny_tokenizer.chat_template, [multi_turn, text],
                                       TokenizeOptions(max_seq_len=512), unpaired=False)
    assert decoded(tiny_tokenizer, rows[0]["chosen_input_ids"], rows[0]["chosen_labels"]).strip() == "Tokyo.</s>"
    assert decoded(tiny_tokenizer, rows[0]["rejected_input_ids"], rows[0]["rejected_labels"]).strip() == "Paris.</s>"
    assert decoded(tiny_tokenizer, rows[1]["chosen_input_ids"], rows[1]["chosen_labels"]) == "Five.</s>"
    assert rows[1]["chosen_input_ids"][0] == tiny_tokenizer.bos_token_id
    assert stats.examples == 2 and stats.truncated == 0
    assert stats.tokens == sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)


def test_truncation_cuts_the_prompt_first_and_the_same_for_both_answers():
    bos, prompt = 1, [1, 10, 11, 12, 13, 14]
    chosen = (prompt + [20, 21], [IGNORE_INDEX] * 6 + [20, 21])
    rejected = (prompt + [30, 31, 32], [IGNORE_INDEX] * 6 + [30, 31, 32])
    (cut_chosen, cut_rejected), was_cut = fit_to_length([chosen, rejected], TokenizeOptions(max_seq_len=7), has_bos=True)
    assert was_cut
    assert cut_rejected[0] == [bos, 12, 13, 14, 30, 31, 32] and cut_chosen[0] == [bos, 12, 13, 14, 20, 21]
    # the prompt keeps its end (and the BOS), equally in both; the answers are whole
    assert cut_chosen[0][:-2] == cut_rejected[0][:-3] and cut_chosen[0][-2:] == [20, 21]
    assert cut_rejected[0][-3:] == [30, 31, 32] and len(cut_rejected[0]) <= 7
    assert prompt_length(cut_rejected[1]) == len(cut_rejected[0]) - 3
    # an answer longer than the limit loses its end once the prompt is down to the BOS
    (only,), _ = fit_to_length([(prompt + list(range(40, 50)), [IGNORE_INDEX] * 6 + list(range(40, 50)))],
                               TokenizeOptions(max_seq_len=5), has_bos=True)
    assert only == ([bos, 40, 41, 42, 43], [IGNORE_INDEX, 40, 41, 42, 43])
    assert fit_to_length([chosen], TokenizeOptions(max_seq_len=7, truncation="drop"), has_bos=True) is None
