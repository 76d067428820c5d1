"""The standard QLoRA fine-tuning script, as most tutorials and the paper's own code write it: the
baseline that `scripts/bench_train.py` measures `qlora train` against.

transformers Trainer + peft + bitsandbytes: NF4 with double quantization, LoRA r=64 / alpha=16 on every
linear layer, paged AdamW 32-bit, gradient checkpointing, the Alpaca prompt, loss on the responses only,
batches padded to their longest in random order, float32 compute on CPU. Each example is trained once.
It uses nothing from qlora_cli.

    python scripts/baseline_qlora.py --model DIR --data rows.jsonl --out result.json [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments,
)

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100


def tokenize(tokenizer, row: dict, max_len: int) -> dict:
    instruction = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    prompt = tokenizer(PROMPT.format(instruction=instruction))["input_ids"]
    answer = tokenizer(row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len]
    return {"input_ids": ids, "labels": labels}


class PadToLongest:
    """Pads each batch to its longest example and counts real tokens and fed positions."""

    def __init__(self, pad_id: int):
        self.pad_id, self.tokens, self.positions = pad_id, 0, 0

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id)
        labels = torch.full((len(features), longest), IGNORE)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
            mask[row, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    dataset = [tokenize(tokenizer, row, args.max_seq_len) for row in rows]

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    collator = PadToLongest(tokenizer.pad_token_id)

    class Counting(Trainer):
        # Counted when trained on: the data loader collates one batch ahead.
        def training_step(self, model, inputs, num_items_in_batch=None):
            collator.tokens += int(inputs["attention_mask"].sum())
            collator.positions += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Counting(
        model=model,
        args=TrainingArguments(
            output_dir="/tmp/baseline-qlora", per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            learning_rate=2e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3,
            optim="paged_adamw_32bit", use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
            seed=0, remove_unused_columns=False, disable_tqdm=True,
        ),
        train_dataset=dataset,
        data_collator=collator,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "train_tokens": collator.tokens,
        "fed_positions": collator.positions,
        "padding_fraction": 1 - collator.tokens / collator.positions,
        "train_seconds": seconds,
        "tokens_per_second": collator.tokens / seconds,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "steps": trainer.state.global_step,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
