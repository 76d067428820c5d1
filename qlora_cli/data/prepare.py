"""Tokenize the examples of a recipe, once, and describe what the model will be fed."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from ..core import compat
from ..core.cache import cache_dir
from ..core.recipe import Recipe
from .sources import Datasets
from .tokenize import TokenizeOptions, TokenizeStats, padding_fraction, tokenize_cached


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats | None
    cache_hit: bool


def options_of(recipe: Recipe) -> TokenizeOptions:
    data = recipe.data
    return TokenizeOptions(max_seq_len=data.max_seq_len, truncation=data.truncation, train_on_prompt=data.train_on_prompt)


def prepare(recipe: Recipe, tokenizer, template: str, datasets: Datasets, method, use_cache: bool = True) -> PreparedData:
    """Training and evaluation rows tokenized by the training method; a cached tokenization is reused."""
    folder = cache_dir() / "tokenized" if use_cache else None
    options = options_of(recipe)
    train, train_stats, hit = tokenize_cached(method, tokenizer, template, datasets.train, options, folder)
    eval_rows, eval_stats = [], None
    if datasets.eval:
        eval_rows, eval_stats, _ = tokenize_cached(method, tokenizer, template, datasets.eval, options, folder)
    return PreparedData(train, eval_rows, train_stats, eval_stats, hit)


class EpochSeededLengthGroupedSampler(Sampler):
    """transformers' length-grouped order (`compat.length_grouped_indices`), drawn from a generator seeded with
    seed + epoch.

    transformers' own LengthGroupedSampler draws from the global torch RNG, whose state at an epoch's
    start depends on everything before it; a resumed run would then see other batches. Seeding per
    epoch makes the order a function of (seed, epoch) alone, so resuming reproduces it exactly.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(compat.length_grouped_indices(self.lengths, self.batch_size, generator))


def expected_padding(recipe: Recipe, lengths: list[int]) -> float:
    """The padding fraction the recipe's batching will feed over one epoch (seeded like training).

    Packing feeds none. Otherwise batches are drawn at random or, with `group_by_length`, by the
    sampler training uses (first epoch).
    """
    if recipe.data.packing or not lengths:
        return 0.0
    size = recipe.training.batch_size
    if recipe.data.group_by_length:
        order = list(EpochSeededLengthGroupedSampler(lengths, size, recipe.training.seed))
    else:
        order = list(range(len(lengths)))
        random.Random(recipe.training.seed).shuffle(order)
    batches = [order[i: i + size] for i in range(0, len(order), size)]
    return padding_fraction(lengths, batches)
