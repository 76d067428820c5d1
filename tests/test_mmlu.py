"""Multiple-choice accuracy: the data layouts, the prompt, the letter argmax, and training-time tracking."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from qlora_cli.cli import main
from qlora_cli.core.errors import UserError
from qlora_cli.evaluation.mmlu import Item, build_prompt, evaluate, letter_token_ids, read_mmlu

REPO = Path(__file__).resolve().parents[1]


def write_mmlu(folder: Path, subjects: dict[str, tuple[list[list[str]], list[list[str]]]]) -> Path:
    for split in ("dev", "test"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    for subject, (dev, test) in subjects.items():
        for split, rows in (("dev", dev), ("test", test)):
            with (folder / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    return folder


ROWS = [["What is 2 + 2?", "3", "4", "5", "6", "B"], ["Which is a planet?", "Mars", "Moon", "Sun", "Comet", "A"],
        ["Pick the even number, please.", "1", "3", "7", "8", "D"], ["Water freezes at, in Celsius:", "10", "-5", "0", "4", "C"]]


def test_reads_the_mmlu_layout_and_jsonl(tmp_path):
    folder = write_mmlu(tmp_path / "mmlu", {"basic_math": (ROWS[:1], ROWS), "science": ([], ROWS[1:3])})
    dev, test = read_mmlu(folder)
    assert [len(dev.get(s, [])) for s in ("basic_math", "science")] == [1, 0]
    assert test["basic_math"][0] == Item("basic_math", "What is 2 + 2?", ("3", "4", "5", "6"), 1)
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_text(json.dumps({"subject": "s", "question": "q?", "choices": ["a", "b", "c", "d"], "answer": 2}) + "\n"
                     + json.dumps({"subject": "s", "split": "dev", "question": "p?", "choices": ["a", "b", "c", "d"], "answer": "a"}) + "\n")
    dev, test = read_mmlu(jsonl)
    assert test["s"][0].answer == 2 and dev["s"][0].answer == 0


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    folder = write_mmlu(tmp_path / "mmlu", {"x": ([], [ROWS[0], ["too", "few"], ["q", "a", "b", "c", "d", "E"]])})
    with pytest.raises(UserError) as caught:
        read_mmlu(folder)
    lines = {p.line: p.message for p in caught.value.problems}
    assert "expected 6 fields" in lines[2] and "A-D" in lines[3] and 1 not in lines


def test_prompt_is_the_original_mmlu_format():
    shot = Item("high_school_physics", "Q1?", ("a", "b", "c", "d"), 2)
    item = Item("high_school_physics", "Q2?", ("e", "f", "g", "h"), 0)
    assert build_prompt(item, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
        "Q2?\nA. e\nB. f\nC. g\nD. h\nAnswer:"
    )


class AlwaysLetter(torch.nn.Module):
    """A stand-in model whose next-token logits favour one letter's token."""

    def __init__(self, token_id: int, vocab: int):
        super().__init__()
        self.token_id, self.vocab = token_id, vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.token_id] = 5.0

        class Output:
            pass

        output = Output()
        output.logits = logits
        return output


def test_accuracy_is_the_argmax_over_the_letter_tokens(tiny_tokenizer, tmp_path):
    folder = write_mmlu(tmp_path / "mmlu", {"a": (ROWS[:2], ROWS), "b": ([], ROWS[:2])})
    dev, test = read_mmlu(folder)
    letters = letter_token_ids(tiny_tokenizer)
    assert len(set(letters)) == 4
    result = evaluate(AlwaysLetter(letters[1], len(tiny_tokenizer)), tiny_tokenizer, dev, test, shots=2)
    # Always "B": right on 1 of subject a's 4 questions and on 1 of subject b's 2.
    assert result["subjects"]["a"] == {"accuracy": 0.25, "questions": 4, "shots": 2}
    assert result["subjects"]["b"]["accuracy"] == 0.5 and result["subjects"]["b"]["shots"] == 0
    assert result["accuracy"] == pytest.approx(0.375) and result["accuracy_over_questions"] == pytest.approx(2 / 6)


def test_eval_mmlu_command_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    folder = write_mmlu(tmp_path / "mmlu", {"a": (ROWS[:2], ROWS)})
    main(["eval", "mmlu", str(tiny_model_dir), "--data", str(folder), "--shots", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["questions"] == 4 and 0 <= result["accuracy"] <= 1 and result["subjects"]["a"]["shots"] == 2


def test_mmlu_is_tracked_during_training(tiny_recipe, tmp_path):
    import io

    from rich.console import Console

    from qlora_cli.core.recipe import load_recipe
    from qlora_cli.train.run import run_training

    write_mmlu(tmp_path / "mmlu", {"a": (ROWS[:1], ROWS)})
    text = tiny_recipe.read_text().replace("training:\n", f"training:\n  eval_steps: 2\n  eval_mmlu:\n    data: {tmp_path / 'mmlu'}\n    shots: 1\n")
    tiny_recipe.write_text(text)
    summary = run_training(load_recipe(tiny_recipe), console=Console(file=io.StringIO())).summary
    records = [json.loads(line) for line in (tiny_recipe.parent / "run" / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["mmlu_questions"] == 4 for r in records)
    assert summary["mmlu_accuracy"] == records[-1]["mmlu_accuracy"]


def test_the_shipped_set_has_four_subjects_of_ten_questions():
    data = REPO / "recipes" / "data" / "mmlu-mini"
    dev, test = read_mmlu(data)
    assert len(test) == 4 and all(len(items) == 10 for items in test.values())
    assert all(len(items) == 5 for items in dev.values())


def test_a_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        read_mmlu(Path("someone/not-downloaded-mmlu"))
    assert "network access" in caught.value.render()
