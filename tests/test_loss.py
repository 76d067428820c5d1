"""The training loss on trained positions only equals the model's own causal-LM loss, and so do the
gradients it sends back, for padded and packed batches, with and without autocast."""

from __future__ import annotations

import pytest
import torch

from qlora_cli.data.tokenize import IGNORE_INDEX, PackBatch, PadToLongest
from qlora_cli.train.loss import head_only_loss, linear_cross_entropy, output_head, trained_targets


def with_lora(base):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that every adapter changes the loss
            torch.nn.init.normal_(parameter, std=0.02)
    return model


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.config.use_cache = False
    return with_lora(base)


def lora_gradients(model) -> dict[str, torch.Tensor]:
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def test_targets_are_the_next_trained_labels():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 9, 2]])
    mask, targets = trained_targets(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert targets.tolist() == [7, 8, 5, 6, 9, 2]


def make_batch(rows, tokenizer, batching: str) -> dict:
    return PadToLongest(tokenizer.eos_token_id)(rows) if batching == "padded" else PackBatch()(rows)


def assert_same_loss_and_gradients(model, batch: dict):
    """The loss on trained positions equals the model's own, and so does every LoRA gradient; returns its outputs."""
    reference = model(**batch).loss
    reference.backward()
    expected = lora_gradients(model)
    head = output_head(model)
    assert head is not None
    loss, outputs = head_only_loss(model, head, batch)
    loss.backward()
    got = lora_gradients(model)
    assert abs(loss.item() - reference.item()) < 1e-5
    assert set(got) == set(expected) and len(got) > 0
    for name, gradient in expected.items():
        assert torch.allclose(got[name], gradient, atol=1e-6, rtol=1e-4), name
    return outputs


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_loss_and_gradients_equal_the_models_own(model, tokenized_rows, tiny_tokenizer, batching):
    batch = make_batch(tokenized_rows, tiny_tokenizer, batching)
    outputs = assert_same_loss_and_gradients(model, batch)
    # The model projected nothing: its "logits" are the hidden states of the trained positions.
    assert outputs.logits.shape == (int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), model.config.hidden_size)
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)  # and the projection is back


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

    monkeypatch.setattr("qlora_cli.train.loss_spec.CHUNK_ELEMENTS", 50 * 5)  # 5 rows per chunk, the last one short
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
    from qlora_cli.train.loss import cast_weight

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


ARCHITECTURE_CONFIGS = {
    # Tiny versions of the shapes users bring; Gemma ties its head to the embeddings, Gemma2 soft-caps its logits.
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16}),
}


def tiny_architecture(name: str, vocab_size: int):
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, extra = ARCHITECTURE_CONFIGS[name]
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_cache=False, **extra)
    torch.manual_seed(0)
    return with_lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32))


@pytest.mark.parametrize("architecture", ["qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_other_architectures_train_the_same_loss(architecture, batching, tokenized_rows, tiny_tokenizer):
    model = tiny_architecture(architecture, len(tiny_tokenizer))
    assert_same_loss_and_gradients(model, make_batch(tokenized_rows, tiny_tokenizer, batching))


def test_soft_capped_gemma2_trains_with_its_own_loss(tiny_tokenizer):
    assert output_head(tiny_architecture("gemma2", len(tiny_tokenizer))) is None
