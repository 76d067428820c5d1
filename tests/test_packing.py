"""Packing: a packed batch trains exactly what the same examples train unpacked, and no token attends
across an example boundary."""

from __future__ import annotations

import pytest
import torch

from conftest import ALPACA_ROWS, write_jsonl
from qlora_cli.data.prepare import expected_padding
from qlora_cli.data.sources import load_datasets
from qlora_cli.data.tokenize import IGNORE_INDEX, FedTokens, PackBatch, PadToLongest, TokenizeOptions, tokenize_cached
from qlora_cli.train.methods import load_method
from qlora_cli.core.recipe import DataSection


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)
    model.config.use_cache = False
    return model.eval()


def test_packed_loss_equals_token_weighted_unpacked_loss(model, tokenized_rows, tiny_tokenizer):
    padded = PadToLongest(tiny_tokenizer.eos_token_id)(tokenized_rows)
    packed = PackBatch()(tokenized_rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        unpacked_loss = model(**padded).loss.item()
        packed_loss = model(**packed).loss.item()
    assert abs(packed_loss - unpacked_loss) < 1e-5
    # The same number of tokens is trained either way (each example's first label is never used).
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_no_token_attends_across_examples(model, tokenized_rows):
    packed = PackBatch()(tokenized_rows)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        offset = 0
        for row in tokenized_rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            length = len(row["input_ids"])
            assert (logits[offset: offset + length] - alone).abs().max().item() < 1e-5
            offset += length


def test_with_a_kv_cache_the_boundaries_are_lost(tiny_model_dir, tokenized_rows):
    # Why training turns the cache off: with use_cache, transformers does not detect packed rows.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    packed = PackBatch()(tokenized_rows[:2])
    first = len(tokenized_rows[0]["input_ids"])
    with torch.no_grad():
        cached = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits[0]
        alone = model(input_ids=torch.tensor([tokenized_rows[1]["input_ids"]]), use_cache=True).logits[0]
    assert (cached[first:] - alone).abs().max().item() > 1e-3


def test_fed_tokens_count_real_tokens_and_positions(tokenized_rows, tiny_tokenizer):
    lengths = [len(r["input_ids"]) for r in tokenized_rows]
    padded = FedTokens()
    padded.count(PadToLongest(tiny_tokenizer.eos_token_id)(tokenized_rows))
    assert padded.tokens == sum(lengths) and padded.positions == len(tokenized_rows) * max(lengths)
    assert 0 < padded.padding_fraction < 1 and padded.last_shape == (len(tokenized_rows), max(lengths))
    packed = FedTokens()
    packed.count(PackBatch()(tokenized_rows))
    assert packed.tokens == packed.positions == sum(lengths) and packed.padding_fraction == 0


def test_expected_padding_by_batching(tokenized_rows, tmp_path, tiny_model_dir):
    from qlora_cli.core.recipe import Recipe

    lengths = [5, 50, 6, 48, 7, 52, 5, 49]
    base = {"model": {"base": "org/model"}, "data": {"train": [{"path": str(tmp_path)}]}, "training": {"batch_size": 2}}
    random_batches = Recipe.model_validate({**base, "data": {**base["data"], "group_by_length": False}})
    grouped = Recipe.model_validate(base)
    packed = Recipe.model_validate({**base, "data": {**base["data"], "packing": True}})
    assert expected_padding(packed, lengths) == 0.0
    assert expected_padding(grouped, lengths) < expected_padding(random_batches, lengths)


def test_tokenization_is_cached(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    examples = load_datasets(DataSection(train=[{"path": path}]), seed=0).train
    options = TokenizeOptions(max_seq_len=64)
    first, stats, hit = tokenize_cached(load_method("sft"), tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, tmp_path / "cache")
    assert not hit and len(list((tmp_path / "cache").iterdir())) == 1
    again, stats_again, hit = tokenize_cached(load_method("sft"), tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, tmp_path / "cache")
    assert hit and again == first and stats_again == stats
    # Any change to what is tokenized is a new entry.
    _, _, hit = tokenize_cached(load_method("sft"), tiny_tokenizer, tiny_tokenizer.chat_template, examples, TokenizeOptions(max_seq_len=32), tmp_path / "cache")
    assert not hit
