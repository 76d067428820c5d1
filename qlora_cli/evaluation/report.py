"""The evaluation report: report.json, report.md, plots, and tables on the console."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import __version__
from ..core.files import staged, write_atomic, write_json

MAX_LISTED = 200  # excluded lines listed in report.md; report.json lists them all
ELO_PLOT = "elo.png"
CATEGORIES_PLOT = "categories.png"


def _ci(entry: dict, spec: str = ".1f") -> str:
    low, high = entry.get("ci95") or (None, None)
    return f"[{low:{spec}}, {high:{spec}}]" if low is not None else "-"


def tables(report: dict) -> list[Table]:
    """Rich tables of the relative scores, Elo, Bradley-Terry and pairwise records."""
    result = []
    relative = report.get("relative")
    if relative:
        table = Table(title=f"Relative score (% of {relative['reference']}'s total)", title_justify="left")
        for column in ("model", "pooled %", "95% CI", "reference first %", "model first %", "questions", "judgments"):
            table.add_column(column, justify="right")
        for model, entry in relative["models"].items():
            table.add_row(model, _num(entry.get("percent")), _ci(entry), _num(entry.get("percent_reference_first")),
                          _num(entry.get("percent_model_first")), str(entry.get("questions", "")),
                          str(entry.get("judgments", "")))
        result.append(table)
    if report.get("pairwise"):
        table = Table(title="Ratings (Elo: 10,000 orderings, K=32; Bradley-Terry: maximum likelihood)", title_justify="left")
        for column in ("model", "Elo", "95% CI", "Bradley-Terry", "95% CI", "wins", "ties", "losses",
                       "win rate per game", "judgments"):
            table.add_column(column, justify="right")
        for model in _rated_first(report):
            entry, bt = report["elo"].get(model, {}), report["bradley_terry"].get(model, {})
            record = report["pairwise"].get(model, {})
            table.add_row(model, _num(entry.get("rating")), _ci(entry), _num(bt.get("rating")), _ci(bt),
                          _count(record.get("wins")), _count(record.get("ties")), _count(record.get("losses")),
                          f"{record.get('win_rate', 0):.1%}", str(record.get("judgments", "")))
        result.append(table)
    fastchat = report.get("fastchat")
    if fastchat and fastchat["models"]:
        table = Table(title=_fastchat_title(fastchat), title_justify="left")
        for column in FASTCHAT_COLUMNS:
            table.add_column(column, justify="right")
        for model, entry in fastchat["models"].items():
            table.add_row(*_fastchat_row(model, entry))
        result.append(table)
    if report.get("single"):
        table = Table(title="Single-answer grades (mean of the judge's 0-10 ratings)", title_justify="left")
        for column in ("model", "mean", "95% CI", "by turn", "questions", "judgments"):
            table.add_column(column, justify="right")
        for model, entry in report["single"].items():
            table.add_row(model, f"{entry['mean']:.2f}", _ci(entry, ".2f"), _turns(entry), str(entry["questions"]),
                          str(entry["judgments"]))
        result.append(table)
    return result


FASTCHAT_COLUMNS = ("model", "win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted")


def _fastchat_title(fastchat: dict) -> str:
    """What the FastChat table is: the command of FastChat's that prints the same figures, and what it counted."""
    command = "show_result.py --mode " + fastchat["mode"]
    if fastchat["baseline"]:
        command += f" --baseline-model {fastchat['baseline']}"
    return (f"FastChat's own figures ({command}): {fastchat['lines']} lines, each one win, loss or tie; "
            f"{fastchat['dropped']} line(s) with an `error` game dropped")


def _fastchat_row(model: str, entry: dict) -> list[str]:
    # Six decimals, as FastChat's pandas table prints them, so the two can be compared digit by digit.
    return [model, str(entry["win"]), str(entry["loss"]), str(entry["tie"]),
            *(f"{entry[key]:.6f}" for key in ("win_rate", "loss_rate", "win_rate_adjusted"))]


def _rated_first(report: dict) -> list[str]:
    """The models of the ratings table: by Elo, best first, then those with a record but no rating (a
    model compared only with itself, AlpacaEval's reference row)."""
    return list(report["elo"]) + [model for model in report["pairwise"] if model not in report["elo"]]


