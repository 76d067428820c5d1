"""The run directory: its layout, how a run is recognised and read back, and the atomic writes every
writer of the project uses (files written inside a staged folder are published with it; the JSONL logs are
appended a record at a time, and their readers drop a last line a kill cut short).

    RUN_DIR/recipe.yaml         the resolved recipe; its presence marks a folder as a run
    RUN_DIR/adapter/            PEFT adapter (safetensors) + tokenizer with the chat template trained with
    RUN_DIR/metrics.jsonl       one JSON object per logged step
    RUN_DIR/eval_metrics.jsonl  evaluation loss and multiple-choice accuracy, when the recipe asks
    RUN_DIR/checkpoints/step-N  resumable checkpoints (see train/checkpoint.py)
    RUN_DIR/parity_prompts.json token ids of a few rows the model trained on, which a merge is checked on
    RUN_DIR/summary.json        tokens, time, losses, memory, dtype, versions
    RUN_DIR/loss.png            the loss curve
    RUN_DIR/profile/            `qlora train --profile`: a trace and where a step's time goes
    RUN_DIR/merged/             `output.merge` or `qlora merge`

Nothing here imports torch: the CLI recognises runs before deciding what to load (models.load_run loads one).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import Problem, UserError
from .recipe import Recipe, to_yaml

RECIPE = "recipe.yaml"  # written by `qlora train` alone: a folder holding it is a run
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
EVAL_METRICS = "eval_metrics.jsonl"
SUMMARY = "summary.json"
LOSS_PLOT = "loss.png"
PROFILE = "profile"
MERGED = "merged"
PARITY_PROMPTS = "parity_prompts.json"
# The merge is checked on this many of the rows the model trained on (held-out rows first), cut to this length.
PARITY_PROMPT_COUNT = 4
PARITY_PROMPT_TOKENS = 128


# ---------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a crash) never sees half a file or half a folder.

def staging_path(target: Path) -> Path:
    """A hidden name beside `target`, private to this process: the ranks of a distributed run may
    write the same target at once. The suffix is kept, as `numpy.savez` insists on its own."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}{target.suffix}")


def remove_abandoned_staging(target: Path) -> list[Path]:
    """Remove what processes that no longer run on this machine left staged for `target` (a kill -9 or
    the OOM killer gives `staged` no chance to clean up; a merge leaves gigabytes). Only for targets that
    one process on this machine writes at a time: another machine's process would look dead from here.

    Returns:
        the paths removed.
    """
    removed = []
    prefix = f".{target.name}.tmp-"
    for path in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].removesuffix(target.suffix)
        if pid.isdigit() and int(pid) != os.getpid() and not _process_runs(int(pid)):
            _remove(path)
            removed.append(path)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(staging: Path, target: Path, *, replace: bool = True) -> bool:
    """Move a finished file or folder to `target` in one rename; returns whether it was put in place.

    Args:
        replace: an existing target is replaced (a folder is first renamed aside and then removed, as a
            rename cannot replace a non-empty folder); otherwise an existing target wins and `staging`
            is discarded, for caches that another process may have filled first.
    """
    if not replace and target.exists():
        _remove(staging)
        return False
    if staging.is_dir() and target.is_dir():
        previous = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(previous)
        target.rename(previous)
        staging.rename(target)
        _remove(previous)
        return True
    try:
        staging.replace(target)
    except OSError:
        if replace or not target.exists():
            raise
        _remove(staging)  # another process published the same target first
        return False
    return True


@contextmanager
def staged(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Write into the yielded path, then have it published as `target` (see `publish`).

    On any exception (Ctrl-C included) what was written is removed and `target` is left as it was.
    """
    staging = staging_path(target)
    _remove(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    publish(staging, target, replace=replace)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a whole file, or leave the previous one untouched."""
    with staged(path) as staging:
        if isinstance(content, bytes):
            staging.write_bytes(content)
        else:
            staging.write_text(content, encoding="utf-8")


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Recognising and reading runs

def is_run_dir(path: Path) -> bool:
    """A finished (or resumable-and-finished-once) run: the recipe and an adapter."""
    return (path / RECIPE).is_file() and (path / ADAPTER).exists()


def is_run(path: Path) -> bool:
    """Any folder `qlora train` wrote, finished or not."""
    return (path / RECIPE).is_file()


def read_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run was trained with (its paths are already absolute)."""
    path = run_dir / RECIPE
    try:
        return Recipe.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except Exception as exc:
        raise UserError(Problem(f"not a readable run recipe: {exc}", file=path)) from None


def adapter_base_model(run_dir: Path) -> str:
    """The base model the run's adapter was trained on, as its adapter_config.json names it."""
    config_path = run_dir / ADAPTER / "adapter_config.json"
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(Problem(f"missing or corrupt adapter config: {exc}", file=config_path)) from None


def check_writable(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a non-empty run directory unless asked to overwrite it, and never
    overwrite a non-empty folder that is not a run: output.dir must not be able to delete a home."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is not a directory")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not is_run(run_dir):
        raise UserError(f"output.dir: {run_dir} is a non-empty folder that is not a qlora run; choose another output.dir")
    if not overwrite:
        raise UserError(
            f"output.dir: {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or --output-dir DIR to write elsewhere"
        )


def start_fresh(run_dir: Path, recipe: Recipe) -> None:
    """Empty the run directory (checked by `check_writable`) and write the resolved recipe into it."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_atomic(run_dir / RECIPE, to_yaml(recipe))


# ---------------------------------------------------------------------------------------------
# The adapter

def save_adapter(model, tokenizer, template: str, run_dir: Path) -> Path:
    """Write the PEFT adapter and the tokenizer with the chat template it was trained with into
    RUN_DIR/adapter, which is then either complete or absent (a resumed run swaps the old one out)."""
    target = run_dir / ADAPTER
    with staged(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(staging)
    return target
