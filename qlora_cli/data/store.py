"""Data that does not fit in Python objects: examples spooled to disk, tokenized rows stored memory-mapped.

Memory stays flat as the data grows. Checked examples are pickled, a batch at a time, into Arrow files in a
private temporary folder (`ExampleSpool`; a large file's pieces are read by worker processes, each into a file of
its own that the spool adopts in order), with a digest of each (what the tokenization cache key hashes); the
training and evaluation examples are views of the spool (`ExampleView`: the spool and an array of positions).
Tokenization runs a chunk of examples at a time, in worker processes over the CPU's cores, and each chunk's rows
go straight into an Arrow file (`rows.arrow`) that `datasets` memory-maps; each row's length (the training
method's `row_length`) goes into `lengths.npy`, which is what the sampler, length grouping and the statistics
read. The rows are whatever named int lists the method's `tokenize` returns (`input_ids`/`labels` for SFT, others
for other methods), as dicts or already as a record batch.

A cache entry is a folder named by the cache key, published by one rename; a file lock makes one process build
it while the others (the ranks of a distributed run, or a second run started meanwhile) wait and then map it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import tempfile
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..core.errors import Problem, UserError
from ..core.files import staged

SPOOL_BATCH_ROWS = 4096  # examples per record batch of the spool: how far a random read reaches
CHUNK_ROWS = 1000  # examples tokenized per task: the unit of progress and of what a worker holds at once
PARALLEL_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves
PROGRESS_MIN_ROWS = 10_000  # about the rows tokenized in a few seconds on one core
ROWS_FILE, LENGTHS_FILE, STATS_FILE = "rows.arrow", "lengths.npy", "stats.json"
DEFAULT_COLUMNS = ("input_ids", "labels")
DIGEST_BYTES = 16  # of each example's digest (`example_digests`)


def _remove_folder(folder: str, owner: int) -> None:
    # A forked worker inherits the spool object; only the process that made the folder removes it.
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def pickled(example: Any) -> bytes:
    return pickle.dumps(example, protocol=pickle.HIGHEST_PROTOCOL)


def digest_of(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def example_digests(examples: Sequence) -> bytes:
    """A digest of each example as it was read (its pickle: its content and where its row is), end to end, in
    order: what the tokenization cache key hashes of the examples. A spool keeps the digests of the examples it
    was given, so that a key costs no pass over them; those of a list are computed here."""
    stored = getattr(examples, "digests", None)
    if stored is not None:
        return stored()
    return b"".join(digest_of(pickled(example)) for example in examples)


class SpoolFile:
    """Examples pickled, a record batch of SPOOL_BATCH_ROWS at a time, into one Arrow file, each one's digest kept
    (`digest_of`): a spool's part, written by the spool itself or by a worker reading a piece of a file."""

    @classmethod
    def new(cls, folder: Path) -> "SpoolFile":
        """A file of a new name in `folder`."""
        handle, path = tempfile.mkstemp(dir=folder, suffix=".arrow")
        os.close(handle)
        return cls(Path(path))

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digests = bytearray()
        self.count = 0
        self._pending: list[bytes] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def append(self, example: Any) -> None:
        data = pickled(example)
        self._pending.append(data)
        self.digests += digest_of(data)
        self.count += 1
        if len(self._pending) == SPOOL_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batch = pa.record_batch([pa.array(self._pending, type=pa.large_binary())], names=["example"])
        if self._writer is None:
            self._writer = pa.ipc.new_file(str(self.path), batch.schema)
        self._writer.write_batch(batch)
        self._pending = []

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ExampleSpool:
    """Examples written once, in order, then read back by position: pickled into Arrow files (`SpoolFile`, one
    after another) that are memory-mapped for reading, in a private temporary folder removed with the object (or
    at exit). Besides those it appends, it takes whole files written by others (`adopt`), in their place."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="qlora-examples-"))
        self._finalizer = weakref.finalize(self, _remove_folder, str(self.folder), os.getpid())
        self._parts: list[SpoolFile] = []  # finished, in order
        self._writing: SpoolFile | None = None
        self._closed = False
        self._batches: list[list[pa.Array]] | None = None  # each part's record batches, mapped when first read
        self._starts = np.zeros(1, dtype=np.int64)  # each part's first position, once closed
        self._digest_table: np.ndarray | None = None
        self.count = 0

    def append(self, example: Any) -> int:
        """Add an example; returns its position."""
        assert not self._closed, "the spool is closed"
        if self._writing is None:
            self._writing = SpoolFile.new(self.folder)
        self._writing.append(example)
        self.count += 1
        return self.count - 1

    def adopt(self, part: SpoolFile) -> None:
        """Add the examples of a closed `SpoolFile` in the spool's folder (another process's), after those added so far."""
        assert not self._closed, "the spool is closed"
        self._finish_writing()
        self._parts.append(part)
        self.count += part.count

    def _finish_writing(self) -> None:
        if self._writing is not None:
            self._writing.close()
            self._parts.append(self._writing)
            self._writing = None

    def close(self) -> "ExampleSpool":
        """Finish writing; the examples can then be read."""
        if not self._closed:
            self._finish_writing()
            self._parts = [part for part in self._parts if part.count]
            self._starts = np.cumsum([0] + [part.count for part in self._parts], dtype=np.int64)
            digests = b"".join(bytes(part.digests) for part in self._parts)
            self._digest_table = np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
            for part in self._parts:
                part.digests = bytearray()
            self._closed = True
        return self

    def digests(self, positions: np.ndarray) -> bytes:
        """The digests of the examples at `positions`, in that order, end to end (`digest_of`)."""
        assert self._closed, "the spool is still being written"
        return self._digest_table[positions].tobytes()

    def _mapped(self) -> list[list[pa.Array]]:
        assert self._closed, "the spool is still being written"
        if self._batches is None:
            self._batches = []
            for part in self._parts:
                reader = pa.ipc.open_file(pa.memory_map(str(part.path)))
                self._batches.append([reader.get_batch(i).column(0) for i in range(reader.num_record_batches)])
        return self._batches

    def release_pages(self) -> None:
        """Unmap the files until they are next read. A pass over every example (tokenizing) maps all of their
        pages, and mapped file pages count in the process's resident memory until unmapped: a third of a gigabyte
        for a million alpaca rows, held through training otherwise."""
        self._batches = None

    def __getitem__(self, position: int) -> Any:
        position = int(position)
        part = int(np.searchsorted(self._starts, position, side="right")) - 1
        batch, offset = divmod(position - int(self._starts[part]), SPOOL_BATCH_ROWS)
        return pickle.loads(self._mapped()[part][batch][offset].as_py())


class ExampleView(Sequence):
    """Examples of a spool at the given positions, in that order: a list that reads each example when asked."""

    def __init__(self, spool: ExampleSpool, positions: np.ndarray):
        self.spool = spool
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.spool[position] for position in self.positions[index]]
        return self.spool[self.positions[index]]

    def __iter__(self) -> Iterator[Any]:
        for position in self.positions:
            yield self.spool[position]

    def digests(self) -> bytes:
        """See `example_digests`."""
        return self.spool.digests(self.positions)

    def release_pages(self) -> None:
        """See `ExampleSpool.release_pages`."""
        self.spool.release_pages()

    def __repr__(self) -> str:
        return f"ExampleView({len(self)} examples)"


class TokenizedRows(Sequence):
    """Tokenized rows, memory-mapped: each row a dict of int lists, read when asked.

    Attributes:
        dataset: the `datasets.Dataset` over the Arrow file.
        lengths: each row's length as the training method counts it (`row_length`), an int32 array.
    """

    def __init__(self, dataset, lengths: np.ndarray, keep: Any = None):
        self.dataset = dataset
        self.lengths = lengths
        self._keep = keep  # a temporary folder that must live as long as the rows

    def __len__(self) -> int:
        return len(self.lengths)

    def _rows(self, columns: dict[str, list]) -> list[dict[str, list[int]]]:
        names = list(columns)
        return [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._rows(self.dataset[start:stop]) if stop > start else []
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return dict(self.dataset[int(index)])

    def __getitems__(self, indices: list[int]) -> list[dict[str, list[int]]]:
        """Several rows in one read (torch's data loader asks for a batch this way)."""
        return self._rows(self.dataset[[int(i) for i in indices]]) if len(indices) else []

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for start in range(0, len(self), CHUNK_ROWS):
            yield from self[start: start + CHUNK_ROWS]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenizedRows({len(self)} rows, columns {self.dataset.column_names})"


def lengths_of(method, rows) -> np.ndarray:
    """Each row's length: stored with the rows, or asked of the method row by row for a plain list."""
    stored = getattr(rows, "lengths", None)
    if stored is not None:
        return stored
    return np.array([method.row_length(row) for row in rows], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Tokenizing into the store

def merge_stats(total, part) -> None:
    """Add the statistics of one chunk to those of the chunks before it (in place)."""
    for item in fields(total):
        mine, theirs = getattr(total, item.name), getattr(part, item.name)
        if item.name == "longest":
            setattr(total, item.name, max(mine, theirs))
        elif isinstance(mine, list):
            mine.extend(theirs)
        else:
            setattr(total, item.name, mine + theirs)


@dataclass
class Chunk:
    """What tokenizing one chunk of examples gives: its rows as one record batch (None when all were
    dropped), their lengths, the statistics, or the problems that stopped it."""

    batch: pa.RecordBatch | None
    lengths: np.ndarray
    stats: Any
    problems: list[Problem] | None = None
    title: str | None = None


def _record_batch(rows: list[dict[str, list[int]]]) -> pa.RecordBatch | None:
    if not rows:
        return None
    names = list(rows[0])
    kind = pa.list_(pa.int32())
    return pa.record_batch([pa.array([row[name] for row in rows], type=kind) for name in names], names=names)


def tokenize_chunk(method, tokenizer, template: str, examples: Sequence, start: int, stop: int, options) -> Chunk:
    """The training method's tokenization of `examples[start:stop]`, in the form the store writes."""
    with collector_paused():
        return _tokenized(method, tokenizer, template, examples[start:stop], options)


def _tokenized(method, tokenizer, template: str, examples: list, options) -> Chunk:
    try:
        rows, stats = method.tokenize(tokenizer, template, examples, options)
    except UserError as error:  # returned, not raised: the parent raises it with every problem intact
        return Chunk(None, np.zeros(0, np.int32), None, error.problems, error.title)
    if isinstance(rows, pa.RecordBatch):
        return Chunk(rows if rows.num_rows else None, np.asarray(method.row_lengths(rows), dtype=np.int32), stats)
    lengths = np.fromiter((method.row_length(row) for row in rows), dtype=np.int32, count=len(rows))
    return Chunk(_record_batch(rows), lengths, stats)


_WORK: tuple | None = None  # (method, tokenizer, template, examples, options) of this worker process


def _start_worker(work: tuple) -> None:
    global _WORK
    _WORK = work


def _work_on(start: int, stop: int) -> Chunk:
    method, tokenizer, template, examples, options = _WORK
    return tokenize_chunk(method, tokenizer, template, examples, start, stop, options)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(rows: int) -> int:
    """Processes to tokenize `rows` examples with: every core this process may use, for enough rows."""
    return 1 if rows < PARALLEL_MIN_ROWS else max(1, min(usable_cores(), -(-rows // CHUNK_ROWS)))


@contextmanager
def collector_paused():
    """No cycle collection within. Reading and tokenizing a chunk makes a hundred thousand small objects (the
    examples, the tokens' character offsets) that die with the chunk, freed by their reference counts; the collector
    would walk them again and again meanwhile: an eighth of the tokenization time. What cycles a chunk leaves are
    collected after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def old_objects_frozen():
    """Python's cycle collector, run often while reading or tokenizing makes many small objects, otherwise walks at
    each full pass every object the process holds (the libraries' too): about a fifth of the tokenization time,
    an eighth of the reading. Frozen, they are skipped, in this process and in the workers forked from it (whose
    pages the walk would also copy)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _chunks(method, tokenizer, template: str, examples: Sequence, options) -> Iterator[tuple[int, Chunk]]:
    """(rows done, chunk) for every chunk of examples, in order; in worker processes where it pays."""
    bounds = [(start, min(start + CHUNK_ROWS, len(examples))) for start in range(0, len(examples), CHUNK_ROWS)]
    workers = worker_count(len(examples))
    if workers == 1:
        for start, stop in bounds:
            yield stop, tokenize_chunk(method, tokenizer, template, examples, start, stop, options)
        return
    # Fork where there is one: the workers inherit the tokenizer, the method and the spool without pickling.
    # The tokenizer's own thread pool would only compete with the other workers for the same cores.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=((method, tokenizer, template, examples, options),)) as pool:
            pending: deque = deque()
            queued = iter(bounds)
            for start, stop in queued:  # a bounded window of chunks in flight keeps memory flat
                pending.append((stop, pool.submit(_work_on, start, stop)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                stop, future = pending.popleft()
                chunk = future.result()
                following = next(queued, None)
                if following is not None:
                    pending.append((following[1], pool.submit(_work_on, *following)))
                yield stop, chunk
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def build(folder: Path, method, tokenizer, template: str, examples: Sequence, options, progress=None):
    """Tokenize `examples` into `folder` (rows.arrow, lengths.npy, stats.json); returns the statistics.

    Args:
        progress: called with the number of examples done so far, after each chunk.

    Raises:
        UserError: the chat template cannot render some examples (those of the first chunk that has any).
    """
    from .tokenize import TokenizeStats

    stats = TokenizeStats()
    lengths: list[np.ndarray] = []
    writer = None
    with pa.OSFile(str(folder / ROWS_FILE), "wb") as sink, old_objects_frozen():
        for done, chunk in _chunks(method, tokenizer, template, examples, options):
            if chunk.problems is not None:
                raise UserError(chunk.problems, title=chunk.title)
            merge_stats(stats, chunk.stats)
            lengths.append(chunk.lengths)
            if chunk.batch is not None:
                if writer is None:
                    writer = pa.ipc.new_stream(sink, chunk.batch.schema)
                writer.write_batch(chunk.batch)
            if progress is not None:
                progress(done)
        if writer is None:  # nothing kept: an empty file with the usual columns
            schema = pa.schema([(name, pa.list_(pa.int32())) for name in DEFAULT_COLUMNS])
            writer = pa.ipc.new_stream(sink, schema)
        writer.close()
    np.save(folder / LENGTHS_FILE, np.concatenate(lengths) if lengths else np.zeros(0, np.int32))
    (folder / STATS_FILE).write_text(json.dumps(asdict(stats)), encoding="utf-8")
    return stats


def load(folder: Path, keep: Any = None):
    """(rows, stats) of a built folder, memory-mapped; None if it is missing or incomplete."""
    from datasets import Dataset

    from .tokenize import TokenizeStats

    try:
        stats = TokenizeStats(**json.loads((folder / STATS_FILE).read_text(encoding="utf-8")))
        lengths = np.load(folder / LENGTHS_FILE, mmap_mode="r")
        dataset = Dataset.from_file(str(folder / ROWS_FILE))
    except (OSError, ValueError, TypeError, pa.ArrowException):
        return None
    if len(dataset) != len(lengths):
        return None
    return TokenizedRows(dataset, lengths, keep), stats


def tokenize_stored(method, tokenizer, template: str, examples: Sequence, options, folder: Path | None, key: str,
                    progress_factory=None):
    """The method's tokenization of `examples`, stored memory-mapped in `folder / key` (built there if absent;
    in a temporary folder when `folder` is None).

    Args:
        progress_factory: called with the number of examples when a build starts; returns a context manager
            whose value is called with the examples done so far (a progress bar).

    Returns:
        (rows, stats, cache_hit)
    """
    if folder is None:
        scratch = tempfile.TemporaryDirectory(prefix="qlora-tokenized-")
        stats = _build_with_progress(Path(scratch.name), method, tokenizer, template, examples, options, progress_factory)
        rows, stats = load(Path(scratch.name), keep=scratch)
        return rows, stats, False
    from filelock import FileLock

    target = folder / key
    folder.mkdir(parents=True, exist_ok=True)
    found = load(target)
    if found is not None:
        return (*found, True)
    # One process builds; the others (ranks of a distributed run, a run started meanwhile) wait, then map it.
    # The locks live beside the cache folder, so that it holds nothing but finished entries.
    locks = folder.with_name(folder.name + ".locks")
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{key}.lock")):
        found = load(target)
        if found is not None:
            return (*found, True)
        with staged(target) as staging:  # under the lock: what is there is unreadable, so replaced
            staging.mkdir(parents=True)
            _build_with_progress(staging, method, tokenizer, template, examples, options, progress_factory)
    found = load(target)
    assert found is not None, f"{target} was just written"
    return (*found, False)


def _build_with_progress(folder: Path, method, tokenizer, template, examples, options, progress_factory):
    if progress_factory is None:
        return build(folder, method, tokenizer, template, examples, options)
    with progress_factory(len(examples)) as progress:
        return build(folder, method, tokenizer, template, examples, options, progress)
