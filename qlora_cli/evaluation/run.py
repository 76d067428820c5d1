"""`qlora eval`: answers from each model, judged in both orders, scored, reported — one command.

    OUT/answers/<model>.jsonl     answers, appended batch by batch and reused when present
    OUT/judge_cache.jsonl         every judge reply, keyed by (judge, prompt, question, answers)
    OUT/judgments.jsonl           the judgments in the plain form `qlora eval score` reads
    OUT/report.json, report.md, elo.png, categories.png
    OUT/fastchat/model_answer/<model>.jsonl, OUT/arena-hard/model_answer/<model>.jsonl   with --answers-format

Interrupted (Ctrl-C), it keeps both caches and says so; the same command then continues from them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Iterator

from ..core.api_keys import read_api_key
from ..core.console import Steps
from ..core.errors import Problem, RunFailure, RunInterrupted, UserError
from ..core.files import write_atomic
from ..inference.sampling import Sampling
from .answers import answers_for_judging, ensure_answers, missing_answers, read_answers, slug, write_answer_layout
from .http_judge import HttpJudge, served_models
from .judge_cache import JudgmentCache
from .judges import JudgeError, judge_pairs
from .local_judge import LocalJudge
from .judgments import Comparison, Judgments, ScorePair, excerpt
from .questions import read_questions
from .report import write_report
from .scoring import report as score_report

SMALL_JUDGE_PARAMETERS = 1_000_000_000
MAX_SHOWN_PROBLEMS = 20


class Models:
    """The models under test, loaded lazily and once. A run directory's base model ("base") is the same
    loaded model with its adapter switched off: the base exactly as it was fine-tuned (same quantization)."""

    def __init__(self, target: str):
        from ..core.rundir import is_run_dir

        self.target = target
        self.run_dir = Path(target) if Path(target).is_dir() and is_run_dir(Path(target)) else None
        self._loaded: dict[str, object] = {}

    def name(self, reference: str) -> str:
        if reference == "base":
            if self.run_dir is None:
                raise UserError("--baseline base needs a run directory as the model under test")
            return f"{self.run_dir.resolve().name}-base"
        if reference == self.target and self.run_dir is not None:
            return self.run_dir.resolve().name
        return slug(Path(reference).name if Path(reference).exists() else reference)

    def loader(self, reference: str):
        from ..inference.generate import load_for_generation

        def load():
            key = "run" if reference in ("base", self.target) and self.run_dir is not None else reference
            if key not in self._loaded:
                self._loaded[key] = load_for_generation(str(self.run_dir) if key == "run" else reference)
            loaded = self._loaded[key]
            if key == "run":
                lora = loaded.model.base_model
                lora.disable_adapter_layers() if reference == "base" else lora.enable_adapter_layers()
            return loaded

        return load


def is_loopback(url: str) -> bool:
    """Whether `url` points at this machine (localhost or a loopback address)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_http(spec: str) -> bool:
    """Whether the judge `spec` is an OpenAI-compatible endpoint rather than a local model reference."""
    return spec.startswith(("http://", "https://"))


def judge_key_env(spec: str, api_key_env: str | None, say=print) -> str | None:
    """The environment variable an HTTP judge at `spec` reads its API key from, or None to send no key.

    An endpoint on this machine (`qlora serve`) is called without a key when the variable is not set;
    one elsewhere needs it, and is refused here, before any answer is generated, rather than after
    every judge call has failed.

    Raises:
        UserError: the judge is not on this machine and `api_key_env` is not set in the environment.
    """
    if api_key_env and not os.environ.get(api_key_env) and is_loopback(spec):
        say(f"No API key sent to {spec}: {api_key_env} is not set and the judge is on this machine.")
        return None
    read_api_key(api_key_env)  # only to refuse an unset variable: the judge reads the key itself, per call
    return api_key_env


