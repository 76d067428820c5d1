"""`qlora eval`: answers from each model, judged in both orders, scored, reported — one command.

    OUT/answers/<model>.jsonl     answers, reused when present
    OUT/judge_cache.jsonl         every judge reply, keyed by (judge, prompt, question, answers)
    OUT/judgments.jsonl           the judgments in the plain form `qlora eval score` reads
    OUT/report.json, report.md, elo.png, categories.png
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from .answers import Sampling, answers_for_judging, ensure_answers, missing_answers, read_answers, slug
from .judges import HttpJudge, JudgmentCache, LocalJudge, judge_pairs
from .judgments import Comparison, ScorePair
from .questions import read_questions
from .report import write_report
from .scoring import report as score_report

SMALL_JUDGE_PARAMETERS = 1_000_000_000


class Models:
    """The models under test, loaded lazily and once. A run directory's base model ("base") is the same
    loaded model with its adapter switched off: the base exactly as it was fine-tuned (same quantization)."""

    def __init__(self, target: str):
        from ..generate import is_run_dir

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
        from ..generate import load_for_generation

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


def make_judge(spec: str, judge_model: str | None, api_key_env: str | None):
    """An OpenAI-compatible endpoint (`http(s)://...` with --judge-model) or a local model reference."""
    if spec.startswith(("http://", "https://")):
        if not judge_model:
            raise UserError("--judge-model: an HTTP judge needs the model name the endpoint serves")
        return HttpJudge(spec, judge_model, api_key_env=api_key_env), None
    from ..generate import load_for_generation

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


def run_eval(target: str, *, baselines: list[str], questions_path: Path | None, judge_spec: str,
             judge_model: str | None, api_key_env: str | None, modes: list[str], out: Path, limit: int | None,
             sampling: Sampling, console, answer_files: list[Path] = ()) -> dict:
    """Answer, judge both orders, score against the first baseline, and write the report into `out`.

    `answer_files` are answers made elsewhere (this project's form or FastChat's): each adds a model,
    named as in the file (else by the file name), compared with the model under test like a baseline.
    """
    timings: dict[str, float] = {}
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
        answers[name], seconds = ensure_answers(path, name, questions, sampling, models.loader(reference), console.print)
        missing_answers(name, answers[name], questions)
        timings[f"answers of {name}"] = round(seconds, 1)

    started = time.perf_counter()
    judge, note = make_judge(judge_spec, judge_model, api_key_env)
    timings["loading the judge"] = round(time.perf_counter() - started, 1)
    cache = JudgmentCache(out / "judge_cache.jsonl")
    judged = {name: answers_for_judging(answers[name]) for name in names}
    pairs = [(names[0], other) for other in names[1:]]
    comparisons: list[Comparison] = []
    scores: list[ScorePair] = []
    failures, calls = 0, []
    for mode in modes:
        started = time.perf_counter()
        console.print(f"Judging {len(questions)} questions x {len(pairs)} pair(s) x 2 orders ({mode}) with {judge.name}")
        found, failed, made = judge_pairs(judge, questions, judged, pairs, mode=mode, cache=cache)
        (comparisons if mode == "pairwise" else scores).extend(found)
        failures += failed
        calls += made
        timings[f"judging ({mode})"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "judgments.jsonl").write_text("".join(json.dumps(plain_judgment(j)) + "\n" for j in comparisons + scores))
    result = score_report(comparisons, scores, names[1], parse_failures=failures)
    timings["scoring"] = round(time.perf_counter() - started, 1)
    fresh = [c for c in calls if not c["cached"]]
    result.update(
        models=names, reference=names[1], questions=len(questions), judge=judge.name, modes=modes,
        sampling=asdict(sampling), notes=[note] if note else [], timings=timings,
        judge_calls={"total": len(calls), "made": len(fresh), "cached": len(calls) - len(fresh),
                     "prompt_tokens": sum(c["prompt_tokens"] or 0 for c in fresh),
                     "completion_tokens": sum(c["completion_tokens"] or 0 for c in fresh),
                     "seconds": round(sum(c["seconds"] or 0 for c in fresh), 1)},
    )
    write_report(result, out, console)
    return result


def score_files(files: list[Path], reference: str | None, out: Path, console) -> dict:
    """`qlora eval score`: re-score judgment files made elsewhere (plain JSONL or FastChat's)."""
    from .judgments import read_judgments

    judgments = read_judgments(files)
    if judgments.problems:
        raise UserError(judgments.problems[:20], title=f"{len(judgments.problems)} bad judgment line(s):")
    if not judgments.comparisons and not judgments.scores:
        raise UserError("no pairwise or relative judgments in " + ", ".join(map(str, files)))
    if judgments.scores and reference is None:
        console.print("[yellow]Score pairs found but no --reference: relative scores are left out.")
    result = score_report(judgments.comparisons, judgments.scores, reference, parse_failures=judgments.parse_failures)
    result.update(sources=[str(f) for f in files], comparisons=len(judgments.comparisons), score_pairs=len(judgments.scores))
    write_report(result, out, console)
    return result
