"""`qlora eval score` on files in the layouts other tools publish, tolerant scoring of bad lines, and
answers written in FastChat's and Arena-Hard-Auto's layouts. Field names are copied from the tools'
own writers: FastChat fastchat/llm_judge/common.py (play_a_match_pair / play_a_match_single),
Arena-Hard-Auto gen_judgment.py and gen_answer.py (v2.0; v0.1 for the older rows), AlpacaEval's
annotations.json as its README documents it."""

from __future__ import annotations

import json

import pytest

from qlora_cli.cli import main
from qlora_cli.core.errors import UserError
from qlora_cli.evaluation.answers import read_answers
from qlora_cli.evaluation.questions import read_questions


def write_lines(path, rows: list) -> object:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def score(files: list, out, *extra: str) -> dict:
    main(["eval", "score", *map(str, files), "--out", str(out), *extra])
    return json.loads((out / "report.json").read_text())


# --- FastChat llm_judge -----------------------------------------------------------------------------


def fastchat_pair(question_id: int, g1: str, g2: str, **extra) -> dict:
    return {"question_id": question_id, "model_1": "vicuna-13b", "model_2": "alpaca-13b", "g1_winner": g1,
            "g2_winner": g2, "judge": ["gpt-4", "pair-v2"], "g1_user_prompt": "[Question] ...",
            "g1_judgment": "... [[A]]", "g2_user_prompt": "[Question] ...", "g2_judgment": "... [[B]]",
            "turn": 1, "tstamp": 1687222209.1, **extra}


def test_fastchat_pairwise_file_round_trips(tmp_path):
    path = write_lines(tmp_path / "data/mt_bench/model_judgment/gpt-4_pair.jsonl", [
        fastchat_pair(81, "model_1", "model_1"),  # vicuna wins both games
        fastchat_pair(82, "tie", "model_2"),       # a tie, then alpaca wins
        fastchat_pair(83, "error", "model_1"),     # no verdict in game 1; vicuna wins game 2
    ])
    report = score([path], tmp_path / "out")
    vicuna = report["pairwise"]["vicuna-13b"]
    assert (vicuna["wins"], vicuna["ties"], vicuna["losses"], vicuna["judgments"]) == (3, 1, 1, 5)
    assert vicuna["win_rate"] == pytest.approx(3.5 / 5)
    assert report["parse_failures"] == 1
    assert report["judgments"] == {"read": 6, "scored": 5, "excluded": 1, "malformed": 0, "unscored": 1}
    assert report["excluded"]["by_pair"] == {"alpaca-13b vs vicuna-13b": {"judge gave no verdict": 1}}
    assert report["excluded"]["rows"][0]["where"] == f"{path}:3"
    assert set(report["elo"]) == {"vicuna-13b", "alpaca-13b"}


def fastchat_rates(win: int, loss: int, tie: int) -> dict:
    """show_result.py's row for these counts, its three rates written out as it defines them."""
    total = win + loss + tie
    return {"win": win, "loss": loss, "tie": tie, "win_rate": pytest.approx(win / total),
            "loss_rate": pytest.approx(loss / total), "win_rate_adjusted": pytest.approx((win + tie / 2) / total)}


