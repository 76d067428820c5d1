"""`qlora eval harness`: lm-evaluation-harness's Python API on a local task the test defines, scoring a tiny run
as trained (4-bit base + adapter) and its merged checkpoint alike; bad tasks and a missing harness are exit 2
before any model loads."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import train_tiny_run
from qlora_cli.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-evaluation-harness is not installed (pip install 'qlora-cli[harness]')")

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Tokyo", "five", "the sea"], 0),
    ("What is the capital of Japan?", ["the gull", "Tokyo", "Paris", "salt"], 1),
    ("Add two and three.", ["Paris", "foam", "five", "Tokyo"], 2),
    ("Write a haiku about the sea.", ["five", "Tokyo", "Paris", "Waves fold into foam"], 3),
    ("Which city is in France?", ["Paris", "Tokyo", "foam", "wind"], 0),
    ("What makes five?", ["the sea", "two plus three", "Paris", "Tokyo"], 1),
]


def write_local_task(folder) -> str:
    """A tiny multiple-choice task (JSONL + the harness's task YAML) in `folder`; returns its name."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(
        "task: qlora_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "fewshot_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return "qlora_tiny_mc"


@pytest.fixture(scope="module")
def run_and_merged(tmp_path_factory, tiny_model_dir):
    from qlora_cli.export.merge import merge_run

    folder = tmp_path_factory.mktemp("harness")
    train_tiny_run(folder, tiny_model_dir, chat=True, max_steps=6, learning_rate=5e-3)
    merge_run(folder / "run", out=folder / "merged", dtype_name="float32")
    return folder / "run", folder / "merged"


def results(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_a_run_and_its_merged_checkpoint_score_the_same(run_and_merged, tmp_path):
    run_dir, merged = run_and_merged
    task = write_local_task(tmp_path / "tasks")
    common = ["--tasks", task, "--include-path", str(tmp_path / "tasks"), "--num-fewshot", "1", "--batch-size", "2"]
    for model, extra in ((run_dir, []), (merged, ["--out", str(tmp_path / "merged-eval")])):
        main(["eval", "harness", str(model), *common, *extra])  # returns; a failure would exit non-zero
    trained = results(run_dir / "eval" / "harness_results.json")
    folded = results(tmp_path / "merged-eval" / "harness_results.json")
    assert trained["qlora"]["loaded_as"].endswith("(4-bit base + adapter)") and trained["qlora"]["version"]
    assert trained["n-shot"][task] == 1 and len(trained["samples"][task]) == len(QUESTIONS)
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(trained["results"][task][metric] - folded["results"][task][metric]) <= 1e-6
    # Beyond the scores: every choice's log-likelihood agrees, so agreement is not a coincidence of argmaxes.
    pairs = [(a[0][0], b[0][0]) for x, y in zip(trained["samples"][task], folded["samples"][task])
             for a, b in zip(x["resps"], y["resps"])]
    assert len(pairs) == 4 * len(QUESTIONS)
    assert max(abs(float(a) - float(b)) for a, b in pairs) < 1e-4


def test_an_unknown_task_is_exit_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr("qlora_cli.cli.load_generation_model", lambda *a: loads.append(a))
    write_local_task(tmp_path / "tasks")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "harness", "org/model", "--tasks", "qlora_tiny_mx", "--include-path", str(tmp_path / "tasks")])
    assert exit_.value.code == 2 and not loads
    err = capsys.readouterr().err
    assert "unknown task 'qlora_tiny_mx'" in err and "qlora_tiny_mc" in err


def test_a_missing_include_path_or_harness_is_exit_2(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "harness", "org/model", "--tasks", "x", "--include-path", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "task folder or file not found" in capsys.readouterr().err
    monkeypatch.setattr("qlora_cli.evaluation.harness.importlib.util.find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "harness", "org/model", "--tasks", "x"])
    assert exit_.value.code == 2 and "pip install 'qlora-cli[harness]'" in capsys.readouterr().err
