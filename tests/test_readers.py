"""Raw rows and their exact locations from every supported file type; bad rows as problems, never exceptions."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora_cli.data.readers import SUPPORTED_SUFFIXES, Location, RawRows, read_hub, read_path
from qlora_cli.core.errors import Problem


def located(result: RawRows) -> list[tuple[int | None, int | None, object]]:
    """(line, row, value) of every row, for one-line comparisons."""
    return [(location.line, location.row, value) for location, value in result.rows]


def rendered(result: RawRows) -> list[str]:
    return [problem.render() for problem in result.problems]


def test_location_renders_a_line_or_a_row():
    assert Location("data/train.jsonl", line=12).problem("field `output` is empty").render() == (
        "data/train.jsonl:12: field `output` is empty"
    )
    assert Location("data/train.parquet", row=7).problem("missing field `messages`").render() == (
        "data/train.parquet: row 7: missing field `messages`"
    )
    assert Location("hub:org/name/sub:train", row=3).problem("bad").render() == "hub:org/name/sub:train: row 3: bad"
    assert str(Location("a.csv", line=12)) == "a.csv:12"
    assert str(Location("a.json", row=7)) == "a.json: row 7"
    assert Location("a.csv", line=2).problem("x") == Problem("x", file="a.csv", line=2)
    assert Location("a.json", row=2).problem("x") == Problem("x", file="a.json", key="row 2")


def test_jsonl_rows_keep_their_line_and_skip_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n[1, 2]\n', encoding="utf-8")
    result = read_path(path)
    assert located(result) == [(1, None, {"a": 1}), (4, None, {"a": 2}), (5, None, [1, 2])]
    assert result.problems == []
    assert result.rows[0][0] == Location(str(path), line=1)


def test_jsonl_bad_rows_are_all_reported_with_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"a": 1}\n'
        b'{"a": \n'
        b'{"a": "caf\xe9"}\n'
        + b"[" * 100_000 + b"\n"
        + b"1" * 5000 + b"\n"
        b'{"a": 2}\n'
    )
    result = read_path(path)
    assert located(result) == [(1, None, {"a": 1}), (6, None, {"a": 2})]
    assert [(problem.line, problem.message) for problem in result.problems] == [
        (2, "not valid JSON: Expecting value (column 7)"),
        (3, "not valid UTF-8"),
        (4, "not valid JSON: nested too deeply"),
        (5, result.problems[3].message),
    ]
    # Python refuses integers longer than its digit limit with a plain ValueError, not a JSON error.
    assert result.problems[3].message.startswith("not valid JSON: Exceeds the limit (4300 digits)")
    assert all(problem.file == str(path) for problem in result.problems)


def test_jsonl_tolerates_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert located(read_path(path)) == [(1, None, {"a": 1})]


def test_json_array_rows_are_numbered(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, "three"], indent=2), encoding="utf-8")
    result = read_path(path)
    assert located(result) == [(None, 1, {"a": 1}), (None, 2, {"a": 2}), (None, 3, "three")]
    assert result.problems == []


def test_json_object_with_one_list_of_rows(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": [{"a": 1}, {"a": 2}]}), encoding="utf-8")
    result = read_path(path)
    assert located(result) == [(None, 1, {"a": 1}), (None, 2, {"a": 2})]
    assert result.problems == []


@pytest.mark.parametrize(
    "document, reason",
    [
        ({"train": [], "test": []}, "got an object with several arrays: train, test"),
        ({"a": 1}, "got an object with no array (keys: a)"),
        ("text", "got a string"),
    ],
)
def test_json_documents_without_rows_are_one_problem(tmp_path, document, reason):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    result = read_path(path)
    assert result.rows == []
    assert rendered(result) == [
        f'{path}: expected an array of rows, or an object with one array of rows (like {{"data": [...]}}); {reason}'
    ]


def test_json_syntax_error_has_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]\n', encoding="utf-8")
    result = read_path(path)
    assert result.rows == []
    assert rendered(result) == [f"{path}:3: not valid JSON: Expecting value (column 9)"]


def test_json_lines_named_json_get_a_hint(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    assert rendered(read_path(path)) == [
        f"{path}:2: not valid JSON: Extra data (column 1); if the file has one JSON object per line, name it .jsonl"
    ]


def test_csv_row_after_a_multiline_field_has_the_line_it_starts_on(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(
        b"\xef\xbb\xbfinstruction,output\r\n"
        b'"Write a poem.","Roses\r\nare\r\nred"\r\n'
        b"\r\n"
        b"Add two and three.,\r\n"
        b"Only one field\r\n"
    )
    result = read_path(path)
    assert located(result) == [
        (2, None, {"instruction": "Write a poem.", "output": "Roses\r\nare\r\nred"}),
        (6, None, {"instruction": "Add two and three.", "output": ""}),
        (7, None, {"instruction": "Only one field"}),
    ]
    assert result.problems == []


def test_csv_bad_rows_are_reported_with_their_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'a,b\n1,2\n3,4,5\n"x\ny",caf\xe9\n6,7\n')
    result = read_path(path)
    assert located(result) == [(2, None, {"a": "1", "b": "2"}), (6, None, {"a": "6", "b": "7"})]
    assert rendered(result) == [
        f"{path}:3: 3 fields, but the header has 2 columns",
        f"{path}:4: not valid UTF-8",
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty; expected a header line with the column names"),
        (b"\n\n", "the file is empty; expected a header line with the column names"),
        (b"a,b,a\n1,2,3\n", "the header names a column more than once: `a`"),
    ],
)
def test_csv_without_a_usable_header_is_one_problem(tmp_path, content, message):
    path = tmp_path / "head.csv"
    path.write_bytes(content)
    result = read_path(path)
    assert result.rows == []
    assert [(problem.file, problem.message) for problem in result.problems] == [(str(path), message)]


def test_tsv_splits_on_tabs_only(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("instruction\toutput\nSay hi, politely.\tHello, friend.\n", encoding="utf-8")
    result = read_path(path)
    assert located(result) == [(2, None, {"instruction": "Say hi, politely.", "output": "Hello, friend."})]
    assert result.problems == []


def test_parquet_rows_are_numbered(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"a": "x", "n": 1}, {"a": "y", "n": 2}]), path)
    result = read_path(path)
    assert located(result) == [(None, 1, {"a": "x", "n": 1}), (None, 2, {"a": "y", "n": 2})]
    assert result.problems == []


def test_a_file_that_is_not_parquet_is_one_problem(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet", encoding="utf-8")
    result = read_path(path)
    assert result.rows == []
    assert len(result.problems) == 1
    assert result.problems[0].file == str(path)
    assert result.problems[0].message.startswith("cannot read as Parquet: ")


def test_a_folder_is_read_file_by_file_in_name_order(tmp_path):
    (tmp_path / "b.csv").write_text("a\nfrom csv\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"a": "from jsonl"}\n', encoding="utf-8")
    (tmp_path / "c.json").write_text('[{"a": "from json"}]', encoding="utf-8")
    (tmp_path / "README.md").write_text("# not data\n", encoding="utf-8")
    (tmp_path / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "deeper.jsonl").write_text('{"a": "nested"}\n', encoding="utf-8")
    result = read_path(tmp_path)
    assert [(location.file, str(location), value) for location, value in result.rows] == [
        (str(tmp_path / "a.jsonl"), f"{tmp_path / 'a.jsonl'}:1", {"a": "from jsonl"}),
        (str(tmp_path / "b.csv"), f"{tmp_path / 'b.csv'}:2", {"a": "from csv"}),
        (str(tmp_path / "c.json"), f"{tmp_path / 'c.json'}: row 1", {"a": "from json"}),
    ]
    assert result.problems == []


def test_an_empty_folder_is_one_problem(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here\n", encoding="utf-8")
    result = read_path(tmp_path)
    assert result.rows == []
    assert rendered(result) == [f"{tmp_path}: the folder has no data files; supported: {', '.join(SUPPORTED_SUFFIXES)}"]


def test_an_unsupported_suffix_is_one_problem(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n", encoding="utf-8")
    result = read_path(path)
    assert result.rows == []
    assert rendered(result) == [f"{path}: unsupported file type `.txt`; supported: .jsonl, .json, .csv, .tsv, .parquet"]


def test_a_missing_path_is_one_problem(tmp_path):
    path = tmp_path / "missing.jsonl"
    assert rendered(read_path(path)) == [f"{path}: no such file or folder"]


def test_a_hub_dataset_that_cannot_be_fetched_is_one_problem(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these variables once, at import: if anything imported them earlier without
    # the variables, only the module flags would keep this test off the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = read_hub("qlora-cli-tests/no-such-dataset", "sub", "train")
    assert result.rows == []
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert problem.file == "hub:qlora-cli-tests/no-such-dataset/sub:train"
    assert problem.message.startswith("cannot load the hub dataset: ")
    assert "qlora-cli-tests/no-such-dataset" in problem.message
    assert problem.message.endswith("(hub datasets need network access)")
