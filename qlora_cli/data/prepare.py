"""Tokenize the examples of a recipe, once, and describe what the model will be fed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import Sampler

from ..core import compat
from ..core.cache import cache_dir
from ..core.console import Steps
from ..core.recipe import Recipe
from .sources import Datasets
from .store import PROGRESS_MIN_ROWS
from .tokenize import TokenizeOptions, TokenizeStats, cache_key, padding_fraction, tokenize_cached


@dataclass
class PreparedData:
    train: Sequence[dict[str, list[int]]]  # store.TokenizedRows: read from disk when used
    eval: Sequence[dict[str, list[int]]]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats | None
    cache_hit: bool
    fingerprint: str = ""  # the cache key of the training rows: what they are made of

    @property
    def train_lengths(self) -> np.ndarray:
        """Each training row's length, as the training method counts it (stored with the rows)."""
        return self.train.lengths


def options_of(recipe: Recipe) -> TokenizeOptions:
    data = recipe.data
    return TokenizeOptions(max_seq_len=data.max_seq_len, truncation=data.truncation, train_on_prompt=data.train_on_prompt)


def tokenizing_progress(console: Console | None, what: str):
    """A progress factory for `tokenize_cached`: a bar with rows/s and the time left, for enough rows to take a
    few seconds; nothing otherwise."""

    @contextmanager
    def progress(total: int):
        if console is None or total < PROGRESS_MIN_ROWS:
            yield lambda done: None
            return
        with Steps(console, what, total, unit="rows") as steps:
            yield lambda done: steps.advance(done - steps.done)

    return progress


def release_pages(examples) -> None:
    """Unmap the spooled examples after a pass over all of them (`store.ExampleSpool.release_pages`); a plain
    list has nothing to release."""
    release = getattr(examples, "release_pages", None)
    if release is not None:
        release()


def prepare(recipe: Recipe, tokenizer, template: str, datasets: Datasets, method, use_cache: bool = True,
            console: Console | None = None) -> PreparedData:
    """Training and evaluation rows tokenized by the training method, stored memory-mapped; a cached
    tokenization is reused. With a `console`, a progress bar shows while a large tokenization runs."""
    folder = cache_dir() / "tokenized" if use_cache else None
    options = options_of(recipe)
    key = cache_key(tokenizer, template, datasets.train, options, method.cache_tag)
    train, train_stats, hit = tokenize_cached(method, tokenizer, template, datasets.train, options, folder, key=key,
                                              progress_factory=tokenizing_progress(console, "Tokenizing the training rows"))
    release_pages(datasets.train)
    eval_rows, eval_stats = [], None
    if datasets.eval:
        eval_rows, eval_stats, _ = tokenize_cached(
            method, tokenizer, template, datasets.eval, options, folder,
            progress_factory=tokenizing_progress(console, "Tokenizing the evaluation rows"))
        release_pages(datasets.eval)
    return PreparedData(train, eval_rows, train_stats, eval_stats, hit, key)


class EpochSeededLengthGroupedSampler(Sampler):
    """transformers' length-grouped order (`compat.length_grouped_indices`), drawn from a generator seeded with
    seed + epoch.

    transformers' own LengthGroupedSampler draws from the global torch RNG, whose state at an epoch's
    start depends on everything before it; a resumed run would then see other batches. Seeding per
    epoch makes the order a function of (seed, epoch) alone, so resuming reproduces it exactly.
    """

    def __init__(self, lengths, batch_size: int, seed: int):
        # A list: the grouping looks lengths up one by one, which a list answers fastest.
        self.lengths = lengths.tolist() if isinstance(lengths, np.ndarray) else list(lengths)
        self.batch_size, self.seed = batch_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(compat.length_grouped_indices(self.lengths, self.batch_size, generator))


def expected_padding(recipe: Recipe, lengths) -> float:
    """The padding fraction the recipe's batching will feed over one epoch (seeded like training).

    Packing feeds none. Otherwise batches are drawn at random or, with `group_by_length`, by the
    sampler training uses (first epoch).
    """
    if recipe.data.packing or not len(lengths):
        return 0.0
    lengths = lengths.tolist() if isinstance(lengths, np.ndarray) else lengths
    size = recipe.training.batch_size
    if recipe.data.group_by_length:
        order = list(EpochSeededLengthGroupedSampler(lengths, size, recipe.training.seed))
    else:
        order = list(range(len(lengths)))
        random.Random(recipe.training.seed).shuffle(order)
    batches = [order[i: i + size] for i in range(0, len(order), size)]
    return padding_fraction(lengths, batches)
