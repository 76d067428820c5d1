"""Benchmark scoring on synthetic judgments whose answers are known analytically, and the judgment readers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qlora_cli.evaluation.judgments import Comparison, Grade, Judgments, ScorePair, read_judgments
from qlora_cli.evaluation.scoring import (
    bradley_terry,
    category_win_rates,
    elo,
    pairwise_records,
    relative_scores,
    report,
)


def both_orders(question: str, winner: str, loser: str) -> list[Comparison]:
    """`winner` beats `loser` whichever answer the judge saw first."""
    return [Comparison(question, winner, loser, "model_a"), Comparison(question, loser, winner, "model_b")]


def first_shown_wins(question: str, one: str, other: str) -> list[Comparison]:
    """A judge that always prefers the answer it saw first, asked in both orders."""
    return [Comparison(question, one, other, "model_a"), Comparison(question, other, one, "model_a")]


def write_lines(path, lines: list) -> str:
    """Writes dicts as JSON and strings as they are, one per line; returns the path as a string."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# --- a model that always wins -----------------------------------------------------------------------


def test_a_model_that_always_wins():
    comparisons = [c for q in range(30) for c in both_orders(str(q), "guanaco", "vicuna")]
    records = pairwise_records(comparisons)
    assert records["guanaco"] == {"wins": 60, "ties": 0, "losses": 0, "games": 60, "judgments": 60, "win_rate": 1.0}
    assert records["vicuna"]["win_rate"] == 0.0

    ratings = elo(comparisons, permutations=200)
    assert list(ratings) == ["guanaco", "vicuna"]  # best first
    assert ratings["guanaco"]["rating"] > ratings["vicuna"]["rating"]
    assert ratings["guanaco"]["ci95"][0] > 1000 > ratings["vicuna"]["ci95"][1]
    # Elo is zero-sum: every game moves both ratings by the same amount in opposite directions.
    assert ratings["guanaco"]["rating"] + ratings["vicuna"]["rating"] == pytest.approx(2000)

    strengths = bradley_terry(comparisons, resamples=20)
    assert math.isfinite(strengths["guanaco"]["rating"])  # the prior keeps an unbeaten model finite
    assert strengths["guanaco"]["rating"] > 1000 > strengths["vicuna"]["rating"]
    assert strengths["guanaco"]["ci95"][0] > strengths["vicuna"]["ci95"][1]


# --- ties everywhere --------------------------------------------------------------------------------


def test_ties_everywhere_leave_every_rating_at_the_start():
    models = ["a", "b", "c"]
    comparisons = [Comparison(str(q), models[q % 3], models[(q + 1) % 3], "tie") for q in range(45)]
    for rating in elo(comparisons, permutations=100).values():
        assert abs(rating["rating"] - 1000) < 1e-9
        assert all(abs(bound - 1000) < 1e-9 for bound in rating["ci95"])
    for rating in bradley_terry(comparisons, resamples=10).values():
        assert abs(rating["rating"] - 1000) < 1e-9
    assert {model: record["win_rate"] for model, record in pairwise_records(comparisons).items()} == {
        "a": 0.5, "b": 0.5, "c": 0.5
    }


# --- order bias -------------------------------------------------------------------------------------


def test_pooling_both_orders_cancels_a_judge_that_prefers_the_first_answer():
    # The judge gives the answer it saw first 9 and the other 6, whichever model wrote it.
    scores = [pair for q in range(20) for pair in (
        ScorePair(str(q), "chatgpt", "guanaco", 9.0, 6.0),
        ScorePair(str(q), "guanaco", "chatgpt", 9.0, 6.0),
    )]
    result = relative_scores(scores, "chatgpt", resamples=50)["guanaco"]
    assert result["percent"] == 100.0
    assert result["percent_reference_first"] == pytest.approx(100 * 6 / 9)
    assert result["percent_model_first"] == pytest.approx(100 * 9 / 6)
    assert result["percent_reference_first"] != result["percent_model_first"]
    assert result["ci95"] == [100.0, 100.0]  # every question is a tie, so every resample is too
    assert result["questions"] == 20

    comparisons = [c for q in range(20) for c in first_shown_wins(str(q), "guanaco", "chatgpt")]
    assert pairwise_records(comparisons)["guanaco"]["win_rate"] == 0.5
    assert pairwise_records(comparisons)["chatgpt"]["win_rate"] == 0.5
    strengths = bradley_terry(comparisons, resamples=10)
    assert strengths["guanaco"]["rating"] == pytest.approx(strengths["chatgpt"]["rating"], abs=1e-9)


