"""Raw rows from local files, folders and hub datasets, each with the exact place it came from.

Nothing here raises for bad content: an unreadable row or file becomes a `Problem`, so that every bad
row of every file is reported in one run, before any model loads. Checking what a row means (its
format, its columns) is the caller's job; these readers only parse.
"""

from __future__ import annotations

import csv
import io
import json
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..core.errors import Problem

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
PARQUET_BATCH_ROWS = 4096
NEWLINE_COUNT_BYTES = 16 * 2**20  # read at once to find where a piece of a file starts

# Bytes that are not UTF-8 survive decoding with `surrogateescape` as these lone surrogates, which is
# how a bad CSV row is found and reported without giving up on the rest of the file.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class Location:
    """Where a row is: a line of a line-based file, or a row of a row-based source.

    Attributes:
        file: the path as given, or `hub:org/name[/subset]:split` for a hub dataset.
        line: 1-based line number, for `.jsonl`, `.csv` and `.tsv` files.
        row: 1-based row number, for `.json` arrays, `.parquet` files and hub datasets.
    """

    file: str
    line: int | None = None
    row: int | None = None

    def problem(self, message: str) -> Problem:
        """A problem at this location, rendered as `file:12: message` or `file: row 7: message`."""
        if self.line is not None:
            return Problem(message, file=self.file, line=self.line)
        if self.row is not None:
            return Problem(message, file=self.file, key=f"row {self.row}")
        return Problem(message, file=self.file)

    def __str__(self) -> str:
        return self.problem("").location()