def test_fastchat_pair_file_gives_show_result_figures(tmp_path):
    # FastChat's show_result.py (display_result_pairwise) scores each LINE once: a line with an `error`
    # game is dropped; a line whose game 1 is a tie or whose games disagree is a tie for both models.
    path = write_lines(tmp_path / "data/mt_bench/model_judgment/gpt-4_pair.jsonl", [
        fastchat_pair(81, "model_1", "model_1"),            # vicuna wins
        fastchat_pair(82, "model_2", "model_2"),            # alpaca wins
        fastchat_pair(83, "tie", "tie"),                    # tie
        fastchat_pair(84, "model_1", "model_2"),            # the games disagree: tie
        fastchat_pair(85, "tie", "model_1"),                # game 1 a tie: tie
        fastchat_pair(86, "model_2", "tie"),                # the games disagree: tie
        fastchat_pair(87, "error", "model_1"),              # dropped
        fastchat_pair(88, "model_1", "error"),              # dropped
        fastchat_pair(89, "error", "error"),                # dropped
        fastchat_pair(81, "model_1", "model_1", turn=2),    # vicuna wins (turn 2 of question 81)
        fastchat_pair(90, "model_1", "model_1", model_2="llama-13b"),  # vicuna beats llama
    ])
    report = score([path], tmp_path / "all")
    fastchat = report["fastchat"]
    assert (fastchat["mode"], fastchat["baseline"], fastchat["lines"], fastchat["dropped"]) == ("pairwise-all", None, 8, 3)
    assert fastchat["models"] == {"vicuna-13b": fastchat_rates(3, 1, 4), "alpaca-13b": fastchat_rates(1, 2, 4),
                                  "llama-13b": fastchat_rates(0, 1, 0)}
    assert list(fastchat["models"]) == ["vicuna-13b", "alpaca-13b", "llama-13b"]  # best win_rate_adjusted first
    # Our own figure counts each game and keeps the decided game of a line with one error: of vicuna's 18
    # games it won 10 (both games of 81, 81 turn 2 and 90; one of 84, 85, 87, 88), lost 4 and tied 4.
    vicuna = report["pairwise"]["vicuna-13b"]
    assert (vicuna["wins"], vicuna["ties"], vicuna["losses"]) == (10, 4, 4)
    assert vicuna["win_rate"] == pytest.approx(12 / 18)
    markdown = (tmp_path / "all" / "report.md").read_text()
    assert "show_result.py --mode pairwise-all): 8 lines" in markdown
    assert "| vicuna-13b | 3 | 1 | 4 | 0.375000 | 0.125000 | 0.625000 |" in markdown

    # With a reference among the lines' models, the figures are those of --mode pairwise-baseline.
    fastchat = score([path], tmp_path / "baseline", "--reference", "alpaca-13b")["fastchat"]
    assert (fastchat["mode"], fastchat["baseline"], fastchat["lines"]) == ("pairwise-baseline", "alpaca-13b", 7)
    assert fastchat["models"] == {"vicuna-13b": fastchat_rates(2, 1, 4)}
    assert "--baseline-model alpaca-13b" in (tmp_path / "baseline" / "report.md").read_text()


# The verdicts of a published MT-bench pair file, phi-3 vs phi-3-dpo judged by GPT-4 (github.com/Stefanstud/
# FastChat at 1f5a7b81, fastchat/llm_judge/data/mt_bench/model_judgment/gpt-4_pair.jsonl, 75 lines), counted
# per (g1_winner, g2_winner); model_1 is phi-3 on every line.
PHI3_PAIR_VERDICTS = {("model_2", "model_2"): 20, ("model_1", "model_1"): 18, ("model_1", "model_2"): 16,
                      ("tie", "tie"): 8, ("model_1", "tie"): 5, ("tie", "model_2"): 3, ("model_2", "model_1"): 2,
                      ("model_2", "tie"): 1, ("model_1", "error"): 1, ("error", "error"): 1}


