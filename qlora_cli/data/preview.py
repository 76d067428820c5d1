"""`qlora data preview`: what the model is trained on, token by token, and statistics of the data."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..core.recipe import Recipe
from .prepare import PreparedData, expected_padding
from .sources import Datasets
from .store import lengths_of
from .tokenize import IGNORE_INDEX

# Without colour (not a terminal), trained tokens are written between these marks.
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def render_example(tokenizer, input_ids: list[int], labels: list[int], colour: bool) -> Text:
    """A sequence's tokens decoded one by one: trained ones green (or between marks), special ones
    magenta and written out, so that BOS, EOS and end-of-turn tokens are visible."""
    specials = set(tokenizer.all_special_ids)
    text = Text()
    in_trained = False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if not colour and trained != in_trained:
            text.append(TRAINED_OPEN if trained else TRAINED_CLOSE)
            in_trained = trained
        piece = tokenizer.decode([token], skip_special_tokens=False)
        style = ("bold green" if trained else "dim") if colour else None
        if token in specials and colour:
            style = "bold magenta" if trained else "magenta"
        text.append(piece, style=style)
    if in_trained:
        text.append(TRAINED_CLOSE)
    return text


def histogram(lengths, bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of token lengths (a list or an array)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return []
    low, high = int(lengths.min()), int(lengths.max())
    step = max(1, -(-(high - low + 1) // bins))
    counts = np.bincount(np.minimum((lengths - low) // step, bins - 1), minlength=bins).tolist()
    peak = max(counts)
    lines = []
    for index, count in enumerate(counts):
        start = low + index * step
        if start > high:
            break
        bar = "█" * max(1 if count else 0, round(width * count / peak))
        lines.append(f"{start:>6}-{min(start + step - 1, high):<6} {count:>7,} {bar}")
    return lines


def statistics(recipe: Recipe, method, datasets: Datasets, prepared: PreparedData) -> Table:
    stats = prepared.train_stats
    lengths = lengths_of(method, prepared.train)
    median = int(np.sort(lengths)[len(lengths) // 2])
    table = Table(title="Training data", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for name, count in datasets.rows_per_source.items():
        table.add_row("rows", f"{count:,}  {name}")
    table.add_row("bad rows skipped", str(len(datasets.skipped)))
    table.add_row("examples", f"{stats.examples:,} (+ {len(prepared.eval):,} for evaluation)")
    table.add_row("tokens", f"{stats.tokens:,}; median {median}, longest {stats.longest}")
    table.add_row("trained tokens", f"{stats.trained_tokens:,} ({stats.trained_tokens / stats.tokens:.1%})")
    table.add_row("truncated", f"{stats.truncated:,} to {recipe.data.max_seq_len} tokens ({recipe.data.truncation})")
    table.add_row("dropped", f"{stats.dropped_too_long:,} too long, {stats.dropped_no_trained_tokens:,} with no trained token")
    batching = "packed" if recipe.data.packing else ("grouped by length" if recipe.data.group_by_length else "random")
    table.add_row(
        "padding",
        f"{expected_padding(recipe, lengths):.1%} of fed positions "
        f"(batch {recipe.training.batch_size}, {batching})",
    )
    return table


def show_preview(console: Console, recipe: Recipe, method, tokenizer, datasets: Datasets, prepared: PreparedData,
                 count: int) -> None:
    colour = console.is_terminal and console.color_system is not None
    legend = "trained tokens in green, special tokens in magenta" if colour else (
        f"trained tokens between {TRAINED_OPEN} and {TRAINED_CLOSE}"
    )
    console.print(f"The first {min(count, len(prepared.train))} training examples as the model sees them ({legend}):")
    for index, row in enumerate(prepared.train[:count]):
        for caption, input_ids, labels in method.preview(row):
            console.rule(f"example {index + 1}{f' ({caption})' if caption else ''}: {len(input_ids)} tokens")
            console.print(render_example(tokenizer, input_ids, labels, colour))
    console.rule()
    console.print(statistics(recipe, method, datasets, prepared))
    console.print("Token lengths:")
    for line in histogram(lengths_of(method, prepared.train)):
        console.print(line, markup=False)
