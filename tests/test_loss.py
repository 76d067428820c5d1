"""The training loss on trained positions only equals the model's own causal-LM loss, and so do the
gradients it sends back, for padded and packed batches, with and without autocast."""

from __future__ import annotations

import pytest
import torch

from qlora_cli.data.tokenize import IGNORE_INDEX, PackBatch, PadToLongest
from qlora_cli.loss import head_only_loss, linear_cross_entropy, output_head, trained_targets


@pytest.fixture
def model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that every adapter changes the loss
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def lora_gradients(model) -> dict[str, torch.Tensor]:
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def test_targets_are_the_next_trained_labels():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 9, 2]])
    mask, targets = trained_targets(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert targets.tolist() == [7, 8, 5, 6, 9, 2]


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_loss_and_gradients_equal_the_models_own(model, tokenized_rows, tiny_tokenizer, batching):
    batch = PadToLongest(tiny_tokenizer.eos_token_id)(tokenized_rows) if batching == "padded" else PackBatch()(tokenized_rows)
    reference = model(**batch).loss
    reference.backward()
    expected = lora_gradients(model)

    head = output_head(model)
    assert head is not None
    loss, outputs = head_only_loss(model, head, batch)
    loss.backward()
    got = lora_gradients(model)

    assert abs(loss.item() - reference.item()) < 1e-5
    # The model projected nothing: its "logits" are the hidden states of the trained positions.
    assert outputs.logits.shape == (int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), model.config.hidden_size)
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)  # and the projection is back
    assert set(got) == set(expected) and len(got) > 0
    for name, gradient in expected.items():
        assert torch.allclose(got[name], gradient, atol=1e-6, rtol=1e-4), name


def test_num_items_in_batch_divides_the_sum(model, tokenized_rows, tiny_tokenizer):
    batch = PadToLongest(tiny_tokenizer.eos_token_id)(tokenized_rows)
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        mean = head_only_loss(model, output_head(model), batch)[0]
        over_more = head_only_loss(model, output_head(model), batch, num_items_in_batch=torch.tensor(3 * trained))[0]
    assert abs(over_more.item() * 3 - mean.item()) < 1e-5


def test_chunks_do_not_change_the_result(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    reference.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    monkeypatch.setattr("qlora_cli.loss.CHUNK_ELEMENTS", 50 * 5)  # 5 rows per chunk, the last one short
    loss = linear_cross_entropy(hidden, weight, targets)
    (2 * loss).backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    assert torch.allclose(hidden.grad, 2 * expected[0], atol=1e-6)
    assert torch.allclose(weight.grad, 2 * expected[1], atol=1e-6)


def test_under_autocast_it_matches_the_models_autocast_loss(model, tokenized_rows, tiny_tokenizer):
    batch = PadToLongest(tiny_tokenizer.eos_token_id)(tokenized_rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(**batch).loss
        loss = head_only_loss(model, output_head(model), batch)[0]
    assert loss.dtype == torch.float32
    # Both project in bfloat16 and take the log-softmax in float32.
    assert abs(loss.item() - reference.item()) < 1e-3


def test_soft_capped_logits_keep_the_models_own_loss(model):
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert output_head(model) is None


def test_the_cached_head_cast_follows_the_weight():
    from qlora_cli.loss import cast_weight

    first = torch.randn(64, 8)
    assert torch.equal(cast_weight(first, torch.bfloat16), first.to(torch.bfloat16))
    assert cast_weight(first, torch.bfloat16) is cast_weight(first, torch.bfloat16)  # cast once
    with torch.no_grad():
        first.mul_(2)  # changed in place, e.g. by loading a checkpoint
    assert torch.equal(cast_weight(first, torch.bfloat16), first.to(torch.bfloat16))
    del first
    for _ in range(3):  # new weights, possibly at the freed address
        other = torch.randn(64, 8)
        assert torch.equal(cast_weight(other, torch.bfloat16), other.to(torch.bfloat16))
        del other
