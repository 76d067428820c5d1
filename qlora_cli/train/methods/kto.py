"""KTO, Kahneman-Tversky optimization (Ethayarajh et al., 2024): answers labelled desirable or undesirable, no pairs
needed (a pair gives one answer of each). Rows are `kto` (prompt, completion, label) or paired layouts.

As TRL computes it: with r = log π/π_ref of an answer and z a detached estimate of KL(π‖π_ref), clamped at 0, a
desirable answer's loss is 1 - σ(β(r - z)) and an undesirable one's 1 - σ(β(z - r)), weighted by
`preference.desirable_weight` / `undesirable_weight` and averaged over the batch. z is the mean of r over
mismatched pairs: each prompt of the batch with the answer of the row before it (the batch's answers shifted by
one), averaged over the processes of a data-parallel run. The reference is the same base with the adapter off (or
the starting adapter, frozen); see preference.py. Metrics with TRL's names: rewards/chosen and rewards/rejected
(β·r of the desirable and the undesirable answers), rewards/margins, logps/chosen, logps/rejected, kl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from ...core import compat
from ...data.preference import prompt_length
from ...data.tokenize import IGNORE_INDEX
from .preference import PreferenceMethod, pad_rows, reference_model, sequence_logps


def mismatched_sequences(rows: list[dict[str, list[int]]], limit: int) -> list[tuple[list[int], list[int]]]:
    """Each row's prompt followed by the previous row's answer (the first row takes the last row's), at most
    `limit` tokens: the pairs the KL estimate scores."""
    sequences = []
    for index, row in enumerate(rows):
        other = rows[index - 1]
        start, other_start = prompt_length(row["labels"]), prompt_length(other["labels"])
        ids = row["input_ids"][:start] + other["input_ids"][other_start:]
        labels = [IGNORE_INDEX] * start + other["labels"][other_start:]
        sequences.append((ids[:limit], labels[:limit]))
    return sequences


@dataclass
class UnpairedBatch:
    """The answers of a batch, their desirability, and the mismatched sequences of the KL estimate (`kl_*`)."""

    pad_token_id: int
    max_seq_len: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_rows([(f["input_ids"], f["labels"]) for f in features], self.pad_token_id)
        batch["desirable"] = torch.tensor([f["desirable"][0] for f in features], dtype=torch.bool)
        mismatched = pad_rows(mismatched_sequences(features, self.max_seq_len), self.pad_token_id)
        batch.update({f"kl_{key}": value for key, value in mismatched.items()})
        return batch


def kto_losses(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """The loss of each answer, desirable ones first (as TRL orders them)."""
    chosen = 1 - torch.sigmoid(beta * (logratios[desirable] - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - logratios[~desirable]))
    return torch.cat((desirable_weight * chosen, undesirable_weight * rejected))


class Method(PreferenceMethod):
    name = "kto"
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
    formats = ("preference", "hh-rlhf", "kto")
    unpaired = True

    def row_length(self, row) -> int:
        return len(row["input_ids"])

    def collator(self, tokenizer, data):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return UnpairedBatch(pad, data.max_seq_len)

    def preview(self, row):
        return [("desirable" if row["desirable"][0] else "undesirable", row["input_ids"], row["labels"])]

    def parity_prompts(self, rows):
        return [row["input_ids"] for row in rows]

    def compute_loss(self, trainer, model, inputs, num_items_in_batch):
        compat.loss_is_a_mean_per_micro_batch(trainer)
        settings = self.settings
        main = {key: inputs[key] for key in ("input_ids", "labels", "attention_mask")}
        mismatched = {key: inputs[f"kl_{key}"] for key in ("input_ids", "labels", "attention_mask")}
        with reference_model(model) as reference:
            reference_logps, _ = sequence_logps(reference, self.head, main)
            reference_kl_logps, _ = sequence_logps(reference, self.head, mismatched)
        with torch.no_grad():
            policy_kl_logps, _ = sequence_logps(extract_model_from_parallel(model), self.head, mismatched)
        kl = (policy_kl_logps - reference_kl_logps).mean()
        if trainer.accelerator.num_processes > 1:
            kl = trainer.accelerator.reduce(kl, reduction="mean")
        kl = kl.clamp(min=0)
        policy_logps, _ = sequence_logps(model, self.head, main)
        desirable = inputs["desirable"]
        logratios = policy_logps - reference_logps
        losses = kto_losses(logratios, desirable, kl, settings.beta, settings.desirable_weight,
                            settings.undesirable_weight)
        rewards = settings.beta * logratios.detach()
        metrics = {"kl": kl}
        if desirable.any():
            metrics.update({"rewards/chosen": rewards[desirable].mean(), "logps/chosen": policy_logps[desirable].detach().mean()})
        if (~desirable).any():
            metrics.update({"rewards/rejected": rewards[~desirable].mean(),
                            "logps/rejected": policy_logps[~desirable].detach().mean()})
        if desirable.any() and (~desirable).any():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        trainer.record_metrics(metrics)
        return losses.mean(), {"logps": policy_logps}
