"""qlora's DPO against TRL's DPOTrainer: the same tiny model, adapter and batch give the same first-step loss and
rewards, for each loss variant. The adapter starts non-zero (random LoRA A and B), so that the trained model and
the reference (the base alone) differ and the loss is not simply ln 2 on both sides."""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_cli.core.recipe import DataSection, PreferenceSection
from qlora_cli.data.preference import PreferenceExample, prompt_length, tokenize_preferences
from qlora_cli.data.readers import Location
from qlora_cli.data.tokenize import IGNORE_INDEX, TokenizeOptions
from qlora_cli.train.methods import load_method

from test_preference import PAIRS

trl = pytest.importorskip("trl", reason="TRL is not installed (the test extra brings it: pip install -e '.[test]')")


def trained_end(labels: list[int]) -> int:
    """One past the last trained position."""
    return max(index for index, label in enumerate(labels) if label != IGNORE_INDEX) + 1


class Recorder:
    """What a method's compute_loss needs of the trainer: its metrics are kept here."""

    loss_is_scaled_for_ga = None

    def __init__(self):
        self.metrics = {}

    def record_metrics(self, metrics):
        self.metrics.update({name: float(value) for name, value in metrics.items()})


def peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=False)  # random A and B: the trained model starts away from the reference
    return get_peft_model(base, config).train()


@pytest.mark.parametrize("share_prompt", [True, False], ids=["prompt-once", "padded-answers"])
@pytest.mark.parametrize("loss, label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_first_step_loss_and_rewards_match_trl(tiny_model_dir, tiny_tokenizer, tmp_path, loss, label_smoothing,
                                               share_prompt):
    from datasets import Dataset

    examples = [PreferenceExample(Location("pairs", index), row["prompt"], row["chosen"], row["rejected"])
                for index, row in enumerate(PAIRS[:2])]
    rows, _ = tokenize_preferences(tiny_tokenizer, tiny_tokenizer.chat_template, examples,
                                   TokenizeOptions(max_seq_len=512), unpaired=False)
    records = []
    for row in rows:
        # TRL's layout: a shared prompt, then answers trained to their last token (ours leave the newline after the
        # end-of-turn token as untrained context, as SFT does: it is cut here).
        start = prompt_length(row["chosen_labels"])
        assert start == prompt_length(row["rejected_labels"])
        assert row["chosen_input_ids"][:start] == row["rejected_input_ids"][:start]
        answers = {name: row[f"{name}_input_ids"][start: trained_end(row[f"{name}_labels"])] for name in ("chosen", "rejected")}
        records.append({"prompt_ids": row["chosen_input_ids"][:start], "chosen_ids": answers["chosen"],
                        "rejected_ids": answers["rejected"]})

    model = peft_model(tiny_model_dir)
    reference_copy = copy.deepcopy(model)

    method = load_method("dpo")
    method.settings = PreferenceSection(beta=0.1, loss=loss, label_smoothing=label_smoothing, share_prompt=share_prompt)
    method.prepare(model)
    recorder = Recorder()
    batch = method.collator(tiny_tokenizer, DataSection(train=[{"path": tmp_path}]))(rows)
    assert ("segments" in batch) == share_prompt  # each pair's prompt read once, or two padded rows as TRL has them
    ours, _ = method.compute_loss(recorder, model, batch, None)

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1,
                           logging_steps=1, learning_rate=1e-6, beta=0.1, loss_type=[loss],
                           label_smoothing=label_smoothing, max_length=None, report_to="none", use_cpu=True,
                           save_strategy="no", gradient_checkpointing=False, bf16=False)
    # TRL takes a PeftModel's adapter as where training started and makes a copy of it the reference; qlora's
    # reference for a new adapter is the base alone, which TRL is given as its reference model.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = trl.DPOTrainer(model=reference_copy, ref_model=base, args=config, train_dataset=Dataset.from_list(PAIRS[:2]),
                             processing_class=tokenizer)
    # The same token ids as ours: TRL's own tokenization trains the newline after the end-of-turn token too, which
    # would compare two tokenizations instead of two losses. Its collator takes prompt/chosen/rejected ids.
    trainer.train_dataset = Dataset.from_list(records)
    trainer.train()
    theirs = trainer.state.log_history[0]

    assert abs(float(ours) - theirs["loss"]) <= 1e-4, (float(ours), theirs["loss"])
    assert abs(float(ours) - torch.log(torch.tensor(2.0)).item()) > 1e-3  # the comparison is not of two ln 2s
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert abs(recorder.metrics[name] - theirs[name]) <= 1e-4, (name, recorder.metrics[name], theirs[name])