def test_a_published_pair_file_scores_as_fastchat_prints_it(tmp_path):
    verdicts = [pair for pair, count in PHI3_PAIR_VERDICTS.items() for _ in range(count)]
    rows = [fastchat_pair(81 + number // 2, g1, g2, model_1="phi-3", model_2="phi-3-dpo", turn=1 + number % 2)
            for number, (g1, g2) in enumerate(verdicts)]
    report = score([write_lines(tmp_path / "gpt-4_pair.jsonl", rows)], tmp_path / "out")
    fastchat = report["fastchat"]
    # What `python show_result.py --mode pairwise-all --input-file gpt-4_pair.jsonl` (FastChat 0e6d3e4) prints
    # for that file: phi-3-dpo 20 18 35 0.273973 0.246575 0.513699; phi-3 18 20 35 0.246575 0.273973 0.486301.
    assert (fastchat["lines"], fastchat["dropped"]) == (73, 2)
    assert [(model, e["win"], e["loss"], e["tie"], round(e["win_rate_adjusted"], 6))
            for model, e in fastchat["models"].items()] == [("phi-3-dpo", 20, 18, 35, 0.513699),
                                                            ("phi-3", 18, 20, 35, 0.486301)]
    # Per game, keeping the decided game of the line with one error, phi-3 has 49.32%.
    assert round(100 * report["pairwise"]["phi-3"]["win_rate"], 2) == 49.32


def test_fastchat_single_grades_round_trip(tmp_path):
    judge = ["gpt-4", "single-v1-multi-turn"]
    rows = [
        {"question_id": 81, "model": "vicuna-13b", "judge": judge, "user_prompt": "...", "judgment": "Rating: [[9]]",
         "score": 9, "turn": 1, "tstamp": 1.0},
        {"question_id": 81, "model": "vicuna-13b", "judge": judge, "user_prompt": "...", "judgment": "[[7.5]]",
         "score": 7.5, "turn": 2, "tstamp": 1.0},
        {"question_id": 82, "model": "vicuna-13b", "judge": judge, "user_prompt": "...", "judgment": "[[8]]",
         "score": 8, "turn": 1, "tstamp": 1.0},
        {"question_id": 81, "model": "alpaca-13b", "judge": judge, "user_prompt": "...", "judgment": "[[5]]",
         "score": 5, "turn": 1, "tstamp": 1.0},
        {"question_id": 82, "model": "alpaca-13b", "judge": judge, "user_prompt": "...", "judgment": "no rating",
         "score": -1, "turn": 1, "tstamp": 1.0},
    ]
    path = write_lines(tmp_path / "gpt-4_single.jsonl", rows)
    report = score([path], tmp_path / "out")
    vicuna, alpaca = report["single"]["vicuna-13b"], report["single"]["alpaca-13b"]
    assert vicuna["mean"] == pytest.approx((9 + 7.5 + 8) / 3) and vicuna["judgments"] == 3 and vicuna["questions"] == 2
    assert vicuna["by_turn"] == {"1": 8.5, "2": 7.5}
    assert alpaca["mean"] == 5.0 and alpaca["judgments"] == 1
    assert report["excluded"]["by_pair"] == {"alpaca-13b": {"judge gave no verdict": 1}}
    assert "## Single-answer grades" in (tmp_path / "out" / "report.md").read_text()


# --- Arena-Hard-Auto --------------------------------------------------------------------------------


def arena_hard_game(score: str | None) -> dict:
    return {"score": score, "judgment": {"answer": f"My final verdict is: [[{score}]]"},
            "prompt": [{"role": "system", "content": "Please act as an impartial judge..."},
                       {"role": "user", "content": "<|User Prompt|>\n..."}]}


def test_arena_hard_v2_file_round_trips(tmp_path):
    path = write_lines(tmp_path / "arena-hard-v2.0/model_judgment/gpt-4.1/my-model.jsonl", [
        # Game 1 shows the baseline as A, game 2 shows the model as A.
        {"uid": "a1", "category": "hard_prompt", "judge": "gpt-4.1", "model": "my-model",
         "baseline": "o3-mini-2025-01-31", "games": [arena_hard_game("B>A"), arena_hard_game("A>>B")]},
        {"uid": "a2", "category": "hard_prompt", "judge": "gpt-4.1", "model": "my-model",
         "baseline": "o3-mini-2025-01-31", "games": [arena_hard_game("A=B"), arena_hard_game("B>A")]},
        {"uid": "a3", "category": "hard_prompt", "judge": "gpt-4.1", "model": "my-model",
         "baseline": "o3-mini-2025-01-31", "games": [None, arena_hard_game(None)]},
        # Written before rows named their baseline: the category's, from Arena-Hard's JUDGE_SETTINGS.
        {"uid": "c1", "category": "creative_writing", "judge": "gpt-4.1", "model": "my-model",
         "games": [arena_hard_game("A>B"), arena_hard_game("B>A")]},
    ])
    report = score([path], tmp_path / "out")
    model = report["pairwise"]["my-model"]
    # show_result.py's battles for the model: row a1 -> [1, 1, 1] from game 2 (>> weighs 3) and 1 - 0 from
    # game 1; row a2 -> [0] and 1 - 0.5; row c1 -> two losses to gemini. Against o3-mini: 4.5 of 6.
    assert (model["wins"], model["ties"], model["losses"], model["games"], model["judgments"]) == (4, 1, 3, 8, 6)
    assert report["pairwise"]["o3-mini-2025-01-31"]["win_rate"] == pytest.approx(1 - 4.5 / 6)
    assert report["pairwise"]["gemini-2.0-flash-001"]["win_rate"] == 1.0
    assert report["categories"]["hard_prompt"]["my-model"] == pytest.approx(4.5 / 6)
    assert report["category_judgments"] == {"creative_writing": 2, "hard_prompt": 4}
    assert report["excluded"]["by_pair"] == {"my-model vs o3-mini-2025-01-31": {"judge gave no verdict": 2}}


def test_arena_hard_v01_rows_and_bad_verdicts(tmp_path):
    v01 = {"question_id": "q1", "model": "my-model", "judge": "gpt-4-1106-preview",
           "games": [{"user_prompt": "...", "judgment": "[[B>>A]]", "score": "B>>A"},
                     {"user_prompt": "...", "judgment": "[[A>B]]", "score": "A>B"}]}
    odd = {**v01, "question_id": "q2", "games": [{"score": "A>>>B"}, {"score": "A>B"}]}
    unknown = {"uid": "x", "category": "poetry", "model": "my-model", "games": [arena_hard_game("A>B")] * 2}
    path = write_lines(tmp_path / "judgments.jsonl", [v01, odd, unknown])
    report = score([path], tmp_path / "out")
    # v0.1 rows have no category and no baseline: the baseline was gpt-4-0314.
    assert report["pairwise"]["my-model"] == {"wins": 4, "ties": 0, "losses": 0, "games": 4, "judgments": 2,
                                              "win_rate": 1.0}
    assert set(report["pairwise"]) == {"my-model", "gpt-4-0314"}
    rows = report["excluded"]["rows"]
    assert [(row["line"], row["reason"]) for row in rows] == [(2, "unknown verdict"), (3, "missing field")]
    assert "'A>>>B'" in rows[0]["message"] and "poetry" in rows[1]["message"]


# --- AlpacaEval -------------------------------------------------------------------------------------


def alpaca_annotation(instruction: str, preference, **extra) -> dict:
    return {"instruction": instruction, "output_1": "The reference answer.", "generator_1": "gpt4_1106_preview",
            "dataset": "helpful_base", "output_2": "My model's answer.", "generator_2": "my-model",
            "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": preference, "time_per_example": 0.9,
            "price_per_example": 0.01, "raw_completion": {"logprobs": [-0.3]}, **extra}


def test_alpaca_eval_annotations_round_trip(tmp_path):
    annotations = [alpaca_annotation("How did US states get their names?", 1.75),
                   alpaca_annotation("What is 2+2?", 1.0),
                   alpaca_annotation("Write a haiku.", 2.0),
                   alpaca_annotation("Tell me a joke.", 1.5),
                   alpaca_annotation("Name a colour.", None),
                   alpaca_annotation("Count to three.", 3.0)]
    path = tmp_path / "results/my-model/weighted_alpaca_eval_gpt4_turbo/annotations.json"
    path.parent.mkdir(parents=True)
    text = json.dumps(annotations, indent=2)
    path.write_text(text, encoding="utf-8")
    report = score([path], tmp_path / "out")
    model = report["pairwise"]["my-model"]
    # AlpacaEval's win rate is the mean of preference - 1 over the annotations with a preference.
    assert model["win_rate"] == pytest.approx((0.75 + 0 + 1 + 0.5) / 4)
    assert (model["wins"], model["ties"], model["losses"]) == (2, 1, 1)
    assert report["categories"] == {"helpful_base": {"gpt4_1106_preview": pytest.approx(1 - 0.5625),
                                                     "my-model": pytest.approx(0.5625)}}
    rows = report["excluded"]["rows"]
    assert [(row["reason"], row["malformed"]) for row in rows] == [("judge gave no verdict", False),
                                                                   ("out of range", True)]
    # Elements of the indented array are named by the line they start on.
    last_line = text[:text.index('"instruction": "Count to three."')].count("\n")
    assert rows[1]["where"] == f"{path}:{last_line}"
    assert f"`{path}:{last_line}`: field `preference` must be between 1 and 2, got 3.0" in (
        tmp_path / "out" / "report.md").read_text()


def test_every_element_of_a_large_annotations_array_is_named_by_its_first_line(tmp_path):
    from qlora_cli.evaluation.judgments import _array_element_lines, read_judgments

    # 4,000 elements laid out every way a JSON writer may: indented over many lines, several on one line,
    # blank lines and tabs between them, nested arrays. The line each starts on is counted while writing.
    pieces, starts, line = ["\ufeff[\n"], [], 2
    for number in range(4000):
        preference = 3.0 if number % 97 == 0 else 1.0 + (number % 5) / 4
        element = json.dumps(alpaca_annotation(f"Question {number}: [1, 2]?", preference),
                             indent=2 if number % 3 else None)
        separator = ("" if number == 3999 else ",") + ("\n\n\t " if number % 7 == 0 else " " if number % 3 == 1 else "\n")
        starts.append(line)
        pieces.append("  " + element + separator)
        line += (element + separator).count("\n")
    path = tmp_path / "annotations.json"
    path.write_text("".join(pieces) + "\n]\n", encoding="utf-8")

    assert _array_element_lines(path) == starts
    judgments = read_judgments([path])
    assert len(judgments.comparisons) == 4000 - len(range(0, 4000, 97))
    assert [entry.problem.line for entry in judgments.excluded] == [starts[n] for n in range(0, 4000, 97)]


def test_alpaca_eval_1_draws_and_jsonl(tmp_path):
    path = write_lines(tmp_path / "annotations.jsonl", [
        alpaca_annotation("a", 0, annotator="alpaca_eval_gpt4"),  # AlpacaEval 1 wrote draws as 0
        alpaca_annotation("b", 2, annotator="alpaca_eval_gpt4"),
    ])
    report = score([path], tmp_path / "out")
    assert report["pairwise"]["my-model"]["ties"] == 1 and report["pairwise"]["my-model"]["wins"] == 1
    assert report["pairwise"]["my-model"]["win_rate"] == pytest.approx(0.75)


def test_the_reference_compared_with_itself_scores_50_as_alpaca_eval_lists_it(tmp_path):
    # AlpacaEval publishes its reference's own row this way (results/gpt4_1106_preview/...): generator_1 =
    # generator_2, the same output twice, preference 1.5, which its annotator sets for identical outputs
    # before asking any judge; a null preference beside identical outputs is therefore a draw too.
    same = {"generator_2": "gpt4_1106_preview", "output_2": "The reference answer."}
    annotations = [alpaca_annotation(f"Question {n}?", 1.5 if n else None, **same) for n in range(5)]
    path = tmp_path / "results/gpt4_1106_preview/weighted_alpaca_eval_gpt4_turbo/annotations.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(annotations, indent=2), encoding="utf-8")
    report = score([path], tmp_path / "self")
    assert report["pairwise"] == {"gpt4_1106_preview": {"wins": 0, "ties": 5, "losses": 0, "games": 5,
                                                        "judgments": 5, "win_rate": 0.5}}
    assert report["judgments"]["scored"] == 5 and report["excluded"]["total"] == 0
    # A model compared with itself says nothing about ratings.
    assert report["elo"] == report["bradley_terry"] == {}
    markdown = (tmp_path / "self" / "report.md").read_text()
    assert "gpt4_1106_preview is compared with itself in 5 judgment(s)" in markdown
    assert "| gpt4_1106_preview | - | - | - | - | 0 / 5 / 0 | 50.0% | 5 |" in markdown

    # Beside another model's annotations: that model's figures are as without the self-comparison file.
    other = write_lines(tmp_path / "my-model.jsonl", [alpaca_annotation("a", 2.0), alpaca_annotation("b", 1.75)])
    alone, mixed = score([other], tmp_path / "alone"), score([path, other], tmp_path / "mixed")
    assert mixed["pairwise"]["my-model"] == alone["pairwise"]["my-model"]
    assert mixed["pairwise"]["my-model"]["win_rate"] == pytest.approx((1.0 + 0.75) / 2)
    assert mixed["elo"] == alone["elo"] and set(mixed["elo"]) == {"gpt4_1106_preview", "my-model"}
    # The reference's record holds its 5 draws with itself once each, and its 2 games with my-model.
    assert mixed["pairwise"]["gpt4_1106_preview"]["judgments"] == 7
    assert mixed["pairwise"]["gpt4_1106_preview"]["win_rate"] == pytest.approx((5 * 0.5 + 0 + 0.25) / 7)


def test_identical_outputs_are_a_draw_whatever_the_preference(tmp_path):
    path = write_lines(tmp_path / "annotations.jsonl", [
        alpaca_annotation("a", 1.0, output_2="The reference answer."),  # the same text as output_1
        alpaca_annotation("b", 2.0)])
    model = score([path], tmp_path / "out")["pairwise"]["my-model"]
    assert (model["wins"], model["ties"], model["losses"]) == (1, 1, 0)
    assert model["win_rate"] == pytest.approx(0.75)


def test_a_self_comparison_preference_counts_from_generator_2s_side(tmp_path):
    # Two samples of one model, judged: AlpacaEval's row for generator_2 is the mean of preference - 1.
    path = write_lines(tmp_path / "annotations.jsonl", [
        alpaca_annotation(question, preference, generator_1="my-model")
        for question, preference in (("a", 2.0), ("b", 1.75), ("c", 1.0))])
    model = score([path], tmp_path / "out")["pairwise"]["my-model"]
    assert (model["wins"], model["ties"], model["losses"], model["judgments"]) == (2, 0, 1, 3)
    assert model["win_rate"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)


def test_layouts_mix_in_one_run(tmp_path):
    fastchat = write_lines(tmp_path / "fastchat.jsonl", [fastchat_pair(1, "model_1", "model_2")])
    plain = write_lines(tmp_path / "plain.jsonl", [
        {"question_id": 1, "model_a": "vicuna-13b", "model_b": "alpaca-13b", "winner": "tie"}])
    report = score([fastchat, plain], tmp_path / "out")
    assert report["pairwise"]["vicuna-13b"]["judgments"] == 3


# --- tolerant scoring -------------------------------------------------------------------------------


def test_bad_rows_are_left_out_counted_and_listed_and_the_rest_is_scored(tmp_path):
    rows, good = [], []
    for question in range(300):
        first = question % 2 == 0
        own, ref = 6 + question % 4, 8
        row = {"question_id": question, "model_a": "guanaco" if first else "chatgpt",
               "model_b": "chatgpt" if first else "guanaco", "score_a": own if first else ref,
               "score_b": ref if first else own}
        rows.append(row)
        good.append((own, ref))
    # What judges write: 0, 11, "8.5/10", prose. They replace four good lines.
    rows[10]["score_a"], rows[20]["score_b"], rows[30]["score_a"] = 0, 11, "8.5/10"
    rows[40] = "Assistant A's answer is better because it is more detailed."
    for index in (10, 20, 30, 40):
        good[index] = None
    path = write_lines(tmp_path / "gpt4_relative.jsonl", rows)
    report = score([path], tmp_path / "out", "--reference", "chatgpt")

    kept = [pair for pair in good if pair is not None]
    guanaco = report["relative"]["models"]["guanaco"]
    assert guanaco["judgments"] == 296 and guanaco["questions"] == 296
    assert guanaco["percent"] == pytest.approx(100 * sum(o for o, _ in kept) / sum(r for _, r in kept))
    excluded = report["excluded"]
    assert excluded["total"] == 4
    assert excluded["by_pair"] == {"(unknown models)": {"not valid JSON": 1},
                                   "chatgpt vs guanaco": {"out of range": 2, "wrong type": 1}}
    assert [row["where"] for row in excluded["rows"]] == [f"{path}:{line}" for line in (11, 21, 31, 41)]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Judgments read: 300; scored: 296; left out: 4 (4 malformed, 0 without a verdict)." in markdown
    assert f"`{path}:11`: field `score_a` must be between 1 and 10, got 0" in markdown
    assert f'`{path}:31`: field `score_a` must be a number, got string "8.5/10"' in markdown
    assert "| chatgpt vs guanaco | out of range | 2 |" in markdown


def test_strict_refuses_the_file_and_writes_nothing(tmp_path, capsys):
    path = write_lines(tmp_path / "j.jsonl", [
        {"question_id": 1, "model_a": "a", "model_b": "b", "winner": "model_a"},
        {"question_id": 2, "model_a": "a", "model_b": "b", "score_a": 0, "score_b": 5},
        "not json",
    ])
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", str(path), "--strict", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "2 bad judgment line(s) (--strict)" in err
    assert f"{path}:2: field `score_a` must be between 1 and 10, got 0" in err and f"{path}:3: not valid JSON" in err
    assert not (tmp_path / "out").exists()
    # Without --strict the same file is scored from its one good line.
    assert score([path], tmp_path / "out")["pairwise"]["a"]["wins"] == 1


def test_nothing_usable_or_an_unreadable_file_is_an_error(tmp_path, capsys):
    path = write_lines(tmp_path / "prose.jsonl", ["The first answer is better.", {"question_id": 1, "model": "m", "score": 12}])
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "no usable judgments" in err and f"{path}:2: field `score`" in err
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_file_whose_judgments_all_lack_a_verdict_exits_1_and_shows_the_judges_text(tmp_path, capsys):
    # Valid lines, as FastChat writes them when the judge's replies held no [[A]]/[[B]]/[[C]]: the input
    # is fine, but nothing can be scored.
    path = write_lines(tmp_path / "gpt-4_pair.jsonl", [
        fastchat_pair(81, "error", "error", g1_judgment="Both answers have merits.", g2_judgment="Hard to say."),
        fastchat_pair(82, "error", "error")])
    with pytest.raises(SystemExit) as exited:
        main(["eval", "score", str(path), "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 1, err
    assert f"Nothing was scored: the 4 judgment(s) in {path} were all recorded without a verdict" in err
    assert (f'{path}:1: game 1: the judge gave no verdict (FastChat `error`); the judge wrote: '
            f'"Both answers have merits."') in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["judgments"] == {"read": 4, "scored": 0, "excluded": 4, "malformed": 0, "unscored": 4}
    assert report["fastchat"]["lines"] == 0 and report["fastchat"]["dropped"] == 2
    assert 'game 2: the judge gave no verdict (FastChat `error`); the judge wrote: "Hard to say."' in (
        tmp_path / "out" / "report.md").read_text()


# --- answers for other tools' judges ----------------------------------------------------------------


def test_answers_in_fastchat_and_arena_hard_layouts(tmp_path, tiny_model_dir):
    mt_bench = write_lines(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
        {"question_id": 82, "category": "math", "turns": ["What is 2+2?"]},
    ])
    arena = write_lines(tmp_path / "arena-question.jsonl", [
        {"uid": "0a1b2c", "category": "hard_prompt", "subcategory": "coding", "prompt": "Sort a list in Python."},
    ])
    out = tmp_path / "eval"
    # Answers already made (and cached): nothing is generated, no model is loaded.
    model, baseline = tiny_model_dir.name, "other-bot"
    write_lines(out / "answers" / f"{model}.jsonl", [
        {"question_id": "81", "model": model, "answer": "Short.", "turns": ["A long poem.", "Short."]},
        {"question_id": "82", "model": model, "answer": "4", "turns": ["4"]},
        {"question_id": "0a1b2c", "model": model, "answer": "sorted(xs)", "turns": ["sorted(xs)"]},
    ])
    write_lines(out / "answers" / f"{baseline}.jsonl", [
        {"question_id": q, "model": baseline, "answer": "Arr!", "turns": ["Arr!"] * turns}
        for q, turns in (("81", 2), ("82", 1), ("0a1b2c", 1))])
    for questions in (mt_bench, arena):
        main(["eval", str(tiny_model_dir), "--baseline", baseline, "--questions", str(questions), "--out", str(out),
              "--answers-only", "--answers-format", "fastchat", "--answers-format", "arena-hard"])
        # The questions of the last run only; FastChat ids stay numbers, Arena-Hard uids strings.
    fastchat_rows = [json.loads(line) for line in (out / "fastchat/model_answer" / f"{model}.jsonl").read_text().splitlines()]
    assert fastchat_rows[0]["question_id"] == "0a1b2c"
    assert set(fastchat_rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    arena_rows = [json.loads(line) for line in (out / "arena-hard/model_answer" / f"{model}.jsonl").read_text().splitlines()]
    assert arena_rows == [{"uid": "0a1b2c", "ans_id": arena_rows[0]["ans_id"], "model": model,
                           "messages": [{"role": "user", "content": "Sort a list in Python."},
                                        {"role": "assistant", "content": {"answer": "sorted(xs)"}}],
                           "tstamp": arena_rows[0]["tstamp"]}]
    assert not (out / "report.json").exists()  # --answers-only judges nothing

    main(["eval", str(tiny_model_dir), "--baseline", baseline, "--questions", str(mt_bench), "--out", str(out),
          "--answers-only", "--answers-format", "fastchat"])
    rows = [json.loads(line) for line in (out / "fastchat/model_answer" / f"{model}.jsonl").read_text().splitlines()]
    assert [(row["question_id"], row["model_id"], row["choices"]) for row in rows] == [
        (81, model, [{"index": 0, "turns": ["A long poem.", "Short."]}]),
        (82, model, [{"index": 0, "turns": ["4"]}]),
    ]
    # Both layouts read back as the same answers (`--answers` takes them).
    assert read_answers(out / "fastchat/model_answer" / f"{model}.jsonl") == (model, {"81": ["A long poem.", "Short."],
                                                                                      "82": ["4"]})
    assert read_answers(out / "arena-hard/model_answer" / f"{model}.jsonl") == (model, {"0a1b2c": ["sorted(xs)"]})


def test_arena_hard_question_files_are_read(tmp_path):
    v2 = write_lines(tmp_path / "v2.jsonl", [{"uid": "f00d", "category": "hard_prompt", "subcategory": "x",
                                              "prompt": "Explain monads."}])
    v01 = write_lines(tmp_path / "v01.jsonl", [{"question_id": "beef", "category": "arena-hard-v0.1", "cluster": "c",
                                                "turns": [{"content": "Explain functors."}]}])
    (question,) = read_questions(v2)
    assert (question.question_id, question.source_id, question.turns) == ("f00d", "f00d", ("Explain monads.",))
    (question,) = read_questions(v01)
    assert (question.question_id, question.category, question.turns) == ("beef", "arena-hard-v0.1", ("Explain functors.",))


def test_arena_hard_v01_answer_files_are_read(tmp_path):
    # Arena-Hard v0.1's gen_answer.py wrote FastChat's layout with each turn as {"content", "token_len"}.
    v01 = write_lines(tmp_path / "model_answer" / "gpt-4-0314.jsonl", [
        {"question_id": "beef", "answer_id": "x1", "model_id": "gpt-4-0314", "tstamp": 1712345678.0,
         "choices": [{"index": 0, "turns": [{"content": "A functor maps.", "token_len": 4}]}]}])
    assert read_answers(v01) == ("gpt-4-0314", {"beef": ["A functor maps."]})
    bad = write_lines(tmp_path / "bad.jsonl", [{"question_id": "b", "model_id": "m",
                                                "choices": [{"turns": [{"text": "no content"}]}]}])
    with pytest.raises(UserError) as raised:
        read_answers(bad)
    assert [problem.line for problem in raised.value.problems] == [1]


def test_unknown_answers_format_is_a_user_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tiny_model_dir), "--answers-format", "alpaca", "--out", str(tmp_path / "o")])
    assert exited.value.code == 2 and "--answers-format: 'alpaca'" in capsys.readouterr().err
