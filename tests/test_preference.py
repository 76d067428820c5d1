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


# ---------------------------------------------------------------------------------------------
# The recipe's `preference` keys

def recipe_file(tmp_path, tiny_model_dir, method, extra=""):
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe_text(tiny_model_dir, ["pairs.jsonl"], method=method) + extra, encoding="utf-8")
    return path


@pytest.mark.parametrize("method, extra, message", [
    ("sft", "preference:\n  beta: 0.2\n", "training.method sft reads no `preference` keys"),
    ("orpo", "preference:\n  loss: ipo\n", "does not apply to training.method orpo (only to dpo)"),
    ("dpo", "preference:\n  desirable_weight: 2\n", "does not apply to training.method dpo (only to kto)"),
    ("dpo", "preference:\n  loss: hinge\n  label_smoothing: 0.1\n", "applies to loss sigmoid or robust, not hinge"),
    ("dpo", "preference:\n  beta: 0\n", "greater than 0"),
    ("dpo", "model:\n  adapter: no-such-run\n", "adapter not found"),
])
def test_preference_keys_that_do_not_apply_are_refused_with_their_line(tmp_path, tiny_model_dir, method, extra, message):
    path = recipe_file(tmp_path, tiny_model_dir, method, extra)
    if extra.startswith("model:"):  # a second `model:` would be a duplicate key: put the adapter in the first
        text = path.read_text().replace(extra, "")
        path.write_text(text.replace("model:\n", "model:\n  adapter: no-such-run\n", 1))
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    text = caught.value.render()
    assert message in text and "r.yaml:" in text, text


def test_each_preference_method_accepts_its_own_keys(tmp_path, tiny_model_dir):
    for method, extra in [("dpo", "preference:\n  beta: 0.2\n  loss: robust\n  label_smoothing: 0.1\n"),
                          ("orpo", "preference:\n  beta: 0.5\n"),
                          ("kto", "preference:\n  desirable_weight: 1.5\n  undesirable_weight: 0.5\n")]:
        assert load_recipe(recipe_file(tmp_path, tiny_model_dir, method, extra)).training.method == method


# ---------------------------------------------------------------------------------------------
# Losses and log-probabilities on the tiny model

def test_conservative_dpo_mixes_the_loss_of_both_labellings():
    from qlora_cli.train.methods.dpo import dpo_losses

    chosen, rejected = torch.tensor([0.3, -1.0]), torch.tensor([-0.2, 0.5])
    plain = dpo_losses(chosen, rejected, 0.5, "sigmoid")
    flipped = dpo_losses(rejected, chosen, 0.5, "sigmoid")
    smoothed = dpo_losses(chosen, rejected, 0.5, "sigmoid", label_smoothing=0.1)
    assert torch.allclose(smoothed, 0.9 * plain + 0.1 * flipped)
    assert torch.allclose(plain, -torch.nn.functional.logsigmoid(0.5 * (chosen - rejected)))


def test_odds_ratio_matches_its_definition():
    from qlora_cli.train.methods.orpo import odds_ratio_terms

    chosen, rejected = torch.tensor([-0.3, -2.0, -1e-4]), torch.tensor([-1.5, -0.1, -9.0])
    ratio, log_odds = odds_ratio_terms(chosen, rejected)
    odds = lambda logp: logp.exp() / (1 - logp.exp())  # noqa: E731
    assert torch.allclose(log_odds, (odds(chosen) / odds(rejected)).log(), rtol=1e-4)
    assert torch.allclose(ratio, torch.sigmoid(log_odds).log(), atol=1e-6)


def test_kto_pairs_each_prompt_with_the_previous_answer():
    from qlora_cli.train.methods.kto import mismatched_sequences

    rows = [{"input_ids": [1, 5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7]},
            {"input_ids": [1, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 9]}]
    assert mismatched_sequences(rows, 10) == [([1, 5, 9], [IGNORE_INDEX, IGNORE_INDEX, 9]),
                                              ([1, 8, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7])]
    assert mismatched_sequences(rows, 3)[1] == ([1, 8, 6], [IGNORE_INDEX, IGNORE_INDEX, 6])


class Recorder:
    loss_is_scaled_for_ga = None

    def __init__(self):
        self.metrics = {}
        self.accelerator = type("One", (), {"num_processes": 1})()

    def record_metrics(self, metrics):
        self.metrics.update({name: float(value) for name, value in metrics.items()})


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM")).train()


def batch_of(method_name, tokenizer, tmp_path):
    method = load_method(method_name)
    examples = read(tmp_path, PAIRS, method=method_name)
    rows, _ = method.tokenize(tokenizer, tokenizer.chat_template, examples, TokenizeOptions(max_seq_len=512))
    return method, method.collator(tokenizer, DataSection(train=[{"path": tmp_path}]))(rows)