# --- relative scores by hand ------------------------------------------------------------------------


def test_relative_score_computed_by_hand():
    scores = [
        ScorePair("1", "guanaco", "chatgpt", 8.0, 8.0, category="writing"),  # model shown first
        ScorePair("2", "chatgpt", "guanaco", 8.0, 6.0, category="math"),  # reference shown first
        ScorePair("3", "guanaco", "vicuna", 10.0, 1.0),  # no reference: ignored
        ScorePair("3", "vicuna", "chatgpt", 5.0, 10.0),
    ]
    result = relative_scores(scores, "chatgpt", resamples=100)
    assert list(result) == ["guanaco", "vicuna"]
    guanaco = result["guanaco"]
    assert guanaco["percent"] == 87.5  # (8 + 6) / (8 + 8)
    assert guanaco["percent_model_first"] == 100.0
    assert guanaco["percent_reference_first"] == 75.0
    assert guanaco["questions"] == 2
    assert guanaco["by_category"] == {"math": 75.0, "writing": 100.0}
    # Two questions: a resample holds q1 twice (100%), q2 twice (75%) or both (87.5%).
    assert 75.0 <= guanaco["ci95"][0] <= guanaco["ci95"][1] <= 100.0
    assert result["vicuna"]["percent"] == 50.0
    assert result["vicuna"]["percent_reference_first"] is None  # vicuna was always shown first
    assert result["vicuna"]["by_category"] == {}


def test_relative_bootstrap_contains_the_estimate_and_narrows_with_more_questions():
    rng = np.random.default_rng(7)

    def interval(questions: int) -> tuple[float, list[float]]:
        scores = [ScorePair(str(q), "guanaco", "chatgpt", float(rng.integers(5, 10)), float(rng.integers(6, 11)))
                  for q in range(questions)]
        result = relative_scores(scores, "chatgpt", seed=1, resamples=500)["guanaco"]
        return result["percent"], result["ci95"]

    few_percent, few = interval(20)
    many_percent, many = interval(800)
    assert few[0] < few_percent < few[1]
    assert many[0] < many_percent < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 3  # about sqrt(800 / 20) ~ 6 times narrower


def test_relative_bootstrap_moves_the_pairs_of_a_question_together():
    # Each question's two pairs cancel exactly, so any resample of QUESTIONS is exactly 100%;
    # resampling the pairs one by one would not be.
    scores = [pair for q in range(30) for pair in (
        ScorePair(str(q), "guanaco", "chatgpt", float(q % 9 + 1), 10.0),
        ScorePair(str(q), "chatgpt", "guanaco", float(q % 9 + 1), 10.0),
    )]
    assert relative_scores(scores, "chatgpt", resamples=200)["guanaco"]["ci95"] == [100.0, 100.0]


# --- Elo --------------------------------------------------------------------------------------------


def test_elo_on_one_comparison_with_one_order_is_exact():
    assert elo([Comparison("1", "a", "b", "model_a")], permutations=1) == {
        "a": {"rating": 1016.0, "ci95": [1016.0, 1016.0]},
        "b": {"rating": 984.0, "ci95": [984.0, 984.0]},
    }
    assert elo([Comparison("1", "a", "b", "model_b")], permutations=1)["a"]["rating"] == 984.0
    assert elo([Comparison("1", "a", "b", "tie")], permutations=1)["a"]["rating"] == 1000.0


def test_elo_second_game_uses_the_expected_score_of_the_new_ratings():
    ratings = elo([Comparison("1", "a", "b", "model_a"), Comparison("2", "a", "b", "model_a")], permutations=3)
    expected = 1 / (1 + 10 ** ((984 - 1016) / 400))  # a's expected score in the second game, below 1/2's gain
    assert ratings["a"]["rating"] == pytest.approx(1016 + 32 * (1 - expected), abs=1e-9)
    assert ratings["b"]["rating"] == pytest.approx(984 - 32 * (1 - expected), abs=1e-9)


def mixed_comparisons(seed: int, count: int = 300) -> list[Comparison]:
    rng = np.random.default_rng(seed)
    models = ["a", "b", "c"]
    comparisons = []
    for q in range(count):
        first, second = rng.choice(3, size=2, replace=False)
        comparisons.append(Comparison(str(q), models[first], models[second], str(rng.choice(["model_a", "model_b", "tie"]))))
    return comparisons