def make_judge(spec: str, judge_model: str | None, api_key_env: str | None):
    """An OpenAI-compatible endpoint (`http(s)://...`) or a local model reference, and a note for the report.

    For an endpoint, `judge_model` defaults to the one model it lists at /models, and `api_key_env` is
    the variable the key is read from, as `judge_key_env` gives it (None: no key is sent).
    """
    if is_http(spec):
        if not judge_model:
            try:
                served = served_models(spec, api_key_env)
            except JudgeError as error:
                raise UserError(f"--judge-model: not given, and {error}") from None
            if len(served) != 1:
                raise UserError(f"--judge-model: {spec} serves {len(served)} models ({', '.join(served) or 'none'}); "
                                "name the judge with --judge-model")
            judge_model = served[0]
        return HttpJudge(spec, judge_model, api_key_env=api_key_env), None
    from ..inference.generate import load_for_generation

    loaded = load_for_generation(spec)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    note = None
    if parameters < SMALL_JUDGE_PARAMETERS:
        note = (f"The judge ({spec}, {parameters / 1e6:.0f}M parameters) is far too small to be a meaningful judge: "
                "these figures show the pipeline working, not which model is better.")
    return LocalJudge(loaded), note


def plain_judgment(judgment) -> dict:
    """A judgment in the plain JSONL form that `qlora eval score` reads."""
    row = {"question_id": judgment.question_id, "model_a": judgment.model_a, "model_b": judgment.model_b}
    if isinstance(judgment, Comparison):
        row["winner"] = judgment.winner
    else:
        row.update(score_a=judgment.score_a, score_b=judgment.score_b)
    return {**row, "category": judgment.category, "judge": judgment.judge}


def _kept(out: Path) -> str:
    """What an interrupted run leaves for the next one: answers and judge replies on disk."""
    answers = sum(len(p.read_bytes().splitlines()) for p in sorted((out / "answers").glob("*.jsonl")))
    cache = out / "judge_cache.jsonl"
    replies = len(cache.read_bytes().splitlines()) if cache.is_file() else 0
    return (f"{answers} answer(s) in {out / 'answers'} and {replies} judge repl{'y' if replies == 1 else 'ies'} "
            f"in {cache}")


@contextmanager
def _kept_on_stop(out: Path) -> Iterator[None]:
    """Turns Ctrl-C into RunInterrupted and a judge that failed for good into RunFailure, each saying what
    `out` keeps for the next run."""
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(f"Interrupted. Kept {_kept(out)}.\nRun the same command again to continue from "
                             "there: nothing kept is answered or judged twice.") from None
    except JudgeError as error:
        raise RunFailure(f"{error}\nKept {_kept(out)}; running the same command again asks the judge only "
                         "for what is missing.") from None