@dataclass
class RawRows:
    """Parsed rows in source order, and one problem per row or file that could not be parsed.

    Rows are usually dicts; other JSON values are kept so that the caller reports them with the rest.
    """

    rows: list[tuple[Location, object]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _supported() -> str:
    return ", ".join(SUPPORTED_SUFFIXES)


def json_type_name(value: object) -> str:
    """What JSON calls the type of a value `json.loads` returned: object, array, string, number, boolean, null."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parse_json(text: str) -> tuple[Any, str | None, int | None]:
    """`(value, None, None)`, or `(None, reason, line)` when `text` is not JSON Python can load.

    Besides syntax errors, `json.loads` raises RecursionError for deeply nested values and a plain
    ValueError for integers longer than Python's digit limit; both are bad content, not bugs.
    """
    try:
        return json.loads(text), None, None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})", exc.lineno
    except RecursionError:
        return None, "not valid JSON: nested too deeply", None
    except ValueError as exc:
        return None, f"not valid JSON: {exc}", None


def _read_bytes(path: Path, name: str, result: RawRows) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        result.problems.append(Problem(f"cannot read: {exc.strerror or exc}", file=name))
        return None


def _read_jsonl(path: Path, name: str) -> RawRows:
    """One row per non-blank line; one problem per line that is not UTF-8 or not JSON."""
    return _collect(_iter_jsonl(path, name))


def _jsonl_line(raw_line: bytes, number: int, name: str) -> tuple[Location, object] | Problem | None:
    """The row of one line of a JSON Lines file, the problem with it, or None for a blank line."""
    try:
        # A byte-order mark is invisible in editors, so one at the start must not fail line 1.
        line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError:
        return Problem("not valid UTF-8", file=name, line=number)
    if not line.strip():
        return None
    value, reason, _ = _parse_json(line)
    if reason is not None:
        return Problem(reason, file=name, line=number)
    return Location(name, line=number), value


def _iter_jsonl(path: Path, name: str) -> Iterator[tuple[Location, object] | Problem]:
    """The rows and problems of a JSON Lines file in file order, a line at a time (memory does not grow with
    the file)."""
    return iter_jsonl_piece(path, name, 0, None, 1)


def iter_jsonl_piece(path: Path, name: str, start: int, stop: int | None, first_line: int
                     ) -> Iterator[tuple[Location, object] | Problem]:
    """`_iter_jsonl` of the lines that start in bytes [start, stop) of the file (to its end for None); `start` is
    a line's start, and `first_line` that line's number."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        yield Problem(f"cannot read: {exc.strerror or exc}", file=name)
        return
    with handle:
        handle.seek(start)
        position = start
        for number, raw_line in enumerate(handle, start=first_line):
            if stop is not None and position >= stop:
                break
            position += len(raw_line)
            item = _jsonl_line(raw_line.rstrip(b"\n"), number, name)
            if item is not None:
                yield item


def jsonl_pieces(path: Path, pieces: int) -> list[tuple[int, int, int]]:
    """(start, stop, first line's number) of up to `pieces` consecutive byte ranges of a JSON Lines file of about
    equal size, each made of whole lines. The file is memory-mapped and its newlines counted a block at a time."""
    size = path.stat().st_size
    if size == 0:
        return [(0, 0, 1)]
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cuts = [0]
        for index in range(1, pieces):
            cut = data.find(b"\n", max(cuts[-1], size * index // pieces)) + 1  # just after a newline
            if 0 < cut < size:
                cuts.append(cut)
        cuts.append(size)
        firsts = [1]
        for start, stop in zip(cuts, cuts[1:-1]):
            lines = sum(data[block: min(block + NEWLINE_COUNT_BYTES, stop)].count(b"\n")
                        for block in range(start, stop, NEWLINE_COUNT_BYTES))
            firsts.append(firsts[-1] + lines)
    return list(zip(cuts, cuts[1:], firsts))


def jsonl_rows(data: bytes, name: str) -> RawRows:
    """The rows of JSON Lines `data` read from the file `name`: one per non-blank line, one problem per
    line that is not UTF-8 or not JSON."""
    result = RawRows()
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        item = _jsonl_line(raw_line, number, name)
        if isinstance(item, Problem):
            result.problems.append(item)
        elif item is not None:
            result.rows.append(item)
    return result


def _rows_of_document(document: Any) -> tuple[list | None, str | None]:
    """The list of rows a whole-file JSON document holds, or why it holds none."""
    if isinstance(document, list):
        return document, None
    expected = 'expected an array of rows, or an object with one array of rows (like {"data": [...]})'
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) == 1:
            return document[lists[0]], None
        if lists:
            return None, f"{expected}; got an object with several arrays: {', '.join(lists)}"
        keys = ", ".join(document) or "none"
        return None, f"{expected}; got an object with no array (keys: {keys})"
    return None, f"{expected}; got a {json_type_name(document)}"


def _read_json(path: Path, name: str) -> RawRows:
    """The rows of a whole-file JSON document, numbered from 1; one problem if it is not such a document."""
    result = RawRows()
    data = _read_bytes(path, name, result)
    if data is None:
        return result
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        result.problems.append(Problem("not valid UTF-8", file=name, line=line))
        return result
    document, reason, line = _parse_json(text)
    if reason is not None:
        if reason.startswith("not valid JSON: Extra data"):
            # The usual cause: JSON Lines saved with a .json name.
            reason += "; if the file has one JSON object per line, name it .jsonl"
        result.problems.append(Problem(reason, file=name, line=line))
        return result
    rows, reason = _rows_of_document(document)
    if rows is None:
        result.problems.append(Problem(reason, file=name))
        return result
    result.rows = [(Location(name, row=number), value) for number, value in enumerate(rows, start=1)]
    return result


def _read_delimited(path: Path, name: str, delimiter: str) -> RawRows:
    """CSV or TSV rows as dicts keyed by the header; each row's line is the line it starts on.

    A row with fewer fields than the header lacks the missing keys (they are absent, not None);
    empty cells stay "". A row with more fields than the header, or with bytes that are not UTF-8,
    is a problem.
    """
    result = RawRows()
    data = _read_bytes(path, name, result)
    if data is None:
        return result
    text = data.decode("utf-8-sig", errors="surrogateescape")
    # Plain csv.reader rather than DictReader: DictReader skips blank lines inside next(), which
    # would hide where a row starts. The dicts are built here the way DictReader builds them.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    kind = "TSV" if delimiter == "\t" else "CSV"
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            result.problems.append(Problem(f"cannot read this {kind} row: {exc}", file=name, line=start))
            continue
        if not fields:
            continue
        if any(_ESCAPED_BYTE.search(value) for value in fields):
            result.problems.append(Problem("not valid UTF-8", file=name, line=start))
            if header is None:
                return result
            continue
        if header is None:
            duplicates = sorted({column for column in fields if fields.count(column) > 1})
            if duplicates:
                named = ", ".join(f"`{column}`" for column in duplicates)
                result.problems.append(Problem(f"the header names a column more than once: {named}", file=name, line=start))
                return result
            header = fields
            continue
        if len(fields) > len(header):
            result.problems.append(
                Problem(f"{len(fields)} fields, but the header has {len(header)} columns", file=name, line=start)
            )
            continue
        result.rows.append((Location(name, line=start), dict(zip(header, fields))))
    if header is None and not result.problems:
        result.problems.append(Problem("the file is empty; expected a header line with the column names", file=name))
    return result


def _read_parquet(path: Path, name: str) -> RawRows:
    """Every row of a Parquet file as a dict, numbered from 1; one problem if the file cannot be read."""
    return _collect(_iter_parquet(path, name))


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[Location, object] | Problem]:
    """The rows of a Parquet file, a record batch at a time; one problem if the file cannot be read."""
    import pyarrow.parquet as pq  # here, not at the top: it is slow to import and only Parquet needs it

    number = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield Location(name, row=number), row
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid and others for a bad file
        if number == 0:
            yield Problem(f"cannot read as Parquet: {exc}", file=name)
        else:
            yield Problem(f"cannot read as Parquet after row {number}: {exc}", file=name)


def _collect(items: Iterable[tuple[Location, object] | Problem]) -> RawRows:
    result = RawRows()
    for item in items:
        if isinstance(item, Problem):
            result.problems.append(item)
        else:
            result.rows.append(item)
    return result


def _iter_file(path: Path) -> Iterator[tuple[Location, object] | Problem]:
    """A file's rows and problems in file order. JSON Lines and Parquet are read a line or a batch at a time;
    a whole-file JSON document, CSV and TSV are read whole, then yielded."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, str(path))
    elif suffix == ".parquet":
        yield from _iter_parquet(path, str(path))
    else:
        raw = _read_file(path)
        yield from raw.problems
        yield from raw.rows


def _read_file(path: Path) -> RawRows:
    name = str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, name)
    if suffix == ".json":
        return _read_json(path, name)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, name, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path, name)
    what = f"file type `{path.suffix}`" if path.suffix else "file without an extension"
    return RawRows(problems=[Problem(f"unsupported {what}; supported: {_supported()}", file=name)])


def read_path(path: Path) -> RawRows:
    """The rows of a data file, or of every supported file directly inside a folder, in name order.

    Folders are not searched recursively, and hidden files (like macOS `._name.jsonl`) are skipped.
    Never raises for bad content or a missing or unreadable path: those are problems.
    """
    return _collect(iter_path(path))


def iter_path(path: Path) -> Iterator[tuple[Location, object] | Problem]:
    """`read_path`'s rows and problems one at a time, in file order (a problem before the row that follows it):
    JSON Lines and Parquet files are never held whole in memory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            (child for child in path.iterdir()
             if child.is_file() and not child.name.startswith(".") and child.suffix.lower() in SUPPORTED_SUFFIXES),
            key=lambda child: child.name,
        )
        if not files:
            yield Problem(f"the folder has no data files; supported: {_supported()}", file=str(path))
        for child in files:
            yield from _iter_file(child)
        return
    if not path.exists():
        yield Problem("no such file or folder", file=str(path))
        return
    suffix = path.suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        yield from _iter_file(path)
    else:
        yield from _read_file(path).problems


