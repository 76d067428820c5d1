"""The contract between the shared training run and a training method (see the package docstring)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ...core.recipe import DataSection
from ...data.readers import Location
from ...data.tokenize import TokenizeOptions, TokenizeStats

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

# A tokenized row: named lists of token ids (`input_ids` and `labels` for SFT; a method may use other names).
Row = dict[str, list[int]]


class TrainingMethod(Protocol):
    name: str
    # Keys of the method's own metrics that are logged with the loss (metrics.jsonl, the progress line, summary).
    metric_names: tuple[str, ...]

    # --- data, before any model loads -------------------------------------------------------------
    def read_row(self, row: object, location: Location, data_format: str, columns: dict[str, str]) -> Any:
        """One raw row as this method's example type.

        Raises:
            data.formats.RowError: the row is unusable; the message says why (its location is added by the caller).
        """

    # What besides the examples, the tokenizer, the template and the options decides the rows `tokenize` makes,
    # for the tokenization cache key ("" for nothing): the examples are hashed as read, their type included.
    cache_tag: str

    # --- tokenization and batching ----------------------------------------------------------------
    def tokenize(self, tokenizer, template: str, examples: list, options: TokenizeOptions
                 ) -> tuple[list[Row] | pa.RecordBatch, TokenizeStats]:
        """Tokenized rows with labels, and statistics; rows left with nothing to train on are dropped and counted.
        The rows are dicts, or one record batch of int32 list columns (then `row_lengths` gives their lengths).

        Raises:
            UserError: the chat template cannot render some examples; names their rows.
        """

    def row_length(self, row: Row) -> int:
        """The positions a row occupies in a batch, for grouping by length and the padding estimate."""

    def row_lengths(self, batch: pa.RecordBatch) -> np.ndarray | list[int]:
        """`row_length` of each row of a record batch, as `tokenize` may return."""

    def collator(self, tokenizer, data: DataSection):
        """A callable that batches rows into the tensors `compute_loss` takes."""

    # --- training ---------------------------------------------------------------------------------
    def prepare(self, model) -> None:
        """Called once with the model about to train (to find its output head, say), before the first step."""

    def compute_loss(self, trainer, model, inputs: dict, num_items_in_batch) -> tuple[Any, Any]:
        """(loss, outputs) of one micro-batch, as `Trainer.compute_loss` returns them with return_outputs=True.
        The method's metrics go to `trainer.record_metrics({...})`, averaged by the trainer until the next log."""

    # --- after training -----------------------------------------------------------------------------
    def preview(self, row: Row) -> list[tuple[str, list[int], list[int]]]:
        """What `qlora data preview` shows of a row: (caption, input ids, labels) per sequence it trains on."""

    def parity_prompts(self, rows: list[Row]) -> list[list[int]]:
        """Token ids, one sequence per row, that the trained model saw: the merge is checked on them."""
