"""`qlora data preview` shows exactly what is trained."""

from __future__ import annotations

import pytest

from qlora_cli.cli import main
from qlora_cli.data.preview import histogram


def test_preview_marks_exactly_the_trained_tokens(tiny_recipe, capsys):
    main(["data", "preview", str(tiny_recipe), "-n", "10", "--set", "data.group_by_length=false"])
    out = capsys.readouterr().out
    # Special tokens are written out; each reply and its EOS are marked as trained, nothing else is.
    assert "<s><|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n⟦The capital of France is Paris.</s>⟧\n" in out
    assert "⟦Paris.</s>⟧" in out and "⟦Tokyo, matey.</s>⟧" in out
    examples = out.split("(trained tokens between ⟦ and ⟧):\n", 1)[1]  # past the legend, which shows the marks too
    assert examples.count("⟦") == examples.count("⟧") == 7  # 4 alpaca replies + 3 chat replies
    assert "trained tokens" in out and "padding" in out and "Token lengths" in out


def test_preview_reports_bad_rows_like_train(tiny_recipe, capsys):
    (tiny_recipe.parent / "alpaca.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(SystemExit) as exited:
        main(["data", "preview", str(tiny_recipe)])
    assert exited.value.code == 2
    assert "alpaca.jsonl:1" in capsys.readouterr().err


def test_histogram_counts_every_length():
    lines = histogram([1, 2, 2, 3, 10, 50], bins=4)
    assert sum(int(line.split()[1]) for line in lines) == 6
