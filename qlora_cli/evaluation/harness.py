"""lm-evaluation-harness on a qlora model: the standard benchmarks (ARC, HellaSwag, GSM8K, MMLU, ...) and tasks
defined in local YAML files, scored by the harness itself (`lm_eval.simple_evaluate`) on the model as qlora loads
it: a run directory as trained (its quantized base with the adapter), a merged or local model, or a hub id.

The harness gets the loaded model and tokenizer (its HFLM wrapper of a model in memory), so a run is scored
exactly as it was trained, with nothing merged or written first. Its results JSON is written as the harness's
own command line writes it, with what qlora adds (`qlora`: the model, the options, qlora's version).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.errors import Problem, UserError
from ..core.files import write_atomic

RESULTS_FILE = "harness_results.json"


def check_harness_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("qlora eval harness needs lm-evaluation-harness: pip install 'qlora-cli[harness]'")


def parse_tasks(text: str) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    if not tasks:
        raise UserError("--tasks: name at least one task, e.g. --tasks arc_easy,hellaswag")
    return tasks


def task_manager(include_paths: list[Path]):
    """The harness's task index: its own tasks and those of the YAML files under `include_paths`.

    Raises:
        UserError: an include path that does not exist.
    """
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not path.exists():
            raise UserError(Problem("task folder or file not found", file=path, key="--include-path"))
    return TaskManager(include_path=[str(path) for path in include_paths] or None)


def check_tasks(manager, tasks: list[str]) -> None:
    """Refuse task names the harness does not know (before any model loads), suggesting close ones.

    Raises:
        UserError: every unknown name.
    """
    from difflib import get_close_matches

    known = set(manager.all_tasks)
    problems = []
    for task in tasks:
        if task in known or manager.match_tasks([task]):
            continue
        close = get_close_matches(task, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; define it in a YAML file under --include-path"
        problems.append(Problem(f"unknown task {task!r}{hint}", key="--tasks"))
    if problems:
        raise UserError(problems)


def evaluate(model, tokenizer, manager, tasks: list[str], *, num_fewshot: int | None, limit: float | None,
             batch_size: int, log_samples: bool = True) -> dict[str, Any]:
    """The harness's results for the tasks, on a model and tokenizer already loaded."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                               task_manager=manager, log_samples=log_samples)
    finally:
        model.train(was_training)


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each task's numeric metrics (`acc,none`, `acc_stderr,none`, ...), as the harness reports them."""
    return {task: {name: value for name, value in metrics.items() if isinstance(value, (int, float))}
            for task, metrics in results["results"].items()}


def write_results(results: dict[str, Any], folder: Path, extra: dict[str, Any]) -> Path:
    """The harness's results JSON (with its samples) in `folder`, as its own command line serialises it."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / RESULTS_FILE
    document = {"qlora": {"version": __version__, **extra}, **results}
    write_atomic(target, json.dumps(document, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return target