def run_eval(target: str, *, baselines: list[str], questions_path: Path | None, judge_spec: str,
             judge_model: str | None, api_key_env: str | None, modes: list[str], out: Path, limit: int | None,
             sampling: Sampling, console, answer_files: list[Path] = (), answer_formats: list[str] = (),
             answers_only: bool = False) -> dict:
    """Answer, judge both orders, score against the first baseline, and write the report into `out`.

    `answer_files` are answers made elsewhere (this project's form, FastChat's or Arena-Hard's): each adds
    a model, named as in the file (else by the file name), compared with the model under test like a
    baseline. `answer_formats` also writes every model's answers in those tools' layouts; with
    `answers_only` nothing is judged.

    Raises:
        RunInterrupted: Ctrl-C; what was answered and judged is kept, and the message says how to go on.
        RunFailure: judge calls failed for good (after retries); the replies received are kept. Or no
            reply held a judgment, so nothing was scored: the report is written first, and the message
            shows one of the replies.
    """
    with _kept_on_stop(out):
        timings: dict[str, float] = {}
        if is_http(judge_spec) and not answers_only:
            api_key_env = judge_key_env(judge_spec, api_key_env, say=console.print)
        progress = partial(Steps, console)  # (description, total) -> a context manager with advance(n)
        questions = read_questions(questions_path)[:limit]
        models = Models(target)
        names = [models.name(target)] + [models.name(b) for b in baselines]
        supplied = {}
        for path in answer_files:
            name, rows = read_answers(path)
            supplied[name or slug(path.stem)] = rows
        names += list(supplied)
        if len(set(names)) != len(names):
            raise UserError(f"the models to compare must differ, got {', '.join(names)}")
        answers = {name: rows for name, rows in supplied.items()}
        for name in supplied:
            missing_answers(name, answers[name], questions)
        for reference, name in zip([target, *baselines], names):
            path = out / "answers" / f"{slug(name)}.jsonl"
            answers[name], seconds = ensure_answers(path, name, questions, sampling, models.loader(reference),
                                                    console.print, progress=progress)
            missing_answers(name, answers[name], questions)
            timings[f"answers of {name}"] = round(seconds, 1)
        for layout in answer_formats:
            for name in names:
                written = write_answer_layout(out, layout, name, questions, answers[name])
                console.print(f"Answers of {name} in {layout}'s layout: {written}")
        if answers_only:
            return {"models": names, "questions": len(questions), "answers": str(out / "answers")}

        started = time.perf_counter()
        judge, note = make_judge(judge_spec, judge_model, api_key_env)
        timings["loading the judge"] = round(time.perf_counter() - started, 1)
        cache = JudgmentCache(out / "judge_cache.jsonl")
        judged = {name: answers_for_judging(answers[name]) for name in names}
        pairs = [(names[0], other) for other in names[1:]]
        comparisons: list[Comparison] = []
        scores: list[ScorePair] = []
        failures, calls, unread = 0, [], {}
        for mode in modes:
            started = time.perf_counter()
            console.print(f"Judging {len(questions)} questions x {len(pairs)} pair(s) x 2 orders ({mode}) with {judge.name}")
            found, failed, made = judge_pairs(judge, questions, judged, pairs, mode=mode, cache=cache,
                                              progress=lambda total, mode=mode: progress(f"Judging ({mode})", total))
            (comparisons if mode == "pairwise" else scores).extend(found)
            failures += failed
            calls += made
            unread[mode] = unread_replies(made)
            timings[f"judging ({mode})"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "judgments.jsonl", "".join(json.dumps(plain_judgment(j)) + "\n" for j in comparisons + scores))
        result = score_report(comparisons, scores, names[1], parse_failures=failures)
        timings["scoring"] = round(time.perf_counter() - started, 1)
        fresh = [c for c in calls if not c["cached"]]
        notes = ([note] if note else []) + [unread_note(mode, summary) for mode, summary in unread.items()
                                            if summary["replies"] and summary["replies"] == summary["unread"]]
        result.update(
            models=names, reference=names[1], questions=len(questions), judge=judge.name, modes=modes,
            sampling=asdict(sampling), notes=notes, timings=timings, unread_replies=unread,
            judgments={"read": len(calls), "scored": len(comparisons) + len(scores), "excluded": failures,
                       "malformed": 0, "unscored": failures},
            judge_calls={"total": len(calls), "made": len(fresh), "cached": len(calls) - len(fresh),
                         "prompt_tokens": sum(c["prompt_tokens"] or 0 for c in fresh),
                         "completion_tokens": sum(c["completion_tokens"] or 0 for c in fresh),
                         "seconds": round(sum(c["seconds"] or 0 for c in fresh), 1)},
        )
        write_report(result, out, console)
        if calls and not comparisons and not scores:
            raise RunFailure(nothing_scored(unread, out))
        return result


# What each mode's parser reads in a reply (verdicts.py), for messages about replies it could not read.
EXPECTED_REPLY = {"pairwise": "a verdict [[A]], [[B]] or [[C]]",
                  "relative": "a first line `Score A: <1-10> Score B: <1-10>`"}


def unread_replies(calls: list[dict]) -> dict:
    """{"replies", "unread", "example"}: how many games one mode judged, how many replies held no judgment,
    and the first of those as {question_id, model_a (shown first), model_b, reply (shortened)}, or None."""
    unread = [call for call in calls if not call["parsed"]]
    example = None
    if unread:
        first = unread[0]
        example = {"question_id": first["question_id"], "model_a": first["model_a"], "model_b": first["model_b"],
                   "reply": excerpt(first["reply"])}
    return {"replies": len(calls), "unread": len(unread), "example": example}


def _quoted(example: dict) -> str:
    return (f"question {example['question_id']}, {example['model_a']} shown first: "
            f"\"{example['reply']}\"")


def unread_note(mode: str, summary: dict) -> str:
    """The report's note for a mode in which no reply could be scored, with one of the replies."""
    return (f"No {mode} judgment was scored: none of the judge's {summary['unread']} {mode} replies held "
            f"{EXPECTED_REPLY[mode]}. One of them ({_quoted(summary['example'])}).")


def nothing_scored(unread: dict, out: Path) -> str:
    """Why `qlora eval run` scored nothing, with one reply, and what the user can do."""
    total = sum(summary["unread"] for summary in unread.values())
    mode, summary = next((mode, summary) for mode, summary in unread.items() if summary["example"])
    expected = " or ".join(f"{EXPECTED_REPLY[m]} ({m})" for m in unread)
    return (f"Nothing was scored: none of the judge's {total} replies held {expected}.\n"
            f"One of them ({mode}, {_quoted(summary['example'])}).\n"
            f"The report in {out} says the same. The replies are cached in {out / 'judge_cache.jsonl'}, so the "
            "same command would read them again: use a judge that follows the prompt (--judge, --judge-model), "
            "or delete the cache to ask this one again.")


