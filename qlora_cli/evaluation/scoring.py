"""Benchmark scores from judgments: the QLoRA paper's relative score ("Guanaco reaches 99.3% of ChatGPT"),
win rates, Elo over random orders and Bradley-Terry strengths, each with a 95% interval.

Every function is pure and deterministic given `seed` (numpy's `default_rng`). Intervals are the 2.5th and
97.5th percentiles of the resampled estimate. Bootstraps resample QUESTIONS, not judgments, because the
judgments of one question (both presentation orders, both MT-bench turns) are not independent.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .judgments import FASTCHAT_ERROR, Comparison, FastChatLine, Grade, ScorePair

PERCENTILES = (2.5, 97.5)
# model_a's result for each verdict: a tie is half a win for each side (Elo and Bradley-Terry alike).
SCORE_A = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}
# L2 weight on Bradley-Terry log-strengths: negligible next to real data, but it keeps a model that
# wins every game at a finite strength instead of one the likelihood pushes to infinity.
BT_PRIOR = 1e-3
# Elo runs hold a (comparisons, runs) array of orders; this many entries (~32 MB of int32) at most.
_ELO_BLOCK = 8_000_000
_ELO_PER_LOG = 400 / math.log(10)  # rating points per unit of natural log-strength


def _ci(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, PERCENTILES)
    return [float(low), float(high)]


def _check_positive(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1, got {value}")


def relative_scores(scores: list[ScorePair], reference: str, *, seed: int = 0, resamples: int = 1000) -> dict[str, dict]:
    """Each model's total score as a percentage of `reference`'s, over the pairs that compare the two.

    Pooling both presentation orders cancels a judge's preference for the first (or second) answer
    when each question is judged in both orders, as the QLoRA paper did; the per-order ratios show how
    large that preference is.

    Args:
        scores: relative score pairs; pairs not involving `reference` are ignored.
        reference: the model to compare with (ChatGPT in the paper).
        seed: seed of the question bootstrap; each model's interval uses its own generator from it, so
            it does not change when other models are added.
        resamples: bootstrap resamples.

    Returns:
        {model: {"percent", "percent_reference_first", "percent_model_first", "ci95": [lo, hi],
        "questions", "judgments", "by_category": {category: percent}}} for every model with at least one pair
        against `reference`, in name order. A percentage with no pairs behind it (say, no pair showed
        the reference first) is None; pairs without a category are left out of `by_category`.

    Raises:
        ValueError: `resamples` is less than 1.
    """
    _check_positive(resamples=resamples)
    rows = defaultdict(list)  # model -> [(question, model's score, reference's score, reference first, category)]
    for pair in scores:
        if pair.model_a == reference and pair.model_b != reference:
            rows[pair.model_b].append((pair.question_id, pair.score_b, pair.score_a, True, pair.category))
        elif pair.model_b == reference and pair.model_a != reference:
            rows[pair.model_a].append((pair.question_id, pair.score_a, pair.score_b, False, pair.category))
    return {model: _relative(model_rows, seed, resamples) for model, model_rows in sorted(rows.items())}


def _relative(rows: list[tuple], seed: int, resamples: int) -> dict:
    questions, own, ref, reference_first, categories = zip(*rows)
    own, ref, reference_first = np.array(own), np.array(ref), np.array(reference_first)
    categories = np.array(categories, dtype=object)

    def percent(mask: np.ndarray) -> float | None:
        total = ref[mask].sum()
        return float(100.0 * own[mask].sum() / total) if mask.any() and total > 0 else None

    # Sum each question's pairs once; a resample then draws question totals, so its pairs move together.
    ids, question = np.unique(np.array(questions), return_inverse=True)
    own_totals = np.bincount(question, own, len(ids))
    ref_totals = np.bincount(question, ref, len(ids))
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = 100.0 * own_totals[picks].sum(axis=1) / ref_totals[picks].sum(axis=1)
    return {
        "percent": percent(np.ones(len(own), dtype=bool)),
        "percent_reference_first": percent(reference_first),
        "percent_model_first": percent(~reference_first),
        "ci95": _ci(samples),
        "questions": len(ids),
        "judgments": len(own),
        "by_category": {name: percent(categories == name) for name in sorted({c for c in categories if c is not None})},
    }


def result_a(comparison: Comparison) -> float:
    """model_a's result in [0, 1]: the judge's graded preference when it gave one, else 1, 0 or 0.5."""
    return comparison.result if comparison.result is not None else SCORE_A[comparison.winner]


def pairwise_records(comparisons: list[Comparison]) -> dict[str, dict]:
    """Wins, ties and losses of every model over all its comparisons, in name order.

    A comparison of weight w counts as w games (Arena-Hard's strong verdicts). A model compared with
    itself (AlpacaEval's reference row) counts it once, from model_b's side (generator_2, the model
    AlpacaEval's row is about): a draw is then one tie and half a point, AlpacaEval's 50%.

    Returns:
        {model: {"wins", "ties", "losses", "games", "judgments", "win_rate"}}: `games` = wins + ties +
        losses, `judgments` the comparisons behind them, win_rate = the mean result over the games, which
        is (wins + ties / 2) / games unless a judge graded its preferences (AlpacaEval 2.0).
    """
    records = defaultdict(lambda: {"wins": 0, "ties": 0, "losses": 0, "judgments": 0, "points": 0.0})
    for comparison in comparisons:
        first, second = records[comparison.model_a], records[comparison.model_b]
        weight, share = comparison.weight, result_a(comparison)
        if comparison.model_a == comparison.model_b:
            _count_self_comparison(second, weight, 1 - share, comparison.winner)
            continue
        first["judgments"] += 1
        second["judgments"] += 1
        first["points"] += weight * share
        second["points"] += weight * (1 - share)
        if comparison.winner == "tie":
            first["ties"] += weight
            second["ties"] += weight
        else:
            winner, loser = (first, second) if comparison.winner == "model_a" else (second, first)
            winner["wins"] += weight
            loser["losses"] += weight
    result = {}
    for model, record in sorted(records.items()):
        games = record["wins"] + record["ties"] + record["losses"]
        result[model] = {"wins": record["wins"], "ties": record["ties"], "losses": record["losses"],
                         "games": games, "judgments": record["judgments"], "win_rate": record["points"] / games}
    return result


def _count_self_comparison(record: dict, weight: int, share: float, winner: str) -> None:
    """Adds a comparison of a model with itself to its record once, as the model shown second (model_b)."""
    record["judgments"] += 1
    record["points"] += weight * share
    record[{"tie": "ties", "model_b": "wins", "model_a": "losses"}[winner]] += weight


def rated(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons of two different models: a model compared with itself tells nothing about ratings."""
    return [c for c in comparisons if c.model_a != c.model_b]


def category_win_rates(comparisons: list[Comparison]) -> dict[str, dict[str, float]]:
    """{category: {model: win_rate}} as in `pairwise_records`, over the comparisons that have a category."""
    by_category = defaultdict(list)
    for comparison in comparisons:
        if comparison.category is not None:
            by_category[comparison.category].append(comparison)
    return {
        category: {model: record["win_rate"] for model, record in pairwise_records(group).items()}
        for category, group in sorted(by_category.items())
    }


def category_judgments(comparisons: list[Comparison]) -> dict[str, int]:
    """{category: how many comparisons have it}, the judgments behind each row of `category_win_rates`."""
    counts = defaultdict(int)
    for comparison in comparisons:
        if comparison.category is not None:
            counts[comparison.category] += 1
    return dict(sorted(counts.items()))


def _encode(comparisons: list[Comparison]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(models in name order, index of model_a, index of model_b, model_a's result) for each comparison."""
    models = sorted({c.model_a for c in comparisons} | {c.model_b for c in comparisons})
    index = {model: number for number, model in enumerate(models)}
    first = np.array([index[c.model_a] for c in comparisons], dtype=np.intp)
    second = np.array([index[c.model_b] for c in comparisons], dtype=np.intp)
    result = np.array([result_a(c) for c in comparisons])
    return models, first, second, result


def _as_games(comparisons: list[Comparison]) -> list[Comparison]:
    """Each comparison repeated `weight` times: a strong Arena-Hard verdict is that many games, as there."""
    return [c for c in comparisons for _ in range(c.weight)] if any(c.weight != 1 for c in comparisons) else comparisons


def _table(models: list[str], points: np.ndarray, samples: np.ndarray) -> dict[str, dict]:
    """{model: {"rating", "ci95"}}, best rating first (then by name), from point estimates and samples."""
    table = {model: {"rating": float(points[i]), "ci95": _ci(samples[:, i])} for i, model in enumerate(models)}
    return dict(sorted(table.items(), key=lambda item: (-item[1]["rating"], item[0])))


def _elo_runs(orders: np.ndarray, first, second, result, n_models: int, k: float, initial: float) -> np.ndarray:
    """Final ratings of one Elo run per column of `orders` (one row per step), all runs advanced together.

    Ratings live in one flat array indexed `run * n_models + model`: a 1-D gather is much faster than
    2-D fancy indexing, and this loop runs once per comparison.
    """
    runs = orders.shape[1]
    base = np.arange(runs) * n_models
    ratings = np.full(runs * n_models, float(initial))
    for step in orders:
        a, b = base + first[step], base + second[step]
        # 1 / (1 + 10 ** ((Rb - Ra) / 400)), with exp because it is faster than a float power.
        expected = 1.0 / (1.0 + np.exp((ratings[b] - ratings[a]) * (math.log(10) / 400.0)))
        change = k * (result[step] - expected)
        # The loser's expected score is 1 - expected, so its change is exactly the opposite.
        ratings[a] += change
        ratings[b] -= change
    return ratings.reshape(runs, n_models)


def elo(comparisons: list[Comparison], *, k: float = 32, initial: float = 1000, permutations: int = 10000,
        seed: int = 0) -> dict[str, dict]:
    """Elo ratings as in the QLoRA paper: every model starts at `initial`, each comparison moves the two
    ratings by k * (result - 1 / (1 + 10 ** ((Rb - Ra) / 400))), a tie scoring 0.5 for each side.

    Elo depends on the order of the games, so the comparisons are played in `permutations` random
    orders and the final ratings summarised. A comparison of weight w is played as w games; a model
    compared with itself is left out.

    Returns:
        {model: {"rating": mean final rating, "ci95": [lo, hi] over the orders}}, best first; {} when
        there are no comparisons.

    Raises:
        ValueError: `permutations` is less than 1.
    """
    _check_positive(permutations=permutations)
    comparisons = rated(comparisons)
    if not comparisons:
        return {}
    comparisons = _as_games(comparisons)
    models, first, second, result = _encode(comparisons)
    rng = np.random.default_rng(seed)
    block = max(1, _ELO_BLOCK // len(comparisons))
    finals = []
    for start in range(0, permutations, block):
        # One column per run, so that each step reads a contiguous row.
        orders = np.repeat(np.arange(len(comparisons), dtype=np.int32)[:, None], min(block, permutations - start), 1)
        rng.permuted(orders, axis=0, out=orders)
        finals.append(_elo_runs(orders, first, second, result, len(models), k, initial))
    finals = np.concatenate(finals)
    return _table(models, finals.mean(axis=0), finals)


def _bt_fit(first, second, result, weights, n_models: int, prior: float = BT_PRIOR) -> np.ndarray:
    """Log-strengths (mean 0) maximising the weighted Bradley-Terry log-likelihood minus prior / 2 * |theta|^2.

    Newton's method on a strictly concave objective, with backtracking because a full step overshoots
    when a model wins nearly every game.
    """
    size = n_models * n_models
    forward, backward = first * n_models + second, second * n_models + first
    wins = (np.bincount(forward, weights * result, size) + np.bincount(backward, weights * (1 - result), size))
    games = np.bincount(forward, weights, size) + np.bincount(backward, weights, size)
    wins, games = wins.reshape(n_models, n_models), games.reshape(n_models, n_models)

    def objective(theta: np.ndarray) -> float:  # sum of wins[i, j] * log sigmoid(theta_i - theta_j), minus the prior
        return -(wins * np.logaddexp(0.0, theta[None, :] - theta[:, None])).sum() - prior / 2 * theta @ theta

    theta = np.zeros(n_models)
    for _ in range(200):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j]: chance that i beats j
        gradient = (wins - games * p).sum(axis=1) - prior * theta
        weight = games * p * (1 - p)
        curvature = np.diag(weight.sum(axis=1)) - weight + prior * np.eye(n_models)  # minus the Hessian
        step = np.linalg.solve(curvature, gradient)
        current, length = objective(theta), 1.0
        while objective(theta + length * step) < current and length > 1e-10:
            length /= 2
        theta = theta + length * step
        if np.abs(step).max() < 1e-10:
            break
    return theta - theta.mean()


def bradley_terry(comparisons: list[Comparison], *, seed: int = 0, resamples: int = 200) -> dict[str, dict]:
    """Maximum-likelihood Bradley-Terry strengths (P(i beats j) = s_i / (s_i + s_j)), ties half a win each.

    Unlike Elo, the fit does not depend on the order of the games. A tiny L2 prior on log-strengths
    (BT_PRIOR) keeps a model that always wins finite. A model compared with itself is left out.

    Returns:
        {model: {"rating": 1000 + 400 * log10(s / geometric mean of s), "ci95": [lo, hi]}}, best first;
        {} when there are no comparisons. The interval comes from a bootstrap over questions; a model
        whose questions all drop out of a resample sits at 1000 in it.

    Raises:
        ValueError: `resamples` is less than 1.
    """
    _check_positive(resamples=resamples)
    comparisons = rated(comparisons)
    if not comparisons:
        return {}
    models, first, second, result = _encode(comparisons)
    weights = np.array([c.weight for c in comparisons], dtype=float)
    _, question = np.unique(np.array([c.question_id for c in comparisons]), return_inverse=True)
    n_questions = int(question.max()) + 1
    point = _bt_fit(first, second, result, weights, len(models))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        # A question drawn c times weighs each of its comparisons c times: the same as copying them.
        drawn = np.bincount(rng.integers(0, n_questions, n_questions), minlength=n_questions)
        samples.append(_bt_fit(first, second, result, drawn[question] * weights, len(models)))
    samples = np.array(samples)
    return _table(models, 1000 + _ELO_PER_LOG * point, 1000 + _ELO_PER_LOG * samples)


def fastchat_pairwise(lines: list[FastChatLine], baseline: str | None = None) -> dict:
    """FastChat's own pairwise figures, as `show_result.py` (display_result_pairwise) computes them.

    It scores LINES, not games: a line where either game is "error" is dropped whole; a line whose
    game 1 is a tie, or whose two games disagree, is one tie for both models; otherwise the model both
    games chose wins once. With `baseline` (its `--mode pairwise-baseline --baseline-model`), only the
    lines with the baseline count and the baseline's own row is left out; without (`--mode pairwise-all`),
    every line counts.

    Returns:
        {"mode": "pairwise-all" | "pairwise-baseline", "baseline", "lines": lines counted, "dropped": lines
        dropped for an error game, "models": {model: {"win", "loss", "tie", "win_rate", "loss_rate",
        "win_rate_adjusted"}}}, models by win_rate_adjusted, best first (then by name); rates are
        fractions, as FastChat prints them; win_rate_adjusted = (win + tie / 2) / (win + loss + tie).
    """
    decided = [line for line in lines if FASTCHAT_ERROR not in (line.g1_winner, line.g2_winner)]
    counted = [line for line in decided if baseline is None or baseline in (line.model_1, line.model_2)]
    tally = defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0})
    for line in counted:
        if line.g1_winner == "tie" or line.g1_winner != line.g2_winner:
            tally[line.model_1]["tie"] += 1
            tally[line.model_2]["tie"] += 1
        else:
            winner, loser = ((line.model_1, line.model_2) if line.g1_winner == "model_1"
                             else (line.model_2, line.model_1))
            tally[winner]["win"] += 1
            tally[loser]["loss"] += 1
    models = {}
    for model, counts in tally.items():
        if model == baseline:
            continue
        total = counts["win"] + counts["loss"] + counts["tie"]
        models[model] = {**counts, "win_rate": counts["win"] / total, "loss_rate": counts["loss"] / total,
                         "win_rate_adjusted": (counts["win"] + 0.5 * counts["tie"]) / total}
    order = sorted(models, key=lambda model: (-models[model]["win_rate_adjusted"], model))
    return {"mode": "pairwise-all" if baseline is None else "pairwise-baseline", "baseline": baseline,
            "lines": len(counted), "dropped": len(lines) - len(decided),
            "models": {model: models[model] for model in order}}


def single_grades(grades: list[Grade], *, seed: int = 0, resamples: int = 1000) -> dict[str, dict]:
    """Each model's mean single-answer grade (FastChat's single mode), with a bootstrap 95% CI over questions.

    Returns:
        {model: {"mean", "ci95", "judgments", "questions", "by_turn": {turn: mean}}}, in name order;
        `by_turn` is empty when the grades carry no turn.

    Raises:
        ValueError: `resamples` is less than 1.
    """
    _check_positive(resamples=resamples)
    by_model = defaultdict(list)
    for grade in grades:
        by_model[grade.model].append(grade)
    result = {}
    for model, rows in sorted(by_model.items()):
        scores = np.array([g.score for g in rows])
        ids, question = np.unique(np.array([g.question_id for g in rows]), return_inverse=True)
        totals, counts = np.bincount(question, scores, len(ids)), np.bincount(question, minlength=len(ids))
        picks = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
        samples = totals[picks].sum(axis=1) / counts[picks].sum(axis=1)
        turns = sorted({g.turn for g in rows if g.turn is not None})
        result[model] = {
            "mean": float(scores.mean()), "ci95": _ci(samples), "judgments": len(rows), "questions": len(ids),
            "by_turn": {str(turn): float(np.mean([g.score for g in rows if g.turn == turn])) for turn in turns},
        }
    return result


def report(comparisons: list[Comparison], scores: list[ScorePair], reference: str | None, *, seed: int = 0,
           parse_failures: int = 0, permutations: int = 10000, resamples: int = 1000,
           bt_resamples: int = 200, grades: list[Grade] = (), fastchat_lines: list[FastChatLine] = ()) -> dict:
    """Every score in one JSON-ready dict.

    Returns:
        {"relative": {"reference", "models": relative_scores(...)} or None when there are no scores or
        no reference, "elo", "bradley_terry", "pairwise", "categories": category_win_rates(...),
        "category_judgments", "single": single_grades(...) or {}, "fastchat": fastchat_pairwise(...) or
        None when there are no FastChat pairwise lines, "parse_failures"}; the comparison tables are {}
        when there are no comparisons. FastChat's figures are those of its pairwise-baseline mode when
        `reference` is one of the models its lines compare, else those of its pairwise-all mode.
    """
    fastchat = None
    if fastchat_lines:
        in_lines = {model for line in fastchat_lines for model in (line.model_1, line.model_2)}
        fastchat = fastchat_pairwise(list(fastchat_lines), reference if reference in in_lines else None)
    relative = None
    if scores and reference:
        relative = {"reference": reference,
                    "models": relative_scores(scores, reference, seed=seed, resamples=resamples)}
    return {
        "relative": relative,
        "elo": elo(comparisons, permutations=permutations, seed=seed),
        "bradley_terry": bradley_terry(comparisons, seed=seed, resamples=bt_resamples),
        "pairwise": pairwise_records(comparisons),
        "categories": category_win_rates(comparisons),
        "category_judgments": category_judgments(comparisons),
        "single": single_grades(list(grades), seed=seed, resamples=resamples) if grades else {},
        "fastchat": fastchat,
        "parse_failures": parse_failures,
    }