def test_elo_is_deterministic_given_a_seed_and_differs_slightly_between_seeds():
    comparisons = mixed_comparisons(3)
    first = elo(comparisons, permutations=1000, seed=0)
    assert elo(comparisons, permutations=1000, seed=0) == first
    other = elo(comparisons, permutations=1000, seed=1)
    differences = [abs(first[model]["rating"] - other[model]["rating"]) for model in first]
    assert max(differences) > 0
    # "Slightly": the means of two sets of orders differ far less than the ratings spread over orders.
    assert max(differences) < 0.05 * min(rating["ci95"][1] - rating["ci95"][0] for rating in first.values())
    for rating in first.values():
        assert rating["ci95"][0] < rating["rating"] < rating["ci95"][1]


def test_elo_runs_thousands_of_orders_quickly():
    ratings = elo(mixed_comparisons(4, count=1000), permutations=10000)
    assert sum(rating["rating"] for rating in ratings.values()) == pytest.approx(3000)


# --- Bradley-Terry ----------------------------------------------------------------------------------


def test_bradley_terry_recovers_planted_strengths():
    rng = np.random.default_rng(0)
    strength = {"x": 1.0, "y": 2.0, "z": 4.0}
    models = list(strength)
    comparisons = []
    for q in range(3000):
        first, second = (models[i] for i in rng.choice(3, size=2, replace=False))
        first_wins = rng.random() < strength[first] / (strength[first] + strength[second])
        comparisons.append(Comparison(str(q), first, second, "model_a" if first_wins else "model_b"))
    ratings = bradley_terry(comparisons, resamples=30)
    assert list(ratings) == ["z", "y", "x"]

    def ratio(one: str, other: str) -> float:
        return 10 ** ((ratings[one]["rating"] - ratings[other]["rating"]) / 400)

    assert ratio("y", "x") == pytest.approx(2.0, rel=0.15)
    assert ratio("z", "y") == pytest.approx(2.0, rel=0.15)
    assert ratio("z", "x") == pytest.approx(4.0, rel=0.15)
    # Ratings are relative to the geometric mean strength, which sits at 1000.
    assert sum(rating["rating"] for rating in ratings.values()) == pytest.approx(3000)
    for rating in ratings.values():
        assert rating["ci95"][0] < rating["rating"] < rating["ci95"][1]


def test_category_win_rates():
    comparisons = [
        Comparison("1", "a", "b", "model_a", category="math"),
        Comparison("2", "a", "b", "tie", category="math"),
        Comparison("3", "b", "a", "model_a", category="writing"),
        Comparison("4", "b", "a", "model_a"),  # no category: only in the overall records
    ]
    assert category_win_rates(comparisons) == {"math": {"a": 0.75, "b": 0.25}, "writing": {"a": 0.0, "b": 1.0}}


# --- report -----------------------------------------------------------------------------------------


def test_report_shape():
    comparisons = [c for q in range(5) for c in both_orders(str(q), "guanaco", "chatgpt")]
    scores = [ScorePair(str(q), "guanaco", "chatgpt", 8.0, 8.0) for q in range(5)]
    result = report(comparisons, scores, "chatgpt", parse_failures=2, permutations=50, resamples=50, bt_resamples=5)
    json.dumps(result)  # JSON-ready: no numpy values
    assert {"relative", "elo", "bradley_terry", "pairwise", "parse_failures"} <= set(result)
    assert result["relative"]["reference"] == "chatgpt"
    assert set(result["relative"]["models"]["guanaco"]) >= {
        "percent", "percent_reference_first", "percent_model_first", "ci95"
    }
    assert result["relative"]["models"]["guanaco"]["percent"] == 100.0
    assert set(result["elo"]) == set(result["bradley_terry"]) == set(result["pairwise"]) == {"guanaco", "chatgpt"}
    assert set(result["elo"]["guanaco"]) == {"rating", "ci95"} and len(result["elo"]["guanaco"]["ci95"]) == 2
    assert set(result["bradley_terry"]["guanaco"]) == {"rating", "ci95"}
    assert result["pairwise"]["guanaco"]["wins"] == 10 and result["pairwise"]["guanaco"]["win_rate"] == 1.0
    assert result["parse_failures"] == 2

    assert report(comparisons, scores, None, permutations=5, bt_resamples=2)["relative"] is None
    empty = report([], scores, "chatgpt", resamples=10)
    assert empty["elo"] == empty["bradley_terry"] == empty["pairwise"] == {}
    assert empty["relative"]["models"]["guanaco"]["percent"] == 100.0
    assert report([], [], "chatgpt")["relative"] is None


# --- readers ----------------------------------------------------------------------------------------