def test_chunked_sequence_logps_equal_the_models_own_logits(lora_model, tiny_tokenizer, tmp_path):
    from qlora_cli.train.loss import output_head
    from qlora_cli.train.methods.preference import sequence_logps

    _, batch = batch_of("dpo", tiny_tokenizer, tmp_path)
    chunked, counts = sequence_logps(lora_model, output_head(lora_model), batch)
    plain, same_counts = sequence_logps(lora_model, None, batch)
    assert torch.equal(counts, same_counts) and counts.min() > 0
    assert torch.allclose(chunked, plain, atol=1e-4)


@pytest.mark.parametrize("name, start", [("dpo", math.log(2)), ("kto", 0.5)])
def test_a_new_adapter_starts_at_the_reference(lora_model, tiny_tokenizer, tmp_path, name, start):
    """LoRA B starts at zero: the trained model is the reference, so DPO starts at ln 2 and KTO at 1 - σ(0)."""
    method, batch = batch_of(name, tiny_tokenizer, tmp_path)
    method.prepare(lora_model)
    recorder = Recorder()
    loss, _ = method.compute_loss(recorder, lora_model, batch, None)
    assert loss.item() == pytest.approx(start, abs=1e-6)
    assert recorder.metrics["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    loss.backward()
    grads = [p.grad for n, p in lora_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_orpo_is_the_chosen_nll_minus_the_weighted_odds_term(lora_model, tiny_tokenizer, tmp_path):
    from qlora_cli.train.methods.orpo import odds_ratio_terms
    from qlora_cli.train.methods.preference import sequence_logps

    method, batch = batch_of("orpo", tiny_tokenizer, tmp_path)
    method.prepare(lora_model)
    recorder = Recorder()
    loss, _ = method.compute_loss(recorder, lora_model, batch, None)
    with torch.no_grad():
        sums, counts = sequence_logps(lora_model, None, batch)
    chosen_sums, rejected_sums = sums.chunk(2)
    chosen_counts, rejected_counts = counts.chunk(2)
    nll = -chosen_sums.sum() / chosen_counts.sum()
    ratio, _ = odds_ratio_terms(chosen_sums / chosen_counts, rejected_sums / rejected_counts)
    assert loss.item() == pytest.approx((nll - 0.1 * ratio.mean()).item(), abs=1e-4)
    assert recorder.metrics["nll_loss"] == pytest.approx(nll.item(), abs=1e-4)


def test_data_preview_shows_both_answers_with_the_trained_tokens_marked(tmp_path, tiny_model_dir, capsys):
    from qlora_cli.cli import main

    path = recipe_file(tmp_path, tiny_model_dir, "dpo")
    main(["data", "preview", str(path), "--count", "1"])
    out = capsys.readouterr().out
    assert "example 1 (chosen)" in out and "example 1 (rejected)" in out
    assert "⟦The capital of France is Paris.</s>⟧" in out and "⟦Arr! Tokyo, matey.</s>⟧" in out


@pytest.mark.parametrize("method, extra", [("sft", ""), ("kto", "preference:\n  desirable_weight: 2\n")])
def test_a_runs_own_recipe_with_every_key_written_reads_back(tmp_path, tiny_model_dir, method, extra):
    from qlora_cli.core.recipe import to_yaml

    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir, method, extra))
    (tmp_path / "again.yaml").write_text(to_yaml(recipe))
    assert load_recipe(tmp_path / "again.yaml").preference == recipe.preference


PAD = 0  # the tiny tokenizer has no padding token; what pads is never attended nor scored


def dpo_rows(tokenizer, tmp_path, rows=PAIRS):
    examples = read(tmp_path, rows)
    tokenized, _ = load_method("dpo").tokenize(tokenizer, tokenizer.chat_template, examples, TokenizeOptions(max_seq_len=512))
    return tokenized


def contexts(batch):
    """Decoded from a batch: for every sequence (chosen ones first), each scored token with the tokens the model
    reads to predict it, at the positions it reads them, as the attention mask and position ids allow."""
    from qlora_cli.train.methods.preference import scored_positions, shared_prompt_attention

    ids = batch["input_ids"]
    if "segments" in batch:
        allowed = shared_prompt_attention(batch["segments"])
        positions = batch["position_ids"]
        predictors = batch["pair_predictors"].tolist()
    else:
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal & batch["attention_mask"].bool()[:, None, :]
        positions = batch["attention_mask"].cumsum(1) - 1
        kept = scored_positions(batch)[0]
        predictors = kept.flatten().nonzero().squeeze(1).tolist()
    _, _, targets, counts = scored_positions(batch)
    seen = []
    for flat, target in zip(predictors, targets.tolist()):
        row, index = divmod(flat, ids.shape[1])
        keys = allowed[row, index].nonzero().squeeze(1)
        seen.append((target, [(int(positions[row, k]), int(ids[row, k])) for k in keys]))
    pieces, start = [], 0
    for count in counts.tolist():
        pieces.append(seen[start: start + count])
        start += count
    return pieces


