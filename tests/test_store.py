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
        assert _labels_of_batch(encoded, spans_of_texts, texts) == expected


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
        return str(spool.path) in Path("/proc/self/maps").read_text()

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
    assert str(datasets.train.spool.path) not in Path("/proc/self/maps").read_text()
    assert datasets.train[0].location == datasets.train[0].location  # still readable, mapped again
