"""Fuzzing the inputs users write: recipes, --set flags, data rows and files, judgment files.

Random and mutated inputs must always give a valid result or a `UserError` (exit code 2 with a
message) — never another exception, a hang or a partial output. The seed is fixed (derandomize) so CI
sees the same cases every run.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_cli.data.formats import RowError, to_example
from qlora_cli.data.readers import Location, read_path
from qlora_cli.core.errors import UserError
from qlora_cli.evaluation.judgments import read_judgments
from qlora_cli.core.recipe import Recipe, load_recipe

CASES = settings(
    max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)

VALID_RECIPE = {
    "model": {"base": "org/model"},
    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}], "max_seq_len": 128, "packing": True},
    "training": {"learning_rate": 1e-4, "batch_size": 2, "max_steps": 3, "warmup": 0.1},
    "output": {"dir": "run"},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
yaml_scalars = st.sampled_from(
    ["", "~", "null", "yes", "no", "1e-4", "2.0e-4", "-1", "0", "[", "]", "{", "}", ":", "- a", "!!python/object:os.system",
     "&a [*a]", "*a", "'", '"', "\t", "\x00", "@", "%YAML 1.1", "---", "...", "? a", "<<: *b", "r: 64", "all-linear"]
)


def mutate(text: str, rng: random.Random) -> str:
    """Delete, duplicate, swap or insert characters and YAML tokens in a valid recipe."""
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(len(chars) + 1)
        action = rng.randrange(4)
        if action == 0 and chars:
            del chars[min(position, len(chars) - 1)]
        elif action == 1:
            chars.insert(position, rng.choice(string.printable))
        elif action == 2:
            token = rng.choice([": ", "\n  ", "- ", "[", "]", "{", "}", "'", "&x ", "*x", "!!str ", "\t", "#"])
            chars[position:position] = list(token)
        elif chars:
            other = rng.randrange(len(chars))
            a = min(position, len(chars) - 1)
            chars[a], chars[other] = chars[other], chars[a]
    return "".join(chars)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return folder


def load_or_user_error(path: Path, overrides=()) -> Recipe | None:
    try:
        return load_recipe(path, list(overrides))
    except UserError as error:
        assert error.problems and all(p.message for p in error.problems)
        error.render()
        return None


@CASES
@given(st.integers(0, 2**32 - 1))
def test_mutated_recipes_never_crash(folder, seed):
    text = yaml.safe_dump(VALID_RECIPE, sort_keys=False)
    path = folder / "recipe.yaml"
    path.write_text(mutate(text, random.Random(seed)), encoding="utf-8")
    load_or_user_error(path)


@CASES
@given(st.lists(st.tuples(st.sampled_from(["model", "lora", "data", "training", "r", "base", "train", 0, 1, True, None]),
                          yaml_scalars | st.text(max_size=8)), max_size=6))
def test_random_yaml_documents_never_crash(folder, pairs):
    path = folder / "recipe.yaml"
    path.write_text("\n".join(f"{key}: {value}" for key, value in pairs), encoding="utf-8")
    load_or_user_error(path)


@CASES
@given(st.lists(st.text(max_size=40) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["training.learning_rate", "lora.r", "data.train.0.path", "data.train.5.format", "lora.target_modules",
     "model", "training", "quantization.bits", "x.y.z", "data.train.0", "output.dir"]), yaml_scalars | st.text(max_size=10)),
    max_size=4))
def test_set_overrides_never_crash(folder, overrides):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(VALID_RECIPE), encoding="utf-8")
    load_or_user_error(path, overrides)


@CASES
@given(json_values, st.sampled_from(["auto", "alpaca", "chat", "oasst", "input-output", "prompt-completion", "text"]))
def test_random_rows_never_crash_the_formats(row, data_format):
    try:
        example = to_example(row, Location("rows.jsonl", 1), data_format, {})
    except RowError as error:
        assert str(error)
        return
    assert (example.messages is None) != (example.segments is None)


@CASES
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]))
def test_random_bytes_never_crash_the_readers(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"data{suffix}"
    path.write_bytes(data)
    raw = read_path(path)
    for problem in raw.problems:
        assert problem.render()


@CASES
@given(st.lists(json_values.map(json.dumps) | st.text(max_size=30), max_size=5))
def test_random_judgment_lines_never_crash(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("judgments") / "judgments.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    judgments = read_judgments([path])
    for problem in judgments.problems:
        assert problem.render()