@pytest.mark.parametrize("rows", [PAIRS, [HH, TEXT_PAIR]], ids=["chat", "text"])
def test_a_shared_prompt_row_scores_every_answer_token_from_the_context_it_has_alone(tiny_tokenizer, tmp_path, rows):
    from qlora_cli.train.methods.preference import PairBatch

    tokenized = dpo_rows(tiny_tokenizer, tmp_path, rows)
    padded = PairBatch(PAD)(tokenized)
    shared = PairBatch(PAD, share_prompts=True)(tokenized)
    assert contexts(shared) == contexts(padded)
    assert all(len(sequence) > 0 for sequence in contexts(shared))
    # the prompt is held once per pair: fewer positions than two padded answers
    assert int(shared["attention_mask"].sum()) < int(padded["attention_mask"].sum())
    assert shared["input_ids"].shape[0] == len(tokenized)


def test_answers_that_share_no_prompt_token_are_scored_alone():
    from qlora_cli.train.methods.preference import PairBatch, shared_prompt_length

    chosen = {"chosen_input_ids": [5, 6, 7], "chosen_labels": [IGNORE_INDEX, 6, 7],
              "rejected_input_ids": [8, 9], "rejected_labels": [IGNORE_INDEX, 9]}
    assert shared_prompt_length(([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [IGNORE_INDEX, 9])) == 0
    # the same first token, trained in one of them: it is not a prompt to share
    assert shared_prompt_length(([5, 6], [IGNORE_INDEX, 6]), ([5, 6, 9], [IGNORE_INDEX, IGNORE_INDEX, 9])) == 1
    shared, padded = PairBatch(0, share_prompts=True)([chosen]), PairBatch(0)([chosen])
    assert contexts(shared) == contexts(padded) == [[(6, [(0, 5)]), (7, [(0, 5), (1, 6)])], [(9, [(0, 8)])]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("with_head", [True, False], ids=["chunked", "logits"])
def test_shared_prompt_rows_give_each_answers_log_probability_and_gradient(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                         attention, with_head):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_cli.train.methods.preference import PairBatch

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM", init_lora_weights=False)).train()
    tokenized = dpo_rows(tiny_tokenizer, tmp_path)
    method = load_method("dpo")
    method.prepare(model)
    assert method.share_prompts
    if not with_head:
        method.head = None
    results = {}
    for share in (True, False):
        model.zero_grad()
        batch = PairBatch(PAD, share_prompts=share)(tokenized)
        loss, outputs = method.compute_loss(Recorder(), model, batch, None)
        loss.backward()
        results[share] = (loss.detach(), outputs["chosen_logps"].detach(), outputs["rejected_logps"].detach(),
                          [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad])
    (loss, chosen, rejected, grads), (loss_alone, chosen_alone, rejected_alone, grads_alone) = results[True], results[False]
    assert abs(float(loss) - math.log(2)) > 1e-3  # a random adapter: the comparison is not of two ln 2s
    assert torch.allclose(chosen, chosen_alone, atol=1e-4) and torch.allclose(rejected, rejected_alone, atol=1e-4)
    assert torch.allclose(loss, loss_alone, atol=1e-6)
    assert all(torch.allclose(g, h, atol=1e-6, rtol=1e-4) for g, h in zip(grads, grads_alone))
    assert any(g.abs().sum() > 0 for g in grads)


def test_prompts_are_shared_only_where_the_recipe_and_the_attention_allow(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora_cli.core.recipe import PreferenceSection

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    method = load_method("dpo")
    method.prepare(model)
    assert method.share_prompts
    model.config._attn_implementation = "flash_attention_2"
    method.prepare(model)
    assert not method.share_prompts
    model.config._attn_implementation = "sdpa"
    method.settings = PreferenceSection(share_prompt=False)
    method.prepare(model)
    assert not method.share_prompts


@pytest.mark.parametrize("method_name", ["dpo", "kto"])
def test_row_lengths_of_a_record_batch_are_each_rows_length(tiny_tokenizer, tmp_path, method_name):
    import pyarrow as pa

    method = load_method(method_name)
    examples = read(tmp_path, PAIRS, method=method_name)
    rows, _ = method.tokenize(tiny_tokenizer, tiny_tokenizer.chat_template, examples, TokenizeOptions(max_seq_len=512))
    lengths = list(method.row_lengths(pa.RecordBatch.from_pylist(rows)))
    assert lengths == [method.row_length(row) for row in rows] and len(set(lengths)) > 1