def test_plain_comparison_and_score_lines(tmp_path):
    path = write_lines(tmp_path / "plain.jsonl", [
        {"question_id": 7, "model_a": "m1", "model_b": "m2", "winner": "model_a"},
        {"question_id": "q8", "model_a": "m2", "model_b": "m1", "winner": "tie", "judge": "gpt-4", "category": "math"},
        {"question_id": 9, "model_a": "m1", "model_b": "m2", "score_a": 8, "score_b": 9.5, "category": "writing"},
        {"question_id": 10, "model_a": "m1", "model_b": "m2", "score_a": 1, "score_b": 10, "winner": "model_b"},
    ])
    result = read_judgments([path])
    assert result.problems == []
    assert result.comparisons == [
        Comparison("7", "m1", "m2", "model_a"),
        Comparison("q8", "m2", "m1", "tie", category="math", judge="gpt-4"),
        Comparison("10", "m1", "m2", "model_b"),
    ]
    assert result.scores == [
        ScorePair("9", "m1", "m2", 8.0, 9.5, category="writing"),
        ScorePair("10", "m1", "m2", 1.0, 10.0),
    ]
    assert result.grades == [] and result.parse_failures == 0


def test_fastchat_pairwise_lines_give_one_comparison_per_game(tmp_path):
    common = {"judge": ["gpt-4", "pair-v2"], "turn": 1, "g1_judgment": "...", "g2_judgment": "..."}
    path = write_lines(tmp_path / "gpt-4_pair.jsonl", [
        {"question_id": 81, "model_1": "m1", "model_2": "m2", "g1_winner": "model_1", "g2_winner": "model_1", **common},
        {"question_id": 82, "model_1": "m1", "model_2": "m2", "g1_winner": "tie", "g2_winner": "model_2", **common},
        {"question_id": 83, "model_1": "m1", "model_2": "m2", "g1_winner": "error", "g2_winner": "model_2", **common},
        {"question_id": 84, "model_1": "m1", "model_2": "m2", "g1_winner": "error", "g2_winner": "error", **common},
        # FastChat's single-grading fallback writes one verdict twice, with the two grades.
        {"question_id": 85, "model_1": "m1", "model_2": "m2", "g1_winner": "model_2", "g2_winner": "model_2",
         "m1_score": 6, "m2_score": 9, "judge": ["gpt-4", "single-v1"]},
    ])
    result = read_judgments([path])
    assert result.problems == []
    judge = "gpt-4/pair-v2"
    assert result.comparisons == [
        # g1 showed model_1 first, g2 showed model_2 first; both verdicts name model_1 / model_2.
        Comparison("81", "m1", "m2", "model_a", judge=judge),
        Comparison("81", "m2", "m1", "model_b", judge=judge),
        Comparison("82", "m1", "m2", "tie", judge=judge),
        Comparison("82", "m2", "m1", "model_a", judge=judge),
        Comparison("83", "m2", "m1", "model_a", judge=judge),
        Comparison("85", "m1", "m2", "model_b", judge="gpt-4/single-v1"),
    ]
    assert result.parse_failures == 3
    assert pairwise_records(result.comparisons[:2])["m1"]["win_rate"] == 1.0
    # Each line is also kept whole, verdicts as written, for FastChat's own line-by-line figures.
    assert [(line.question_id, line.g1_winner, line.g2_winner, line.single_grading)
            for line in result.fastchat_lines] == [("81", "model_1", "model_1", False), ("82", "tie", "model_2", False),
                                                   ("83", "error", "model_2", False), ("84", "error", "error", False),
                                                   ("85", "model_2", "model_2", True)]


def test_fastchat_single_grading_lines(tmp_path):
    judge = ["gpt-4", "single-v1"]
    path = write_lines(tmp_path / "gpt-4_single.jsonl", [
        {"question_id": 81, "model": "m1", "score": 8, "judge": judge, "turn": 1, "judgment": "[[8]]"},
        {"question_id": 81, "model": "m1", "score": 9.5, "judge": judge, "turn": 2},
        {"question_id": 82, "model": "m2", "score": -1, "judge": judge, "turn": 1},
        {"question_id": 83, "model": "m2", "score": 0, "judge": judge, "turn": 1},
    ])
    result = read_judgments([path])
    assert result.problems == []
    assert result.grades == [Grade("81", "m1", 8.0, turn=1, judge="gpt-4/single-v1"),
                             Grade("81", "m1", 9.5, turn=2, judge="gpt-4/single-v1"),
                             Grade("83", "m2", 0.0, turn=1, judge="gpt-4/single-v1")]
    assert result.parse_failures == 1
    assert result.comparisons == [] and result.scores == []


