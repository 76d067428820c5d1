"""The stored data: examples spooled to disk, rows tokenized in chunks (in worker processes for large data) into a
memory-mapped Arrow file with their lengths beside it, built once however many processes ask for it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import ALPACA_ROWS, CHAT_ROWS, write_jsonl
from qlora_cli.core.recipe import DataSection
from qlora_cli.data import store
from qlora_cli.data.store import SPOOL_BATCH_ROWS, ExampleSpool
from qlora_cli.data.sources import load_datasets
from qlora_cli.data.tokenize import TokenizeOptions, tokenize_cached, tokenize_examples
from qlora_cli.train.methods import load_method


@pytest.fixture
def examples(tmp_path):
    """Many examples: the fixture rows repeated, with a few that are dropped as too long."""
    rows = (ALPACA_ROWS + CHAT_ROWS) * 60 + [{"instruction": "question " * 300, "output": "answer"}] * 3
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    return load_datasets(DataSection(train=[{"path": path}]), seed=0).train


def test_examples_are_read_from_the_spool_in_mixed_order(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"row {i}"} for i in range(10_000)])
    datasets = load_datasets(DataSection(train=[{"path": path, "weight": 1.5}], eval_size=100), seed=3)
    view = datasets.train
    assert isinstance(view, store.ExampleView) and len(view) == round(9_900 * 1.5)
    texts = [example.segments[0].text for example in view]
    assert texts[:3] == [e.segments[0].text for e in view[:3]] and view[-1].segments[0].text == texts[-1]
    assert len(set(texts)) == 9_900  # every kept row once, half of them twice
    assert not {e.segments[0].text for e in datasets.eval} & set(texts)


KEY_SCRIPT = """
import sys
from qlora_cli.core.recipe import DataSection
from qlora_cli.data.sources import load_datasets
from qlora_cli.data.tokenize import TokenizeOptions, cache_key
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
view = load_datasets(DataSection(train=[{"path": sys.argv[2], "weight": 1.5}], eval_size=2), seed=0).train
print(cache_key(tokenizer, tokenizer.chat_template, view, TokenizeOptions(max_seq_len=64), ""))
"""


def test_the_cache_key_hashes_the_examples_as_read_without_a_pass_over_them(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                            monkeypatch):
    from qlora_cli.data.tokenize import cache_key

    rows = ALPACA_ROWS + CHAT_ROWS
    path = write_jsonl(tmp_path / "a.jsonl", rows)

    def key_of(data_path, seed=0, tag="", process=False):
        if process:  # another interpreter, with its own hash seed
            env = {**os.environ, "PYTHONHASHSEED": "random"}
            return subprocess.run([sys.executable, "-c", KEY_SCRIPT, str(tiny_model_dir), str(data_path)], env=env,
                                  capture_output=True, text=True, check=True).stdout.strip()
        view = load_datasets(DataSection(train=[{"path": data_path, "weight": 1.5}], eval_size=2), seed=seed).train
        return cache_key(tiny_tokenizer, tiny_tokenizer.chat_template, view, TokenizeOptions(max_seq_len=64), tag)

    key = key_of(path)
    assert key == key_of(path, process=True)
    # The spool keeps each example's digest: the key reads no example back.
    monkeypatch.setattr(ExampleSpool, "__getitem__", lambda self, position: pytest.fail("an example was read"))
    assert key_of(path) == key
    monkeypatch.undo()
    changed = [dict(rows[0], output=rows[0]["output"] + "!"), *rows[1:]]
    assert key_of(write_jsonl(tmp_path / "b.jsonl", changed)) != key
    assert key_of(path, seed=1) != key  # other rows held out, another order
    assert key_of(path, tag="kto") != key
    # A list of the same examples has the same key as the spool's view of them.
    view = load_datasets(DataSection(train=[{"path": path, "weight": 1.5}], eval_size=2), seed=0).train
    options = TokenizeOptions(max_seq_len=64)
    assert cache_key(tiny_tokenizer, tiny_tokenizer.chat_template, list(view), options, "") == key


def test_rows_are_stored_memory_mapped_with_their_lengths(tiny_tokenizer, examples, tmp_path):
    method = load_method("sft")
    options = TokenizeOptions(max_seq_len=128)
    expected, expected_stats = tokenize_examples(tiny_tokenizer, tiny_tokenizer.chat_template, list(examples), options)
    rows, stats, hit = tokenize_cached(method, tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, tmp_path / "c")
    assert not hit and isinstance(rows, store.TokenizedRows)
    assert rows.dataset.cache_files and rows.dataset.cache_files[0]["filename"].endswith(store.ROWS_FILE)
    assert rows == expected and stats == expected_stats and stats.dropped_no_trained_tokens == 3
    assert rows.lengths.tolist() == [len(row["input_ids"]) for row in expected]
    assert rows.__getitems__([5, 0]) == [expected[5], expected[0]] and rows[-1] == expected[-1]


def test_worker_processes_give_the_rows_of_one_process(tiny_tokenizer, examples, tmp_path, monkeypatch):
    method = load_method("sft")
    options = TokenizeOptions(max_seq_len=128)
    alone, alone_stats, _ = tokenize_cached(method, tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, None)
    monkeypatch.setattr(store, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(store, "CHUNK_ROWS", 50)
    monkeypatch.setattr(store, "usable_cores", lambda: 2)  # two workers even on a one-core machine
    assert store.worker_count(len(examples)) == 2
    done = []
    factory = store_progress(done)
    rows, stats, _ = tokenize_cached(method, tiny_tokenizer, tiny_tokenizer.chat_template, examples, options,
                                     tmp_path / "c", progress_factory=factory)
    assert rows == alone and stats == alone_stats
    assert done == list(range(50, len(examples), 50)) + [len(examples)]


def store_progress(done: list[int]):
    from contextlib import contextmanager

    @contextmanager
    def factory(total):
        yield done.append

    return factory


def test_a_template_error_in_a_worker_names_the_rows(tiny_tokenizer, examples, tmp_path, monkeypatch):
    from qlora_cli.core.errors import UserError

    monkeypatch.setattr(store, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(store, "CHUNK_ROWS", 50)
    monkeypatch.setattr(store, "usable_cores", lambda: 2)
    broken = "{{ messages[0]['content'] | no_such_filter }}"
    with pytest.raises(UserError) as error:
        tokenize_cached(load_method("sft"), tiny_tokenizer, broken, examples, TokenizeOptions(max_seq_len=64), None)
    assert "cannot be rendered" in error.value.render() and "many.jsonl:1" in error.value.render()


def test_one_process_builds_and_the_others_wait_and_map_it(tiny_tokenizer, examples, tmp_path):
    method = load_method("sft")
    options = TokenizeOptions(max_seq_len=128)
    start = threading.Barrier(3)
    results = []

    def rank() -> None:
        start.wait()
        results.append(tokenize_cached(method, tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, tmp_path / "c"))

    ranks = [threading.Thread(target=rank) for _ in range(3)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join()
    assert sorted(hit for _, _, hit in results) == [False, True, True]
    assert results[0][0] == results[1][0] == results[2][0]
    assert [entry.name for entry in (tmp_path / "c").iterdir()] == [results[0][0].dataset.cache_files[0]["filename"].split("/")[-2]]


def test_an_incomplete_entry_is_built_again(tiny_tokenizer, examples, tmp_path):
    method = load_method("sft")
    options = TokenizeOptions(max_seq_len=128)
    first, _, _ = tokenize_cached(method, tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, tmp_path / "c")
    entry = next((tmp_path / "c").iterdir())
    (entry / store.LENGTHS_FILE).unlink()
    again, _, hit = tokenize_cached(method, tiny_tokenizer, tiny_tokenizer.chat_template, examples, options, tmp_path / "c")
    assert not hit and again == first


def test_stats_of_chunks_add_up():
    from qlora_cli.data.tokenize import TokenizeStats

    total = TokenizeStats(examples=2, tokens=10, longest=7, dropped_rows=["a:1"])
    store.merge_stats(total, TokenizeStats(examples=1, tokens=5, longest=4, truncated=1, dropped_rows=["a:9"]))
    assert total == TokenizeStats(examples=3, tokens=15, longest=7, truncated=1, dropped_rows=["a:1", "a:9"])
    assert json.loads(json.dumps(total.__dict__))["dropped_rows"] == ["a:1", "a:9"]
    assert np.array_equal(store.lengths_of(load_method("sft"), [{"input_ids": [1, 2]}]), [2])


def test_a_streamed_hub_split_is_read_row_by_row(monkeypatch):
    import datasets

    asked = {}

    def load_dataset(name, subset, split, streaming=False):
        asked.update(name=name, subset=subset, split=split, streaming=streaming)
        return iter([{"text": "first"}, {"colour": "none"}, {"text": "third"}])  # an IterableDataset iterates so

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = DataSection(train=[{"hub": "org/name", "streaming": True}], on_bad_row="skip")
    loaded = load_datasets(data, seed=0)
    assert asked == {"name": "org/name", "subset": None, "split": "train", "streaming": True}
    assert [e.segments[0].text for e in loaded.train] == ["first", "third"]
    assert [p.render() for p in loaded.skipped][0].startswith("hub:org/name:train: row 2: ")


def test_streaming_a_local_file_is_refused(tmp_path, capsys):
    from qlora_cli.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  base: org/model\ndata:\n  train:\n    - path: a.jsonl\n      streaming: true\n")
    with pytest.raises(SystemExit) as exited:
        main(["data", "preview", str(recipe)])
    assert exited.value.code == 2
    assert "`streaming` reads hub datasets" in capsys.readouterr().err


def test_labels_found_at_once_follow_the_token_by_token_rule():
    import random

    from qlora_cli.data.tokenize import IGNORE_INDEX, _labels_of_batch, _overlaps

    rng = random.Random(0)
    for _ in range(200):
        texts, encoded, spans_of_texts = [], [], []
        for _ in range(rng.randint(1, 4)):
            length = rng.randint(0, 40)
            cuts = sorted(rng.sample(range(length + 1), min(length + 1, rng.randint(0, 8))))
            spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
            offsets = []
            for _ in range(rng.randint(0, 20)):
                begin = rng.randint(0, length)
                offsets.append((begin, min(length, begin + rng.choice([0, 1, 2, 5]))))  # empty tokens too
            ids = [rng.randint(0, 99) for _ in offsets]
            texts.append(length), encoded.append((ids, offsets)), spans_of_texts.append(spans)
        expected = [
            [t if any(_overlaps(b, f, s, e) for s, e in spans) else IGNORE_INDEX for t, (b, f) in zip(ids, offsets)]
            for (ids, offsets), spans in zip(encoded, spans_of_texts)
        ]
        assert _labels_of_batch(encoded, spans_of_texts, texts).tolist() == [label for labels in expected for label in labels]


def test_a_large_tokenization_shows_its_rows_per_second():
    import io

    from rich.console import Console

    from qlora_cli.data.prepare import tokenizing_progress

    log = io.StringIO()
    console = Console(file=log, force_terminal=False)
    with tokenizing_progress(console, "Tokenizing")(store.PROGRESS_MIN_ROWS) as progress:
        progress(store.PROGRESS_MIN_ROWS // 2)
        progress(store.PROGRESS_MIN_ROWS)
    assert "Tokenizing: 10,000/10,000 (100%)" in log.getvalue() and "rows/s" in log.getvalue()
    quiet = io.StringIO()
    with tokenizing_progress(Console(file=quiet), "Tokenizing")(store.PROGRESS_MIN_ROWS - 1) as progress:
        progress(store.PROGRESS_MIN_ROWS - 1)
    assert quiet.getvalue() == ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_releasing_the_spool_unmaps_its_file_and_reading_maps_it_again():
    spool = ExampleSpool()
    for number in range(3 * SPOOL_BATCH_ROWS):
        spool.append({"number": number})
    spool.close()

    def mapped() -> bool:
        return str(spool.folder) in Path("/proc/self/maps").read_text()

    assert not mapped()
    assert [spool[p]["number"] for p in range(0, 3 * SPOOL_BATCH_ROWS, 999)] == list(range(0, 3 * SPOOL_BATCH_ROWS, 999))
    assert mapped()
    spool.release_pages()
    gc.collect()
    assert not mapped()
    assert spool[SPOOL_BATCH_ROWS + 7] == {"number": SPOOL_BATCH_ROWS + 7}
    assert mapped()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_preparing_the_data_leaves_no_spooled_example_mapped(tiny_tokenizer, tiny_recipe, tmp_path, monkeypatch):
    # Training runs after `prepare`: pages of the spool still mapped then would count in its resident memory.
    from qlora_cli.core.recipe import load_recipe
    from qlora_cli.data.prepare import prepare

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(tiny_recipe, ["data.eval_size=2"])
    method = load_method("sft")
    datasets = load_datasets(recipe.data, recipe.training.seed, method.read_row)
    prepared = prepare(recipe, tiny_tokenizer, tiny_tokenizer.chat_template, datasets, method)
    assert prepared.train_stats.examples == len(datasets.train) and len(prepared.eval) == 2
    gc.collect()
    assert str(datasets.train.spool.folder) not in Path("/proc/self/maps").read_text()
    assert datasets.train[0].location == datasets.train[0].location  # still readable, mapped again


def _length_policy_one_row_at_a_time(rows, options, bos_id):
    """The length policy as it reads, one row at a time: the reference the arrays must agree with."""
    from qlora_cli.data.tokenize import IGNORE_INDEX, TokenizeStats

    stats, kept = TokenizeStats(), []
    for index, (input_ids, labels) in enumerate(rows):
        limit = options.max_seq_len
        if len(input_ids) > limit:
            if options.truncation == "drop":
                stats.dropped_too_long += 1
                stats.dropped_rows.append(f"row {index}")
                continue
            stats.truncated += 1
            if options.truncation == "left":
                head = 1 if bos_id is not None and input_ids[0] == bos_id else 0
                input_ids = input_ids[:head] + input_ids[len(input_ids) - (limit - head):]
                labels = labels[:head] + labels[len(labels) - (limit - head):]
            else:
                input_ids, labels = input_ids[:limit], labels[:limit]
        trained = len(labels) - labels.count(IGNORE_INDEX)
        if trained == 0:
            stats.dropped_no_trained_tokens += 1
            stats.dropped_rows.append(f"row {index}")
            continue
        kept.append({"input_ids": input_ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(input_ids)
        stats.trained_tokens += trained
        stats.longest = max(stats.longest, len(input_ids))
    return kept, stats


def test_the_length_policy_on_arrays_cuts_and_drops_as_row_by_row():
    import random

    from qlora_cli.data.tokenize import IGNORE_INDEX, EncodedTexts, rows_by_length_policy

    rng = random.Random(0)
    bos = 1
    for trial in range(300):
        rows = []
        for _ in range(rng.randint(0, 6)):
            length = rng.randint(0, 12)
            ids = [rng.choice([bos, 5, 6, 7]) if position == 0 else rng.randint(2, 9) for position in range(length)]
            trained_from = rng.randint(0, length + 1)
            rows.append((ids, [IGNORE_INDEX if position < trained_from else token for position, token in enumerate(ids)]))
        options = TokenizeOptions(max_seq_len=rng.randint(1, 10), truncation=rng.choice(["right", "left", "drop"]))
        bos_id = rng.choice([bos, None])
        starts = np.cumsum([0] + [len(ids) for ids, _ in rows]).astype(np.int64)
        encoded = EncodedTexts(np.array([t for ids, _ in rows for t in ids], dtype=np.int64),
                               np.array([t for _, labels in rows for t in labels], dtype=np.int64), starts)
        batch, stats = rows_by_length_policy(encoded, options, bos_id, [f"row {i}" for i in range(len(rows))])
        expected, expected_stats = _length_policy_one_row_at_a_time(rows, options, bos_id)
        assert batch.to_pylist() == expected and stats == expected_stats, (trial, rows, options, bos_id)
        assert batch.schema.field("input_ids").type == pa.list_(pa.int32())


def test_bos_is_put_first_once_where_a_text_lacks_it():
    from qlora_cli.data.tokenize import IGNORE_INDEX, EncodedTexts, _with_bos

    rows = [([], []), ([1, 5], [IGNORE_INDEX, 5]), ([5, 6], [5, 6]), ([7], [IGNORE_INDEX])]
    encoded = EncodedTexts(np.array([t for ids, _ in rows for t in ids], dtype=np.int64),
                           np.array([t for _, labels in rows for t in labels], dtype=np.int64),
                           np.cumsum([0] + [len(ids) for ids, _ in rows]).astype(np.int64))
    assert _with_bos(encoded, 1).rows() == [
        ([1], [IGNORE_INDEX]), ([1, 5], [IGNORE_INDEX, 5]), ([1, 5, 6], [IGNORE_INDEX, 5, 6]), ([1, 7], [IGNORE_INDEX, IGNORE_INDEX])]


def test_a_large_jsonl_file_read_in_pieces_gives_the_examples_and_problems_of_one_reader(tmp_path, monkeypatch):
    from qlora_cli.core.errors import UserError
    from qlora_cli.data import sources

    lines = []
    for number in range(1, 400):
        if number % 97 == 0:
            lines.append("{not json")
        elif number % 89 == 0:
            lines.append("")  # blank: skipped, but counted in the line numbers
        elif number % 83 == 0:
            lines.append(json.dumps({"instruction": "no output"}))
        else:
            lines.append(json.dumps({"instruction": f"question {number}", "output": f"answer {number}"}))
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # a byte-order mark, and no final newline

    def read(workers: int):
        monkeypatch.setattr(sources, "reading_workers", lambda source: workers)
        data = DataSection(train=[{"path": tmp_path / "small.jsonl"}, {"path": path}, {"path": tmp_path / "small.jsonl"}],
                           on_bad_row="skip")
        return load_datasets(data, seed=0)

    write_jsonl(tmp_path / "small.jsonl", ALPACA_ROWS)
    one = read(1)
    for workers in (2, 3, 7):
        pieces = read(workers)
        assert [(e.location, e.messages) for e in pieces.train] == [(e.location, e.messages) for e in one.train]
        assert pieces.skipped == one.skipped and len(one.skipped) == 8
        assert pieces.train.digests() == one.train.digests()
    assert [str(problem.line) for problem in one.skipped][:2] == ["83", "97"]
    monkeypatch.setattr(sources, "reading_workers", lambda source: 3)
    with pytest.raises(UserError) as raised:
        load_datasets(DataSection(train=[{"path": path}]), seed=0)
    assert "8 bad data row(s)" in str(raised.value)


def test_pieces_of_a_jsonl_file_are_whole_lines_numbered_from_where_they_start(tmp_path, monkeypatch):
    from qlora_cli.data import readers

    monkeypatch.setattr(readers, "NEWLINE_COUNT_BYTES", 7)  # newlines counted across several blocks
    for text in ["a\nbb\nccc\n\ndddd\neeeee", "a\n", "", "one line without a newline", "x\n" * 50]:
        path = tmp_path / "f.jsonl"
        path.write_text(text)
        for count in (1, 2, 3, 8):
            pieces = readers.jsonl_pieces(path, count)
            assert pieces[0][0] == 0 and pieces[-1][1] == len(text) and len(pieces) <= count
            for (start, stop, first), (following, _, _) in zip(pieces, pieces[1:] + [(len(text), 0, 0)]):
                assert stop == following and (start == 0 or text[start - 1] == "\n")
                assert first == text[:start].count("\n") + 1


def test_only_a_large_local_jsonl_file_is_read_by_several_processes(tmp_path, monkeypatch):
    from qlora_cli.core.recipe import DataSource
    from qlora_cli.data import sources

    monkeypatch.setattr(sources, "usable_cores", lambda: 4)
    monkeypatch.setattr(sources, "PARALLEL_READ_MIN_BYTES", 500)
    large = write_jsonl(tmp_path / "large.jsonl", ALPACA_ROWS * 3)
    small = write_jsonl(tmp_path / "small.jsonl", ALPACA_ROWS[:1])
    (tmp_path / "large.csv").write_text("instruction,output\n" + "q,a\n" * 200)
    assert sources.reading_workers(DataSource(path=large)) == 4
    assert sources.reading_workers(DataSource(path=small)) == 1
    assert sources.reading_workers(DataSource(path=tmp_path / "large.csv")) == 1
    assert sources.reading_workers(DataSource(path=tmp_path)) == 1  # a folder: its files one after another
    assert sources.reading_workers(DataSource(hub="org/name")) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine, each reading its copy
    assert sources.reading_workers(DataSource(path=large)) == 2