def excluded_section(judgments: Judgments) -> dict:
    """report.json's account of what was left out: per model pair and reason, and every line."""
    return {
        "total": len(judgments.excluded),
        "by_pair": judgments.excluded_counts(),
        "rows": [{"where": e.problem.location(), "file": str(e.problem.file) if e.problem.file else None,
                  "line": e.problem.line, "models": list(e.models), "reason": e.reason, "message": e.problem.message,
                  "malformed": e.malformed} for e in judgments.excluded],
    }


def _shown(problems: list[Problem]) -> list[Problem | str]:
    more = len(problems) - MAX_SHOWN_PROBLEMS
    return problems[:MAX_SHOWN_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])


def self_comparison_notes(comparisons: list[Comparison]) -> list[str]:
    """A note per model compared with itself (AlpacaEval's reference row), saying how it is scored."""
    counts: dict[str, int] = {}
    for comparison in comparisons:
        if comparison.model_a == comparison.model_b:
            counts[comparison.model_a] = counts.get(comparison.model_a, 0) + 1
    return [f"{model} is compared with itself in {count} judgment(s) (AlpacaEval's row for its reference): "
            "identical outputs are draws (preference 1.5, as AlpacaEval's annotator sets them), so such a file "
            "scores 50%, as AlpacaEval lists it; each counts once in the model's record, and not in Elo or "
            "Bradley-Terry, which a model compared with itself tells nothing."
            for model, count in sorted(counts.items())]


def score_files(files: list[Path], reference: str | None, out: Path, console, *, strict: bool = False) -> dict:
    """`qlora eval score`: re-score judgment files made elsewhere (plain JSONL, FastChat, Arena-Hard-Auto,
    AlpacaEval).

    Lines that hold no usable judgment (out of range, unparsable, unknown verdicts) are left out of the
    scores, counted per model pair and reason, and listed with file and line in the report; with
    `strict` they are an error instead, and nothing is written.

    Raises:
        UserError: a file cannot be read; with `strict`, any malformed line; nothing scored and some line
            malformed (or no line at all).
        RunFailure: nothing scored although every line is a valid judgment: the tool that wrote them
            recorded no verdict for any (the report is written first, listing each).
    """
    from .judgments import read_judgments

    judgments = read_judgments(files)
    if judgments.file_problems:
        raise UserError(judgments.file_problems, title="cannot read the judgment files:")
    malformed = [entry.problem for entry in judgments.malformed]
    if strict and malformed:
        raise UserError(_shown(malformed), title=f"{len(malformed)} bad judgment line(s) (--strict):")
    nothing = not judgments.comparisons and not judgments.scores and not judgments.grades
    if nothing and (malformed or not judgments.excluded):
        raise UserError(_shown([entry.problem for entry in judgments.excluded]),
                        title="no usable judgments in " + ", ".join(map(str, files))
                              + (f"; {len(judgments.excluded)} line(s) left out:" if judgments.excluded else ""))
    if judgments.scores and reference is None:
        console.print("[yellow]Score pairs found but no --reference: relative scores are left out.")
    result = score_report(judgments.comparisons, judgments.scores, reference, grades=judgments.grades,
                          parse_failures=judgments.parse_failures, fastchat_lines=judgments.fastchat_lines)
    scored = len(judgments.comparisons) + len(judgments.scores) + len(judgments.grades)
    result.update(
        notes=self_comparison_notes(judgments.comparisons),
        sources=[str(f) for f in files], comparisons=len(judgments.comparisons),
        score_pairs=len(judgments.scores), grades=len(judgments.grades),
        judgments={"read": judgments.read_count(), "scored": scored, "excluded": len(judgments.excluded),
                   "malformed": len(malformed), "unscored": judgments.parse_failures},
        excluded=excluded_section(judgments),
    )
    write_report(result, out, console)
    if nothing:
        first = judgments.excluded[0].problem
        raise RunFailure(f"Nothing was scored: the {len(judgments.excluded)} judgment(s) in "
                         f"{', '.join(map(str, files))} were all recorded without a verdict; the first:\n"
                         f"{first.render()}\nThe report in {out} lists each with its file and line.")
    return result
