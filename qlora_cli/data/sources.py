"""From the recipe's data sources to the training and evaluation examples: read, check, mix, hold out.

Everything here runs before any model or tokenizer loads.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.errors import Problem, UserError
from ..core.recipe import DataSection, DataSource
from .formats import RowError, to_example
from .readers import Location, iter_hub, iter_jsonl_piece, iter_path, jsonl_pieces
from .store import ExampleSpool, ExampleView, SpoolFile, old_objects_frozen, usable_cores

MAX_PROBLEMS_SHOWN = 20
PARALLEL_READ_MIN_BYTES = 16 * 2**20  # about 50,000 alpaca rows: less is read faster than workers start


def source_name(source: DataSource) -> str:
    if source.hub:
        return f"hub:{source.hub}" + (f"/{source.subset}" if source.subset else "") + f":{source.split}"
    return str(source.path)


# How a training method turns a raw row into its example: (row, location, format, columns) -> example,
# raising RowError for a row it cannot use (train/methods/base.py, `read_row`).
ReadRow = Callable[[object, Location, str, dict[str, str]], Any]


def iter_source(source: DataSource) -> Iterator[tuple[Location, object] | Problem]:
    """A source's raw rows and the problems of reading them, one at a time, in file order."""
    if source.hub:
        return iter_hub(source.hub, source.subset, source.split, streaming=source.streaming)
    return iter_path(source.path)


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    # Rows are read in file order; a stable sort keeps a folder's files apart and a JSON array's rows in order.
    return sorted(problems, key=lambda problem: (str(problem.file or ""), problem.line or 0))


def check_source(source: DataSource, read_row: ReadRow, keep: Callable[[Any], object]) -> list[Problem]:
    """Convert every row of one source with `read_row`, giving each example to `keep` as it is made; returns
    one problem per bad row (all of them, in file order)."""
    problems, kept = _check_rows(iter_source(source), source, read_row, keep)
    return _all_problems(source, problems, kept)


def _check_rows(items: Iterator[tuple[Location, object] | Problem], source: DataSource, read_row: ReadRow,
                keep: Callable[[Any], object]) -> tuple[list[Problem], int]:
    """The problems of some of a source's rows, and how many were kept."""
    problems: list[Problem] = []
    kept = 0
    for item in items:
        if isinstance(item, Problem):
            problems.append(item)
            continue
        location, row = item
        try:
            example = read_row(row, location, source.format, source.columns)
        except RowError as error:
            problems.append(location.problem(str(error)))
            continue
        keep(example)
        kept += 1
    return problems, kept


def _all_problems(source: DataSource, problems: list[Problem], kept: int) -> list[Problem]:
    if not kept and not problems:
        problems.append(Problem(f"{source_name(source)} has no rows"))
    return _in_file_order(problems)


def read_source(source: DataSource, read_row: ReadRow = to_example) -> tuple[list, list[Problem]]:
    """Every row of one source converted to an example by `read_row`, in a list; one problem per bad row."""
    examples: list = []
    problems = check_source(source, read_row, examples.append)
    return examples, problems


def _spool_source(source: DataSource, read_row: ReadRow, spool: ExampleSpool) -> tuple[np.ndarray, list[Problem]]:
    """The spool positions of a source's examples, and its bad rows."""
    first = spool.count
    workers = reading_workers(source)
    if workers > 1:
        problems = _spool_in_pieces(source, read_row, spool, workers)
    else:
        problems = check_source(source, read_row, spool.append)
    return np.arange(first, spool.count, dtype=np.int64), problems


def reading_workers(source: DataSource) -> int:
    """Processes to read a source with: one per core for a large local JSON Lines file (cores shared among the
    ranks of a distributed run on this machine, each of which reads its own copy), else one."""
    if source.hub or source.path is None:
        return 1
    path = Path(source.path)
    if path.suffix.lower() != ".jsonl" or not path.is_file() or path.stat().st_size < PARALLEL_READ_MIN_BYTES:
        return 1
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


_READING: tuple | None = None  # (source, read_row, the spool's folder) of this reading worker


def _start_reader(reading: tuple) -> None:
    global _READING
    _READING = reading


def _read_piece(start: int, stop: int, first_line: int) -> tuple[SpoolFile, list[Problem]]:
    """A worker's piece of a JSON Lines file, read and checked into a file of the spool's (`check_source`)."""
    source, read_row, folder = _READING
    part = SpoolFile.new(folder)
    path = Path(source.path)
    problems, _ = _check_rows(iter_jsonl_piece(path, str(path), start, stop, first_line), source, read_row, part.append)
    part.close()
    return part, problems