def _hub_name(name: str, subset: str | None, split: str) -> str:
    """`hub:org/name[/subset]:split`, the file name that locations in a hub dataset carry."""
    return f"hub:{name}" + (f"/{subset}" if subset else "") + f":{split}"


def read_hub(name: str, subset: str | None, split: str) -> RawRows:
    """Every row of a hub dataset's split, numbered from 1; one problem if it cannot be loaded.

    Loading needs network access unless the dataset is already in the local Hugging Face cache.
    """
    return _collect(iter_hub(name, subset, split))


def iter_hub(name: str, subset: str | None, split: str, streaming: bool = False) -> Iterator[tuple[Location, object] | Problem]:
    """`read_hub`'s rows one at a time (the split is memory-mapped by `datasets`, or, with `streaming`, read
    over the network as it is used, never stored whole on disk); one problem if it cannot be loaded."""
    source = _hub_name(name, subset, split)
    number = 0
    try:
        import datasets  # here, not at the top: it is slow to import and only hub sources need it

        dataset = datasets.load_dataset(name, subset, split=split, streaming=streaming)
        for row in dataset:
            number += 1
            yield Location(source, row=number), row
    except Exception as exc:  # offline, no such dataset, subset or split, gated, ...: the reason is in the message
        reason = str(exc).strip() or type(exc).__name__
        after = f" after row {number}" if number else ""
        yield Problem(f"cannot load the hub dataset{after}: {reason} (hub datasets need network access)", file=source)
