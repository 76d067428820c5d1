"""What the preference methods (dpo.py, orpo.py, kto.py) share: reading and tokenizing their rows, batching them,
the log-probability of each answer under the trained model and under the reference, and the seam's other duties.

The reference model costs no second copy of the base: it is the same 4-bit base with the adapter switched off, or,
when the run continues an earlier run's adapter (`model.adapter`), that adapter loaded a second time, frozen, under
the name `reference` (core/models.py) and switched on in place of the trained one for the reference pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from ...core import compat
from ...core.models import REFERENCE_ADAPTER
from ...core.recipe import PreferenceSection
from ...data.preference import cache_payload, to_preference_example, tokenize_preferences
from ...data.tokenize import IGNORE_INDEX
from ..loss import base_model_of, linear_cross_entropy, output_head, trained_targets



def pad_rows(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, labels (IGNORE_INDEX on padding) and attention mask of (ids, labels) sequences."""
    longest = max(len(ids) for ids, _ in sequences)
    count = len(sequences)
    input_ids = torch.full((count, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((count, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((count, longest), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PairBatch:
    """A batch of pairs as one padded batch of 2B sequences: the B chosen answers, then the B rejected ones, so
    that one forward pass scores both."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        chosen = [(f["chosen_input_ids"], f["chosen_labels"]) for f in features]
        rejected = [(f["rejected_input_ids"], f["rejected_labels"]) for f in features]
        return pad_rows(chosen + rejected, self.pad_token_id)


def sequence_logps(model, head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens, their count), one value per row of the batch.

    With a plain output head (`head`) only the trained positions are projected onto the vocabulary, a chunk at a
    time (train/loss.py); each row's sum is the negated chunked cross-entropy of its own positions, so no logits of
    the whole batch are ever held. Otherwise the model's own logits are used.
    """
    mask, targets = trained_targets(batch["labels"])
    counts = mask.sum(dim=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if head is None:
        logits = model(**inputs).logits.float()
        token_logps = logits[mask].log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        return torch.stack([piece.sum() for piece in token_logps.split(counts.tolist())]), counts
    with compat.output_projection_skipped(base_model_of(extract_model_from_parallel(model)), head):
        hidden = model(**inputs, logits_to_keep=mask).logits
    compat.check_kept_hidden_states(hidden, len(targets), head.in_features)
    sizes = counts.tolist()
    logps = [-linear_cross_entropy(rows, head.weight, row_targets, 1.0)
             for rows, row_targets in zip(hidden.split(sizes), targets.split(sizes))]
    return torch.stack(logps), counts


@contextmanager
def reference_model(model):
    """The model as the reference: the adapter being trained off, or the frozen `reference` adapter on in its place
    (and no dropout). The unwrapped model is yielded: the reference pass computes no gradients, and data-parallel
    wrappers only need to see the pass that does."""
    peft_model = extract_model_from_parallel(model)
    if REFERENCE_ADAPTER not in getattr(peft_model, "peft_config", {}):
        with torch.no_grad(), peft_model.disable_adapter():
            yield peft_model
        return
    trained = peft_model.active_adapter
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), compat.peft_adapter_switched(peft_model, REFERENCE_ADAPTER, trained):
            yield peft_model
    finally:
        peft_model.train(was_training)


class PreferenceMethod:
    """The parts of the TrainingMethod contract every preference method has alike."""

    name = ""
    metric_names: tuple[str, ...] = ()
    # The row layouts the method reads (data/preference.py), and whether it trains on unpaired rows.
    formats: tuple[str, ...] = ("preference", "hh-rlhf")
    unpaired = False

    def __init__(self, recipe=None) -> None:
        self.head = None
        self.settings = recipe.preference if recipe is not None else PreferenceSection()

    def read_row(self, row, location, data_format, columns):
        return to_preference_example(row, location, data_format, columns, self.formats)

    def cache_payload(self, example) -> list:
        return cache_payload(example) + ([self.name] if self.unpaired else [])

    def tokenize(self, tokenizer, template, examples, options):
        return tokenize_preferences(tokenizer, template, examples, options, unpaired=self.unpaired)

    def row_length(self, row) -> int:
        return max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))

    def collator(self, tokenizer, data):
        return PairBatch(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def prepare(self, model) -> None:
        self.head = output_head(model)

    def preview(self, row):
        return [("chosen", row["chosen_input_ids"], row["chosen_labels"]),
                ("rejected", row["rejected_input_ids"], row["rejected_labels"])]

    def parity_prompts(self, rows):
        return [row["chosen_input_ids"] for row in rows]

    def policy_and_reference_logps(self, trainer, model, batch):
        """(policy log-probs, reference log-probs, trained-token counts) of every sequence of the batch. The
        reference pass runs first, so that switching adapters never touches a graph being built."""
        compat.loss_is_a_mean_per_micro_batch(trainer)
        with reference_model(model) as reference:
            reference_logps, _ = sequence_logps(reference, self.head, batch)
        policy_logps, counts = sequence_logps(model, self.head, batch)
        return policy_logps, reference_logps, counts