def _spool_in_pieces(source: DataSource, read_row: ReadRow, spool: ExampleSpool, workers: int) -> list[Problem]:
    """`check_source` of a large JSON Lines file into the spool, its pieces read by `workers` processes at once;
    the same examples, in the same order, and the same problems."""
    pieces = jsonl_pieces(Path(source.path), workers)
    # Forked where possible: the workers inherit the training method's reader without pickling it.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    problems: list[Problem] = []
    kept = 0
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_reader,
                             initargs=((source, read_row, spool.folder),)) as pool:
        for part, bad in pool.map(_read_piece, *zip(*pieces)):
            spool.adopt(part)
            problems += bad
            kept += part.count
    return _all_problems(source, problems, kept)


def resample(examples, source: DataSource, rng: random.Random):
    """Apply a source's `weight` (repeat or subsample) or `samples` (an exact count), to a list of examples
    or an array of their positions."""
    if source.samples is not None:
        target = source.samples
    elif source.weight is not None:
        target = round(len(examples) * source.weight)
    else:
        return examples
    whole, rest = divmod(target, len(examples)) if len(examples) else (0, 0)
    # random.sample picks by position from the population's length alone: the same picks as sampling `examples`.
    picked = rng.sample(range(len(examples)), rest)
    if isinstance(examples, np.ndarray):
        return np.concatenate([np.tile(examples, whole), examples[picked]])
    return examples * whole + [examples[i] for i in picked]


@dataclass
class Datasets:
    train: Sequence  # examples, read from disk when used (store.ExampleView), or a list
    eval: Sequence
    rows_per_source: dict[str, int] = field(default_factory=dict)  # rows used for training, after mixing
    skipped: list[Problem] = field(default_factory=list)  # bad rows skipped under on_bad_row: skip


def _report(problems: list[Problem]) -> UserError:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = f"; the first {len(shown)}" if len(problems) > len(shown) else ""
    return UserError(shown, title=f"{len(problems)} bad data row(s) (data.on_bad_row: skip trains on the others){more}:")


def load_datasets(data: DataSection, seed: int, read_row: ReadRow = to_example) -> Datasets:
    """Read every source with the training method's `read_row` (default: supervised fine-tuning's formats),
    then hold out the evaluation rows, then mix the training rows by weight.

    Rows are read and checked one at a time and the examples spooled to disk (store.ExampleSpool): memory does
    not grow with the data. Evaluation rows are held out before mixing so that a row repeated by a weight is
    never in both.

    Raises:
        UserError: bad rows (all of them, when `on_bad_row: error`), or nothing left to train on.
    """
    rng = random.Random(seed)
    spool = ExampleSpool()
    per_source: list[tuple[DataSource, np.ndarray]] = []
    problems: list[Problem] = []
    eval_parts: list[np.ndarray] = []
    with old_objects_frozen():
        for source in data.train:
            positions, bad = _spool_source(source, read_row, spool)
            per_source.append((source, positions))
            problems += bad
        for source in data.eval:
            positions, bad = _spool_source(source, read_row, spool)
            eval_parts.append(positions)
            problems += bad
    spool.close()
    skipped: list[Problem] = []
    if problems:
        if data.on_bad_row == "error":
            raise _report(problems)
        skipped = problems

    if data.eval_size:
        pooled = np.concatenate([positions for _, positions in per_source])
        count = int(data.eval_size) if data.eval_size >= 1 else round(len(pooled) * data.eval_size)
        if not 0 < count < len(pooled):
            raise UserError(
                f"data.eval_size: {data.eval_size} holds out {count} of {len(pooled)} rows; leave at least one row on each side"
            )
        held = np.zeros(len(pooled), dtype=bool)
        held[rng.sample(range(len(pooled)), count)] = True
        eval_parts = [pooled[held]]
        kept, start = [], 0
        for source, positions in per_source:
            kept.append((source, positions[~held[start: start + len(positions)]]))
            start += len(positions)
        per_source = kept

    train_parts: list[np.ndarray] = []
    rows_per_source: dict[str, int] = {}
    for source, positions in per_source:
        mixed = resample(positions, source, rng)
        rows_per_source[source_name(source)] = len(mixed)
        train_parts.append(mixed)
    train = ExampleView(spool, np.concatenate(train_parts) if train_parts else np.zeros(0, np.int64))
    if not len(train):
        raise UserError("no training rows are left" + (" after skipping bad rows" if skipped else ""))
    eval_examples = ExampleView(spool, np.concatenate(eval_parts) if eval_parts else np.zeros(0, np.int64))
    return Datasets(train=train, eval=eval_examples, rows_per_source=rows_per_source, skipped=skipped)