def test_malformed_lines_are_reported_with_their_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        {"question_id": 1, "model_a": "m1", "model_b": "m2", "winner": "model_a"},
        '{"question_id": 2, "model_a": ',
        {"question_id": 3, "model_a": "m1", "winner": "model_a"},
        "",
        {"question_id": 5, "model_a": "m1", "model_b": 2, "winner": "model_a"},
        {"question_id": 6, "model_a": "m1", "model_b": "m2", "winner": "A"},
        {"question_id": 7, "model_a": "m1", "model_b": "m2", "score_a": 0, "score_b": 9},
        {"question_id": 8, "model": "m1", "score": 11},
        {"question_id": 9, "model_1": "m1", "model_2": "m2", "g1_winner": "model_1", "g2_winner": "inconsistent"},
        [1, 2],
        {"question_id": 11.5, "model_a": "m1", "model_b": "m2", "winner": "tie"},
        {"question_id": 12, "model_a": "m1", "model_b": "m1", "winner": "tie"},
        {"question_id": 13, "model_a": "m1", "model_b": "m2"},
        {"prompt": "hello"},
        {"question_id": 15, "model_a": "m1", "model_b": "m2", "score_a": "NaN", "score_b": 5, "winner": "tie"},
        {"question_id": 16, "model_a": "m1", "model_b": "m2", "winner": "tie", "judge": ["gpt-4"]},
        {"question_id": 17, "model_a": "m1", "model_b": "m2", "score_a": 10, "score_b": 1},
    ])
    result = read_judgments([path])
    assert [(problem.file, problem.line, problem.message) for problem in result.problems] == [
        (path, 2, "not valid JSON: Expecting value (column 31)"),
        (path, 3, "missing field `model_b`"),
        (path, 5, "field `model_b` must be a string, got number"),
        (path, 6, "field `winner` must be one of model_a, model_b, tie, got 'A'"),
        (path, 7, "field `score_a` must be between 1 and 10, got 0"),
        (path, 8, "field `score` must be between 0 and 10, got 11"),
        (path, 9, "field `g2_winner` must be one of model_1, model_2, tie, error, got 'inconsistent'"),
        (path, 10, "expected a JSON object, got array"),
        (path, 11, "field `question_id` must be an integer or a string, got number"),
        (path, 12, "`model_a` and `model_b` are the same model, `m1`"),
        (path, 13, "missing field `winner` (a verdict) or `score_a` and `score_b` (a score pair)"),
        (path, 14, "not a judgment: expected `model_a`/`model_b` with `winner` or `score_a`/`score_b`, "
                   "a FastChat `model_1`/`model_2` pairwise or `model`/`score` single-grading line, "
                   "an Arena-Hard line with `games`, or an AlpacaEval annotation with `preference`"),
        (path, 15, 'field `score_a` must be a number, got string "NaN"'),
        (path, 16, "field `judge` must be a string, got array"),
    ]
    # Each is counted under a short reason and the models the line names.
    assert [(entry.problem.line, entry.reason, entry.models) for entry in result.excluded] == [
        (2, "not valid JSON", ()), (3, "missing field", ("m1",)), (5, "wrong type", ("m1",)),
        (6, "unknown verdict", ("m1", "m2")), (7, "out of range", ("m1", "m2")), (8, "out of range", ("m1",)),
        (9, "unknown verdict", ("m1", "m2")), (10, "not a judgment", ()), (11, "wrong type", ("m1", "m2")),
        (12, "same model twice", ("m1",)), (13, "missing field", ("m1", "m2")), (14, "not a judgment", ()),
        (15, "wrong type", ("m1", "m2")), (16, "wrong type", ("m1", "m2")),
    ]
    assert all(entry.malformed for entry in result.excluded)
    assert result.problems[0].render() == f"{path}:2: not valid JSON: Expecting value (column 31)"
    # Only the good lines count; a bad line adds nothing, not even its valid half (line 15's winner).
    assert result.comparisons == [Comparison("1", "m1", "m2", "model_a")]
    assert result.scores == [ScorePair("17", "m1", "m2", 10.0, 1.0)]


def test_several_files_and_a_missing_one(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [{"question_id": 1, "model_a": "m1", "model_b": "m2", "winner": "tie"}])
    second = write_lines(tmp_path / "b.jsonl", [{"question_id": 2, "model_a": "m2", "model_b": "m1", "winner": "tie"}])
    result = read_judgments([first, tmp_path / "missing.jsonl", second])
    assert [c.question_id for c in result.comparisons] == ["1", "2"]
    assert [(p.file, p.message) for p in result.problems] == [(str(tmp_path / "missing.jsonl"), "no such file or folder")]
    assert isinstance(result, Judgments)
