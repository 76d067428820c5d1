"""The run directory: its layout, and how a run is recognised, started and read back. Its files are written
atomically (core/files.py): a file or folder is either complete or absent.

    RUN_DIR/recipe.yaml         the resolved recipe; its presence marks a folder as a run
    RUN_DIR/adapter/            PEFT adapter (safetensors) + tokenizer with the chat template trained with
    RUN_DIR/metrics.jsonl       one JSON object per logged step
    RUN_DIR/eval_metrics.jsonl  evaluation loss and multiple-choice accuracy, when the recipe asks
    RUN_DIR/checkpoints/step-N  resumable checkpoints (train/checkpoint.py)
    RUN_DIR/parity_prompts.json token ids of a few rows the model trained on, which a merge is checked on
    RUN_DIR/summary.json        tokens, time, losses, memory, dtype, versions
    RUN_DIR/loss.png            the loss curve
    RUN_DIR/profile/            `qlora train --profile`: a trace and where a step's time goes
    RUN_DIR/merged/             `output.merge` or `qlora merge`, with merge_report.json
    RUN_DIR/eval/               `qlora eval RUN_DIR`: answers, judgments and the report

Nothing here imports torch: the CLI recognises runs before deciding what to load (core/models.py's load_run loads one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .errors import Problem, UserError
from .files import staged, write_atomic
from .recipe import Recipe, to_yaml

RECIPE = "recipe.yaml"  # written by `qlora train` alone: a folder holding it is a run
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
EVAL_METRICS = "eval_metrics.jsonl"
SUMMARY = "summary.json"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
PROFILE = "profile"
MERGED = "merged"
MERGE_REPORT = "merge_report.json"  # in a merged folder: RUN_DIR/merged or `qlora merge --out`
EVAL = "eval"
PARITY_PROMPTS = "parity_prompts.json"
# The merge is checked on this many of the rows the model trained on (held-out rows first), cut to this length.
PARITY_PROMPT_COUNT = 4
PARITY_PROMPT_TOKENS = 128


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
        # Only the trained adapter: a continued run also holds its frozen starting adapter (`reference`).
        model.save_pretrained(staging, safe_serialization=True, selected_adapters=[model.active_adapter])
        tokenizer.chat_template = template
        tokenizer.save_pretrained(staging)
    return target
