"""From the recipe's data sources to the training and evaluation examples: read, check, mix, hold out.

Everything here runs before any model or tokenizer loads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.errors import Problem, UserError
from ..core.recipe import DataSection, DataSource
from .formats import RowError, to_example
from .readers import Location, RawRows, read_hub, read_path

MAX_PROBLEMS_SHOWN = 20


def source_name(source: DataSource) -> str:
    if source.hub:
        return f"hub:{source.hub}" + (f"/{source.subset}" if source.subset else "") + f":{source.split}"
    return str(source.path)


# How a training method turns a raw row into its example: (row, location, format, columns) -> example,
# raising RowError for a row it cannot use (train/methods/base.py, `read_row`).
ReadRow = Callable[[object, Location, str, dict[str, str]], Any]


def read_source(source: DataSource, read_row: ReadRow = to_example) -> tuple[list, list[Problem]]:
    """Every row of one source converted to an example by `read_row`; one problem per bad row."""
    raw: RawRows = read_hub(source.hub, source.subset, source.split) if source.hub else read_path(source.path)
    examples: list = []
    problems = list(raw.problems)
    for location, row in raw.rows:
        try:
            examples.append(read_row(row, location, source.format, source.columns))
        except RowError as error:
            problems.append(location.problem(str(error)))
    if not examples and not problems:
        problems.append(Problem(f"{source_name(source)} has no rows"))
    # The reader's problems (a line that is not JSON) and the rows' (a missing field) are found in two passes:
    # reported in file order.
    return examples, sorted(problems, key=lambda problem: (str(problem.file or ""), problem.line or 0))


def resample(examples: list, source: DataSource, rng: random.Random) -> list:
    """Apply a source's `weight` (repeat or subsample) or `samples` (an exact count)."""
    if source.samples is not None:
        target = source.samples
    elif source.weight is not None:
        target = round(len(examples) * source.weight)
    else:
        return examples
    whole, rest = divmod(target, len(examples)) if examples else (0, 0)
    return examples * whole + rng.sample(examples, rest)


@dataclass
class Datasets:
    train: list
    eval: list
    rows_per_source: dict[str, int] = field(default_factory=dict)  # rows used for training, after mixing
    skipped: list[Problem] = field(default_factory=list)  # bad rows skipped under on_bad_row: skip


def _report(problems: list[Problem]) -> UserError:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = f"; the first {len(shown)}" if len(problems) > len(shown) else ""
    return UserError(shown, title=f"{len(problems)} bad data row(s) (data.on_bad_row: skip trains on the others){more}:")


def load_datasets(data: DataSection, seed: int, read_row: ReadRow = to_example) -> Datasets:
    """Read every source with the training method's `read_row` (default: supervised fine-tuning's formats),
    then hold out the evaluation rows, then mix the training rows by weight.

    Evaluation rows are held out before mixing so that a row repeated by a weight is never in both.

    Raises:
        UserError: bad rows (all of them, when `on_bad_row: error`), or nothing left to train on.
    """
    rng = random.Random(seed)
    per_source: list[tuple[DataSource, list]] = []
    problems: list[Problem] = []
    for source in data.train:
        examples, bad = read_source(source, read_row)
        per_source.append((source, examples))
        problems += bad
    eval_examples: list = []
    for source in data.eval:
        examples, bad = read_source(source, read_row)
        eval_examples += examples
        problems += bad
    skipped: list[Problem] = []
    if problems:
        if data.on_bad_row == "error":
            raise _report(problems)
        skipped = problems

    if data.eval_size:
        pooled = [(index, example) for index, (_, examples) in enumerate(per_source) for example in examples]
        count = int(data.eval_size) if data.eval_size >= 1 else round(len(pooled) * data.eval_size)
        if not 0 < count < len(pooled):
            raise UserError(
                f"data.eval_size: {data.eval_size} holds out {count} of {len(pooled)} rows; leave at least one row on each side"
            )
        held = set(rng.sample(range(len(pooled)), count))
        eval_examples = [example for position, (_, example) in enumerate(pooled) if position in held]
        kept: list[list] = [[] for _ in per_source]
        for position, (index, example) in enumerate(pooled):
            if position not in held:
                kept[index].append(example)
        per_source = [(source, examples) for (source, _), examples in zip(per_source, kept)]

    train: list = []
    rows_per_source: dict[str, int] = {}
    for source, examples in per_source:
        mixed = resample(examples, source, rng)
        rows_per_source[source_name(source)] = len(mixed)
        train += mixed
    if not train:
        raise UserError("no training rows are left" + (" after skipping bad rows" if skipped else ""))
    return Datasets(train=train, eval=eval_examples, rows_per_source=rows_per_source, skipped=skipped)
