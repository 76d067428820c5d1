"""Supervised fine-tuning: next-token cross-entropy on the trained tokens (responses, unless
`data.train_on_prompt`), the paper's method.

Rows are conversations or template-free text (data/formats.py); labels come from the rendered text's
character offsets (data/tokenize.py); batches are padded to their longest row or packed into one; the loss
projects only the trained positions onto the vocabulary, in chunks (train/loss.py), where the model allows it.
"""

from __future__ import annotations

import numpy as np

from ...core import compat
from ...core.recipe import DataSection
from ...data.formats import Example, to_example
from ...data.tokenize import PackBatch, PadToLongest, tokenize_to_arrow
from ..loss import head_only_loss, output_head


class Method:
    name = "sft"
    metric_names: tuple[str, ...] = ()
    cache_tag = ""

    def __init__(self, recipe=None) -> None:
        self.head = None

    def read_row(self, row, location, data_format, columns) -> Example:
        return to_example(row, location, data_format, columns)


    def tokenize(self, tokenizer, template, examples, options):
        return tokenize_to_arrow(tokenizer, template, examples, options)

    def row_length(self, row) -> int:
        return len(row["input_ids"])

    def row_lengths(self, batch):
        return np.diff(batch.column("input_ids").offsets.to_numpy())

    def collator(self, tokenizer, data: DataSection):
        return PackBatch() if data.packing else PadToLongest(tokenizer.pad_token_id)

    def prepare(self, model) -> None:
        self.head = output_head(model)

    def compute_loss(self, trainer, model, inputs, num_items_in_batch):
        # FSDP gathers a sharded weight only when its module runs, and the chunked loss skips the head's module.
        if self.head is None or trainer.is_fsdp_enabled or "labels" not in inputs:
            from transformers import Trainer  # here: the data stage (`qlora data preview`) needs none of the trainer

            return Trainer.compute_loss(trainer, model, inputs, True, num_items_in_batch)
        loss, outputs = head_only_loss(model, self.head, inputs, num_items_in_batch)
        return loss * compat.trainer_loss_scale(trainer, num_items_in_batch), outputs

    def preview(self, row):
        return [("", row["input_ids"], row["labels"])]

    def parity_prompts(self, rows):
        return [row["input_ids"] for row in rows]
