"""The training stage: check the data, load the model, train on the transformers Trainer, write the run.

Reads top to bottom: `run_training` checks everything that can be checked before the model loads,
then loads, trains and writes the run directory:

    RUN_DIR/recipe.yaml       the resolved recipe
    RUN_DIR/adapter/          PEFT adapter (safetensors) + tokenizer with the chat template trained with
    RUN_DIR/metrics.jsonl     one JSON object per logged step
    RUN_DIR/summary.json      tokens, time, losses, memory, dtype, versions
    RUN_DIR/loss.png          the loss curve
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .console import format_seconds, key_value_table, recipe_table
from .data.sources import Datasets, load_datasets
from .errors import UserError
from .recipe import Recipe, to_yaml


# ---------------------------------------------------------------------------------------------
# Checks that need no model

def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a non-empty run directory unless asked to overwrite it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(
            f"output.dir: {run_dir} already holds a run; pass --overwrite to replace it, "
            "or --output-dir DIR to write elsewhere"
        )


# ---------------------------------------------------------------------------------------------
# Trainer set-up

def scheduler_name(recipe: Recipe) -> str:
    # transformers' "constant" ignores warmup; the paper's schedule is constant after a warmup.
    name = recipe.training.lr_scheduler
    if name == "constant" and recipe.training.warmup > 0:
        return "constant_with_warmup"
    return name


def training_arguments(recipe: Recipe, run_dir: Path, compute_dtype, on_device: str, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    t = recipe.training
    warmup = t.warmup if t.warmup < 1 else int(t.warmup)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=scheduler_name(recipe),
        warmup_steps=warmup,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        adam_beta2=t.adam_beta2,
        optim=t.optimizer,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=on_device == "cpu",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy=(
            "group_by_length" if recipe.data.group_by_length and not recipe.data.packing else "random"
        ),
        per_device_eval_batch_size=t.batch_size,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def make_collator(recipe: Recipe, tokenizer):
    from .data.tokenize import PackBatch, PadToLongest

    return PackBatch() if recipe.data.packing else PadToLongest(tokenizer.pad_token_id)


def make_trainer(model, args, prepared, train_collator, eval_collator, callbacks):
    """The transformers Trainer, with its own collator for evaluation so that the training collator
    counts exactly the tokens fed to training steps."""
    from transformers import PrinterCallback, Trainer

    class RecipeTrainer(Trainer):
        def get_eval_dataloader(self, eval_dataset=None):
            training_collator, self.data_collator = self.data_collator, eval_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = training_collator

    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval or None,
        data_collator=train_collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def make_callbacks(run_dir: Path, console: Console, fed):
    """Callbacks that write metrics.jsonl (and eval_metrics.jsonl) and show progress (a bar on a TTY,
    lines otherwise). `fed` counts the tokens the training collator has handed to the model."""
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        def __init__(self) -> None:
            self.path = run_dir / "metrics.jsonl"
            self.records: list[dict[str, Any]] = []
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

            self.eval_records: list[dict[str, Any]] = []

        def _append(self, path: Path, record: dict[str, Any]) -> None:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            elapsed = round(time.perf_counter() - self.started, 3)
            if logs and "eval_loss" in logs:
                record = {"step": state.global_step, "eval_loss": logs["eval_loss"], "elapsed_seconds": elapsed}
                self.eval_records.append(record)
                self._append(run_dir / "eval_metrics.jsonl", record)
            if not logs or "loss" not in logs:
                return
            record = {
                "step": state.global_step,
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "epoch": logs.get("epoch"),
                "tokens": fed.tokens,
                "elapsed_seconds": elapsed,
            }
            self.records.append(record)
            self._append(self.path, record)

    class ProgressReporter(TrainerCallback):
        def __init__(self) -> None:
            self.live = console.is_terminal
            self.progress = None
            self.task = None
            self.started = time.perf_counter()
            self.last: dict[str, Any] = {}

        def _fields(self, state) -> dict[str, str]:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            loss = self.last.get("loss")
            lr = self.last.get("learning_rate")
            return {
                "loss": f"{loss:.4f}" if loss is not None else "-",
                "lr": f"{lr:.2e}" if lr is not None else "-",
                "tps": f"{fed.tokens / elapsed:,.0f}",
            }

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            if self.live:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self.progress = Progress(
                    TextColumn("[bold]train"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    console=console,
                )
                self.progress.start()
                self.task = self.progress.add_task("train", total=state.max_steps, loss="-", lr="-", tps="0")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, **self._fields(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.last = logs
            if self.progress is not None:
                self.progress.update(self.task, **self._fields(state))
                return
            fields = self._fields(state)
            elapsed = time.perf_counter() - self.started
            remaining = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            console.print(
                f"step {state.global_step}/{state.max_steps}  loss {fields['loss']}  lr {fields['lr']}  "
                f"{fields['tps']} tok/s  eta {format_seconds(remaining)}"
            )

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()

    return MetricsWriter(), ProgressReporter()


# ---------------------------------------------------------------------------------------------
# Outputs

def save_adapter(model, tokenizer, template: str, target: Path) -> None:
    """Write the PEFT adapter and the tokenizer with the chat template it was trained with.

    Written to a staging folder and renamed, so `adapter/` is either complete or absent.
    """
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(staging)
    staging.rename(target)


def write_json(path: Path, payload: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    staging.replace(path)


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], marker="o", markersize=2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def peak_memory_bytes(on_device: str) -> tuple[int, str]:
    import torch

    if on_device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "CUDA max allocated"
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process peak RSS"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("qlora-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ---------------------------------------------------------------------------------------------

@dataclass
class TrainingRun:
    summary: dict[str, Any]
    model: Any  # the trained PeftModel, still in memory
    tokenizer: Any


def describe_data(console: Console, datasets: Datasets, prepared, recipe: Recipe) -> float:
    """Print what will be trained on; return the padding fraction the batching is expected to feed."""
    from .data.prepare import expected_padding

    for name, count in datasets.rows_per_source.items():
        console.print(f"  {count:>7,} rows  {name}")
    if datasets.skipped:
        console.print(f"[yellow]Skipped {len(datasets.skipped)} bad row(s) (data.on_bad_row: skip); the first:")
        for problem in datasets.skipped[:5]:
            console.print(f"[yellow]  {problem.render()}", markup=True)
    stats = prepared.train_stats
    console.print(
        f"Tokenized {stats.examples:,} training examples{' (cached)' if prepared.cache_hit else ''}: "
        f"{stats.tokens:,} tokens, {stats.trained_tokens:,} trained ({stats.trained_tokens / stats.tokens:.0%}); "
        f"longest {stats.longest}; {stats.truncated} truncated to {recipe.data.max_seq_len}; "
        f"{stats.dropped_too_long} dropped as too long; {stats.dropped_no_trained_tokens} dropped with no trained token"
        + (f" (first: {', '.join(stats.dropped_rows[:3])})" if stats.dropped_rows else "")
    )
    if prepared.eval_stats is not None:
        console.print(f"Evaluation: {prepared.eval_stats.examples:,} examples, {prepared.eval_stats.tokens:,} tokens")
    padding = expected_padding(recipe, [len(row["input_ids"]) for row in prepared.train])
    batching = "packed, no padding" if recipe.data.packing else (
        "grouped by length" if recipe.data.group_by_length else "random batches"
    )
    console.print(f"Batching: {batching}; expected padding {padding:.1%} of fed positions")
    return padding


def run_training(recipe: Recipe, *, overwrite: bool = False, console: Console | None = None) -> TrainingRun:
    """Train the recipe and write its run directory.

    Returns:
        the summary written to summary.json, and the trained model.

    Raises:
        UserError: bad recipe, data, model source or run directory, found before training starts.
    """
    console = console or Console()
    run_dir = recipe.output.dir
    assert run_dir is not None, "load_recipe sets output.dir"
    check_run_dir(run_dir, overwrite)
    datasets = load_datasets(recipe.data, recipe.training.seed)
    console.print(recipe_table(recipe))
    console.print(f"Read {len(datasets.train):,} training and {len(datasets.eval):,} evaluation rows.")

    import torch
    from transformers import set_seed

    from .data.prepare import prepare
    from .data.templates import resolve_template
    from .models import (
        choose_compute_dtype, count_parameters, device, load_model, load_tokenizer, quiet_libraries, resolve_model_path,
    )

    quiet_libraries(console.is_terminal)
    on_device = device()
    dtype = choose_compute_dtype(recipe.quantization.compute_dtype, on_device)
    console.print(f"Device: {on_device}; compute dtype: {str(dtype.dtype).removeprefix('torch.')} ({dtype.reason})")
    if on_device == "cpu" and dtype.dtype == torch.bfloat16:
        console.print("[yellow]bfloat16 on CPU: most CPUs have no native bfloat16 matmul; float32 is usually far faster.")
    if recipe.model.trust_remote_code:
        console.print("[bold red]model.trust_remote_code is on: the model repository's Python code will run.")

    model_path = resolve_model_path(recipe.model.base, say=console.print)
    tokenizer = load_tokenizer(model_path, recipe)
    template = resolve_template(recipe.data.template, tokenizer)
    prepared = prepare(recipe, tokenizer, template, datasets)
    describe_data(console, datasets, prepared, recipe)

    # Everything checkable is checked: only now is an old run replaced.
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")

    set_seed(recipe.training.seed)
    model = load_model(model_path, recipe, dtype.dtype, on_device)
    trainable, total = count_parameters(model)
    console.print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})")

    train_collator = make_collator(recipe, tokenizer)
    metrics, progress = make_callbacks(run_dir, console, train_collator.fed)
    args = training_arguments(recipe, run_dir, dtype.dtype, on_device, has_eval=bool(prepared.eval))
    trainer = make_trainer(model, args, prepared, train_collator, make_collator(recipe, tokenizer), [metrics, progress])
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    eval_loss = None
    if prepared.eval:
        eval_loss = trainer.evaluate()["eval_loss"]

    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # the Trainer makes it even when it saves nothing there
    save_adapter(model, tokenizer, template, run_dir / "adapter")
    if metrics.records:
        plot_loss(metrics.records, run_dir / "loss.png")
    peak, peak_kind = peak_memory_bytes(on_device)
    fed = train_collator.fed
    stats = prepared.train_stats
    summary = {
        "steps": trainer.state.global_step,
        "examples": stats.examples,
        "train_tokens": fed.tokens,
        "fed_positions": fed.positions,
        "padding_fraction": round(fed.padding_fraction, 4),
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(fed.tokens / train_seconds, 1) if train_seconds else None,
        "first_loss": metrics.records[0]["loss"] if metrics.records else None,
        "final_loss": metrics.records[-1]["loss"] if metrics.records else None,
        "eval_loss": eval_loss,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "compute_dtype": str(dtype.dtype).removeprefix("torch."),
        "device": on_device,
        "trainable_parameters": trainable,
        "base_model": model_path,
        "rows_per_source": datasets.rows_per_source,
        "skipped_bad_rows": len(datasets.skipped),
        "truncated_examples": stats.truncated,
        "dropped_examples": stats.dropped_too_long + stats.dropped_no_trained_tokens,
        "versions": library_versions(),
    }
    if recipe.output.merge:
        from .merge import merge_run

        report = merge_run(run_dir, say=console.print)
        summary["merged"] = {key: report[key] for key in ("out", "dtype", "max_abs_logit_diff", "mean_kl_nats_per_token")}
    write_json(run_dir / "summary.json", summary)
    console.print(
        key_value_table(
            "Summary",
            [
                ("run directory", str(run_dir)),
                ("steps", summary["steps"]),
                ("loss (first → last)", f"{summary['first_loss']:.4f} → {summary['final_loss']:.4f}" if metrics.records else "-"),
                *([("eval loss", f"{eval_loss:.4f}")] if eval_loss is not None else []),
                ("tokens trained on", f"{fed.tokens:,} ({fed.padding_fraction:.1%} padding fed)"),
                ("time", format_seconds(train_seconds)),
                ("tokens/s", summary["tokens_per_second"]),
                ("peak memory", f"{peak / 2**20:,.0f} MiB ({peak_kind})"),
                ("adapter", str(run_dir / "adapter")),
            ],
        )
    )
    return TrainingRun(summary=summary, model=model, tokenizer=tokenizer)