def _count(value) -> str:
    """A win/tie/loss count; graded AlpacaEval preferences never make these fractional, weights are integers."""
    return "" if value is None else str(value)


def _turns(entry: dict) -> str:
    return ", ".join(f"{turn}: {mean:.2f}" for turn, mean in entry.get("by_turn", {}).items()) or "-"


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(report: dict) -> str:
    """report.md: the same tables in Markdown, with the notes."""
    lines = ["# Evaluation report", ""]
    for note in report.get("notes", []):
        lines += [f"> {note}", ""]
    relative = report.get("relative")
    counts = report.get("judgments")
    if counts:
        lines += [f"Judgments read: {counts['read']}; scored: {counts['scored']}; left out: {counts['excluded']} "
                  f"({counts['malformed']} malformed, {counts['unscored']} without a verdict).", ""]
    if relative:
        lines += [f"## Relative score (% of {relative['reference']}'s total score, both presentation orders)", "",
                  "| model | pooled % | 95% CI | reference first % | model first % | questions | judgments |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for model, e in relative["models"].items():
            lines.append(f"| {model} | {_num(e.get('percent'))} | {_ci(e)} | {_num(e.get('percent_reference_first'))} "
                         f"| {_num(e.get('percent_model_first'))} | {e.get('questions', '')} | {e.get('judgments', '')} |")
        lines.append("")
    if report.get("pairwise"):
        lines += ["## Ratings", "",
                  "| model | Elo | 95% CI | Bradley-Terry | 95% CI | W / T / L | win rate per game | judgments |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for model in _rated_first(report):
            e, bt, r = report["elo"].get(model, {}), report["bradley_terry"].get(model, {}), report["pairwise"][model]
            lines.append(f"| {model} | {_num(e.get('rating'))} | {_ci(e)} | {_num(bt.get('rating'))} | {_ci(bt)} "
                         f"| {r.get('wins', 0)} / {r.get('ties', 0)} / {r.get('losses', 0)} | {r.get('win_rate', 0):.1%} "
                         f"| {r.get('judgments', '')} |")
        lines.append("")
    fastchat = report.get("fastchat")
    if fastchat and fastchat["models"]:
        lines += [f"## {_fastchat_title(fastchat)}", "",
                  "Win rate per game (above) counts each game of a line; FastChat counts each line once, as below.", "",
                  "| " + " | ".join(FASTCHAT_COLUMNS) + " |", "|" + " --- |" * len(FASTCHAT_COLUMNS)]
        lines += ["| " + " | ".join(_fastchat_row(model, entry)) + " |" for model, entry in fastchat["models"].items()]
        lines.append("")
    if report.get("categories"):
        models = sorted({m for rates in report["categories"].values() for m in rates})
        per_category = report.get("category_judgments", {})
        lines += ["## Win rate by category", "", "| category | " + " | ".join(models) + " | judgments |",
                  "| --- |" + " --- |" * (len(models) + 1)]
        for category, rates in sorted(report["categories"].items()):
            lines.append(f"| {category} | " + " | ".join(f"{rates.get(m, 0):.0%}" for m in models)
                         + f" | {per_category.get(category, '')} |")
        lines.append("")
    if report.get("single"):
        lines += ["## Single-answer grades (mean of the judge's 0-10 ratings)", "",
                  "| model | mean | 95% CI | by turn | questions | judgments |", "| --- | --- | --- | --- | --- | --- |"]
        for model, e in report["single"].items():
            lines.append(f"| {model} | {e['mean']:.2f} | {_ci(e, '.2f')} | {_turns(e)} | {e['questions']} | {e['judgments']} |")
        lines.append("")
    lines += [f"Judge replies that could not be parsed (never scored): {report.get('parse_failures', 0)}", ""]
    lines += _excluded_markdown(report.get("excluded"))
    if report.get("timings"):
        lines += ["## Time", ""] + [f"- {stage}: {seconds:.1f} s" for stage, seconds in report["timings"].items()] + [""]
    return "\n".join(lines)


def _excluded_markdown(excluded: dict | None) -> list[str]:
    """The lines left out of the scores: counted per model pair and reason, then listed file:line."""
    if not excluded or not excluded.get("total"):
        return []
    lines = [f"## Judgments left out of the scores ({excluded['total']})", "", "| models | reason | judgments |",
             "| --- | --- | --- |"]
    for pair, reasons in excluded["by_pair"].items():
        lines += [f"| {pair} | {reason} | {count} |" for reason, count in reasons.items()]
    rows = excluded["rows"]
    lines += ["", *[f"- `{row['where']}`: {row['message']}" for row in rows[:MAX_LISTED]]]
    if len(rows) > MAX_LISTED:
        lines.append(f"- ... and {len(rows) - MAX_LISTED} more, all listed in report.json")
    return lines + [""]


def _save(figure, target: Path) -> Path:
    """Writes `figure` to `target` whole or not at all (the staging name keeps the .png suffix matplotlib reads)."""
    plt = _pyplot()
    try:
        with staged(target) as staging:
            figure.savefig(staging)
    finally:
        plt.close(figure)
    return target


def plots(report: dict, folder: Path) -> list[Path]:
    """elo.png (ratings with 95% intervals) and categories.png (win rate per category), when there are
    comparisons (and categories). A plot the report does not make is removed from `folder`, so that a
    report written over an older one never sits beside the older one's plots."""
    written = []
    if report.get("elo"):
        written.append(_save(_elo_figure(report), folder / ELO_PLOT))
        if report.get("categories"):
            written.append(_save(_categories_figure(report), folder / CATEGORIES_PLOT))
    for name in (ELO_PLOT, CATEGORIES_PLOT):
        if folder / name not in written:
            (folder / name).unlink(missing_ok=True)
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _elo_figure(report: dict):
    plt = _pyplot()
    models = list(report["elo"])
    ratings = [report["elo"][m]["rating"] for m in models]
    # Clipped at 0: when every ordering ends alike, the mean can sit a rounding error outside the interval.
    errors = [[max(0.0, r - report["elo"][m]["ci95"][0]) for m, r in zip(models, ratings)],
              [max(0.0, report["elo"][m]["ci95"][1] - r) for m, r in zip(models, ratings)]]
    figure, axes = plt.subplots(figsize=(6, 0.6 * len(models) + 1.5), dpi=120)
    axes.barh(models, ratings, xerr=errors, capsize=4, color="#4c72b0")
    axes.axvline(1000, color="grey", linewidth=0.8)
    axes.set_xlabel("Elo (mean of 10,000 orderings, 95% interval)")
    axes.set_xlim(min(ratings) - 100, max(ratings) + 100)
    figure.tight_layout()
    return figure


def _categories_figure(report: dict):
    plt = _pyplot()
    models = list(report["elo"])
    categories = sorted(report["categories"])
    figure, axes = plt.subplots(figsize=(max(6, len(categories) * 0.9), 3.5), dpi=120)
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        axes.bar([c + index * width for c in range(len(categories))],
                 [report["categories"][cat].get(model, 0) for cat in categories], width, label=model)
    axes.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, rotation=30, ha="right")
    axes.set_ylabel("win rate (tie = half)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def write_report(report: dict, folder: Path, console: Console) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", {"qlora_version": __version__, **report})
    write_atomic(folder / "report.md", markdown(report))
    plots(report, folder)
    for note in report.get("notes", []):
        console.print(f"[yellow]{note}")
    for table in tables(report):
        console.print(table)
    console.print(f"Parse failures (never scored): {report.get('parse_failures', 0)}")
    excluded = report.get("excluded") or {}
    if excluded.get("total"):
        reasons = {}
        for pair_reasons in excluded["by_pair"].values():
            for reason, count in pair_reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        summary = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        console.print(f"[yellow]Left out of the scores: {excluded['total']} of {report['judgments']['read']} "
                      f"judgments ({summary}); each is listed with its file and line in report.md", markup=True)
    console.print(f"Report: {folder / 'report.json'}, {folder / 'report.md'}")
