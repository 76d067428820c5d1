"""`qlora eval` end to end on a tiny trained run with a local judge, and `qlora eval score` on files."""

from __future__ import annotations

import json

import pytest

from conftest import train_tiny_run
from qlora_cli.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("eval")
    train_tiny_run(folder, tiny_model_dir, max_steps=2)
    return folder / "run"


def test_eval_end_to_end_with_a_local_judge_and_a_cache(run_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    args = ["eval", str(run_dir), "--judge", str(tiny_model_dir), "--limit", "4", "--max-new-tokens", "6",
            "--out", str(out)]
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["run", "run-base"] and report["reference"] == "run-base"
    # Constrained pairwise verdicts always parse: 4 questions x 2 orders.
    records = report["pairwise"]
    assert records["run"]["wins"] + records["run"]["ties"] + records["run"]["losses"] == 8
    assert set(report["elo"]) == {"run", "run-base"} and set(report["bradley_terry"]) == {"run", "run-base"}
    calls = report["judge_calls"]
    # Games whose prompts are identical (same answers both ways) are asked once.
    assert calls["total"] == 16 and calls["made"] + calls["cached"] == 16 and calls["made"] > 0
    assert "far too small" in report["notes"][0]
    assert (out / "report.md").is_file() and (out / "elo.png").is_file()
    assert len((out / "answers" / "run.jsonl").read_text().splitlines()) == 4
    judgments = (out / "judgments.jsonl").read_text().splitlines()
    assert len(judgments) == 8 + 8 - report["parse_failures"]
    # A second run reuses the answers and every judge reply: no model call at all.
    import qlora_cli.evaluation.answers as answers

    monkeypatch.setattr(answers, "generate_answers", lambda *a, **k: pytest.fail("answers were generated again"))
    main(args)
    again = json.loads((out / "report.json").read_text())
    assert again["judge_calls"]["made"] == 0 and again["judge_calls"]["cached"] == 16
    assert again["pairwise"] == report["pairwise"]
    # Re-scoring the judgments it wrote gives the same pairwise record.
    main(["eval", "score", str(out / "judgments.jsonl"), "--reference", "run-base", "--out", str(tmp_path / "rescored")])
    rescored = json.loads((tmp_path / "rescored" / "report.json").read_text())
    assert rescored["pairwise"] == report["pairwise"]


def test_eval_score_reads_fastchat_and_plain_files(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question_id": q, "model_a": a, "model_b": b, "winner": "model_a"}
        for q in range(10) for a, b in (("m1", "m2"), ("m2", "m1"))
    ] + [{"question_id": q, "model_a": "m1", "model_b": "m2", "score_a": 8, "score_b": 8} for q in range(10)]))
    fastchat = tmp_path / "fastchat.jsonl"
    fastchat.write_text(json.dumps({"question_id": 1, "model_1": "m1", "model_2": "m3", "g1_winner": "model_1",
                                    "g2_winner": "model_1", "judge": ["gpt-4", "pair-v2"], "turn": 1}) + "\n")
    main(["eval", "score", str(plain), str(fastchat), "--reference", "m2", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # The judge always prefers the answer it saw first: pooled over both orders, m1 and m2 tie.
    assert report["pairwise"]["m2"]["win_rate"] == pytest.approx(10 / 20)
    assert report["relative"]["models"]["m1"]["percent"] == pytest.approx(100.0)
    assert report["pairwise"]["m3"]["losses"] == 2


def test_eval_score_malformed_lines_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "model_a": "a", "model_b": "b", "winner": "model_a"}\n{"question_id": 2}\nnot json\n')
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"{bad}:2" in err and f"{bad}:3" in err
    assert not (tmp_path / "out").exists()


def test_eval_baseline_base_needs_a_run_dir(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tiny_model_dir), "--limit", "1", "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and "needs a run directory" in capsys.readouterr().err


def test_answers_made_elsewhere_join_the_comparison(run_dir, tiny_model_dir, tmp_path):
    from qlora_cli.evaluation.questions import read_questions

    questions = read_questions(None)[:2]
    supplied = tmp_path / "other.jsonl"
    supplied.write_text("".join(json.dumps({"question_id": q.question_id, "model_id": "other-bot",
                                            "choices": [{"index": 0, "turns": ["Arr!"]}]}) + "\n" for q in questions))
    out = tmp_path / "report"
    main(["eval", str(run_dir), "--judge", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "4",
          "--mode", "pairwise", "--answers", str(supplied), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["run", "run-base", "other-bot"]
    assert report["pairwise"]["other-bot"]["wins"] + report["pairwise"]["other-bot"]["ties"] + report["pairwise"]["other-bot"]["losses"] == 4
