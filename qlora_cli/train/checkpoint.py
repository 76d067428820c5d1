"""Checkpoints that a crash never leaves half-written, and exact resume.

The Trainer writes a checkpoint (adapter, optimizer with its paged state, LR scheduler, RNG states,
trainer state with the data position) into `checkpoints/.staging/`; then a manifest with every file's
size and SHA-256 is written into it, last, and the folder is renamed to `checkpoints/step-N`. A rename
is atomic, so a `step-N` folder is always complete, and one whose files do not match its manifest
(truncated, corrupted) is skipped on resume with a message.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.recipe import Recipe, flatten
from ..core.files import publish
from ..core.rundir import CHECKPOINTS, SUMMARY, read_run_recipe
STAGING = ".staging"
MANIFEST = "manifest.json"
PREFIX = "step-"
TRAINER_PREFIX = "checkpoint-"  # what the Trainer names the folder it writes into staging

# Recipe keys that may change between a run and its resume without changing what is trained.
HARMLESS_KEYS = (
    "training.max_steps",
    "training.epochs",
    "training.logging_steps",
    "training.save_steps",
    "training.eval_steps",
    "training.eval_mmlu",
    "training.keep_checkpoints",
    "training.report_to",
    "output.",
)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def staging_dir(run_dir: Path) -> Path:
    return checkpoints_dir(run_dir) / STAGING


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def recipe_fingerprint(recipe: Recipe) -> str:
    """A hash of every recipe key that matters for what is trained."""
    relevant = [(key, value) for key, value, _ in flatten(recipe) if not key.startswith(HARMLESS_KEYS)]
    return hashlib.sha256(json.dumps(relevant, default=str).encode()).hexdigest()[:16]


def recipe_differences(old: Recipe, new: Recipe) -> tuple[list[str], list[str]]:
    """(keys that differ and matter, keys that differ harmlessly), each as `key: old -> new`."""
    before = {key: value for key, value, _ in flatten(old)}
    after = {key: value for key, value, _ in flatten(new)}
    blocking, harmless = [], []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            (harmless if key.startswith(HARMLESS_KEYS) else blocking).append(line)
    return blocking, harmless


def finalize(run_dir: Path, step: int, manifest: dict[str, Any], keep: int) -> Path:
    """Seal the checkpoint the Trainer just wrote into staging: manifest last, then an atomic rename.

    Returns:
        the `checkpoints/step-N` folder.
    """
    written = staging_dir(run_dir) / f"{TRAINER_PREFIX}{step}"
    manifest = {**manifest, "step": step, "files": describe_files(written)}
    (written / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    target = checkpoints_dir(run_dir) / f"{PREFIX}{step}"
    publish(written, target)  # replacing the same step saved before (a resume that reached it once more)
    for old in complete_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)
    return target


@dataclass
class Checkpoint:
    step: int
    path: Path
    manifest: dict[str, Any]


def _step_of(path: Path) -> int | None:
    suffix = path.name.removeprefix(PREFIX)
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Checkpoints with a readable manifest, newest first (files not verified: see `verify`)."""
    found = []
    folder = checkpoints_dir(run_dir)
    for path in folder.iterdir() if folder.is_dir() else []:
        step = _step_of(path)
        if step is None:
            continue
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append(Checkpoint(step, path, manifest))
    return sorted(found, key=lambda c: c.step, reverse=True)


def verify(checkpoint: Checkpoint) -> str | None:
    """Why the checkpoint's files do not match its manifest, or None if they all do."""
    for name, expected in checkpoint.manifest.get("files", {}).items():
        path = checkpoint.path / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(run_dir: Path, say=print) -> Checkpoint:
    """The newest checkpoint whose files are intact; damaged or unfinished ones are named and skipped.

    Raises:
        UserError: there is no intact checkpoint to resume from.
    """
    folder = checkpoints_dir(run_dir)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _step_of(path) is not None and not (path / MANIFEST).is_file():
            say(f"Skipping {path}: it has no manifest, so it was never completed")
    for checkpoint in complete_checkpoints(run_dir):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint
        say(f"Skipping {checkpoint.path}: {problem}")
    raise UserError(f"--resume: {run_dir} has no complete checkpoint to resume from")


def clear_staging(run_dir: Path) -> None:
    """Remove what an interrupted checkpoint write left behind (and an empty checkpoints folder)."""
    shutil.rmtree(staging_dir(run_dir), ignore_errors=True)
    folder = checkpoints_dir(run_dir)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def checkpoint_bytes_estimate(run_dir: Path, trainable_parameters: int) -> int:
    """Bytes the next checkpoint will take: the last one's size, else adapter + two AdamW states in
    float32 with a margin."""
    existing = complete_checkpoints(run_dir)
    if existing:
        return sum(entry["bytes"] for entry in existing[0].manifest.get("files", {}).values())
    return int(trainable_parameters * 4 * 3 * 1.2) + (1 << 20)


# The Trainer's epoch count at the end of a run is a float sum of fractions of an epoch.
EPOCH_TOLERANCE = 1e-6


def finished_run(run_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The summary of a run that has finished and that `recipe` would train no further, else None.

    A run has finished when it wrote summary.json (after its adapter). `recipe` trains it further only when it
    asks for more: `training.max_steps` above the steps done, or, without `max_steps` (when `epochs` decides, as
    in the Trainer), `training.epochs` above the epochs done. A recipe that differs in what is trained is left
    to the resume's own check, which refuses it.
    """
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        steps = int(summary["steps"])
    except (OSError, ValueError, KeyError, TypeError):  # a summary being rewritten, or an unknown one: resume
        return None
    blocking, _ = recipe_differences(read_run_recipe(run_dir), recipe)
    if blocking:
        return None
    training = recipe.training
    if training.max_steps is not None:
        return summary if training.max_steps <= steps else None
    epochs_done = summary.get("epochs")
    return summary if epochs_done is not None and training.epochs <= epochs_done + EPOCH_TOLERANCE else None
