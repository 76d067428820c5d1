"""The training stage: check the data, load the model, train on the transformers Trainer, write the run.

Reads top to bottom: `run_training` checks everything that can be checked before the model loads,
then loads, trains and writes the run directory:

    RUN_DIR/recipe.yaml         the resolved recipe
    RUN_DIR/adapter/            PEFT adapter (safetensors) + tokenizer with the chat template trained with
    RUN_DIR/metrics.jsonl       one JSON object per logged step
    RUN_DIR/eval_metrics.jsonl  evaluation loss and multiple-choice accuracy, when the recipe asks
    RUN_DIR/checkpoints/step-N  resumable checkpoints (see checkpoint.py)
    RUN_DIR/summary.json        tokens, time, losses, memory, dtype, versions
    RUN_DIR/loss.png            the loss curve

The callbacks that log, checkpoint and stop on signals are in callbacks.py.
"""

from __future__ import annotations

import io
import json
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
from .callbacks import NonFiniteLoss, StopRequests, make_callbacks, make_checkpointer, make_mmlu_evaluator
from .checkpoint import (
    Checkpoint, clear_staging, latest_checkpoint, library_versions, recipe_differences, recipe_fingerprint, staging_dir,
)
from .errors import RunFailure, RunInterrupted, UserError
from .recipe import Recipe, to_yaml

RUN_MARKER = "recipe.yaml"  # a folder with this file was written by `qlora train`


# ---------------------------------------------------------------------------------------------
# Checks that need no model

def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a non-empty run directory unless asked to overwrite it, and never
    overwrite a non-empty folder that is not a run: output.dir must not be able to delete a home."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is not a directory")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not (run_dir / RUN_MARKER).is_file():
        raise UserError(f"output.dir: {run_dir} is a non-empty folder that is not a qlora run; choose another output.dir")
    if not overwrite:
        raise UserError(
            f"output.dir: {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
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

    from .distributed import world_size

    t = recipe.training
    warmup = t.warmup if t.warmup < 1 else int(t.warmup)
    return TrainingArguments(
        # The Trainer writes checkpoints here; checkpoint.finalize seals and moves them.
        output_dir=str(staging_dir(run_dir)),
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
        save_strategy="no",  # saving is driven by the Checkpointer callback (schedule, signals)
        seed=t.seed,
        data_seed=t.seed,
        # Length grouping is the RecipeTrainer's own sampler (see data.prepare.length_grouped_sampler).
        train_sampling_strategy="random",
        per_device_eval_batch_size=t.batch_size,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=True,
        # Data-parallel runs (under torchrun): gloo on CPU; LoRA leaves no parameter unused.
        ddp_backend="gloo" if on_device == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        **(fsdp_arguments(recipe) if recipe.training.distributed == "fsdp" and world_size() > 1 else {}),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def fsdp_arguments(recipe: Recipe) -> dict:
    """FSDP2 over the decoder layers, gathering a full state dict to save the adapter."""
    return {
        "fsdp": True,
        "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                        "reshard_after_forward": True, "cpu_ram_efficient_loading": False},
    }


def make_collator(recipe: Recipe, tokenizer):
    from .data.tokenize import PackBatch, PadToLongest

    return PackBatch() if recipe.data.packing else PadToLongest(tokenizer.pad_token_id)


def make_trainer(model, args, prepared, collator, fed, callbacks, group_by_length: bool):
    """The transformers Trainer, counting into `fed` the tokens of every batch it trains on, with a
    length-grouped order that resumes exactly, and with the loss computed on trained positions only
    (`loss.head_only_loss`) when the model's logits are a plain output projection."""
    from transformers import PrinterCallback, Trainer

    from .data.prepare import length_grouped_sampler

    import torch

    from .loss import head_only_loss, output_head

    head = output_head(model)

    class RecipeTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # FSDP gathers a sharded weight only when its module runs, and this loss skips the head's module.
            if head is None or self.is_fsdp_enabled or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = head_only_loss(model, head, inputs, num_items_in_batch)
            # As the Trainer does for a model's own loss divided by a token count of all processes.
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            fed.count(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Stop before the optimizer applies a non-finite gradient, so no state of it is ever saved.
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(self.state.global_step + 1)
            return loss

        def _get_train_sampler(self, train_dataset=None):
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            lengths = [len(row["input_ids"]) for row in self.train_dataset]
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return length_grouped_sampler(lengths, batch, self.args.seed)

    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval or None,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


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
    previous = target.with_name(target.name + ".old")
    if target.exists():  # a resumed run that had finished before: swap, never a mix of both
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


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


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, say) -> Checkpoint | None:
    """Check the run directory before anything loads; on resume, the checkpoint to resume from.

    Raises:
        UserError: an existing run without --resume/--overwrite, a folder that is not a run, no intact
            checkpoint, or a recipe changed in a way that matters since the checkpoint.
    """
    if not resume:
        check_run_dir(run_dir, overwrite)
        return None
    from .generate import read_run_recipe

    if not (run_dir / RUN_MARKER).is_file():
        raise UserError(f"--resume: {run_dir} holds no run to resume")
    checkpoint = latest_checkpoint(run_dir, say)
    blocking, harmless = recipe_differences(read_run_recipe(run_dir), recipe)
    if blocking:
        raise UserError(
            ["changed since the run started: " + line for line in blocking],
            title=f"--resume: the recipe differs from the run in {run_dir} in ways that change what is trained:",
        )
    for line in harmless:
        say(f"Resuming with a changed setting: {line}")
    return checkpoint


def run_training(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    console: Console | None = None,
    resume_command: str = "qlora train RECIPE --resume",
) -> TrainingRun:
    """Train the recipe and write its run directory (or continue it from its newest checkpoint).

    Returns:
        the summary written to summary.json, and the trained model.

    Raises:
        UserError: bad recipe, data, model source or run directory, found before training starts.
        RunFailure: a non-finite loss, out of memory, or no disk for a checkpoint, during training.
        RunInterrupted: SIGINT/SIGTERM; a checkpoint was written and the message says how to resume.
    """
    from .distributed import barrier, is_main, sum_over_ranks, world_size

    main = is_main()
    console = console or Console()
    if not main:
        console = Console(file=io.StringIO())  # rank 0 speaks for the run
    run_dir = recipe.output.dir
    assert run_dir is not None, "load_recipe sets output.dir"
    # Every rank checks the recipe and the data; rank 0 alone owns the run directory.
    checkpoint = prepare_run_dir(run_dir, recipe, resume, overwrite if main else True, console.print) if main or resume else None
    datasets = load_datasets(recipe.data, recipe.training.seed)
    mmlu_data = None
    if recipe.training.eval_mmlu is not None:
        from .evaluation.mmlu import read_mmlu

        mmlu_data = read_mmlu(recipe.training.eval_mmlu.data)
    console.print(recipe_table(recipe))
    console.print(f"Read {len(datasets.train):,} training and {len(datasets.eval):,} evaluation rows.")

    import torch
    from transformers import set_seed

    from .data.prepare import options_of, prepare
    from .data.templates import resolve_template
    from .data.tokenize import FedTokens, cache_key
    from .models import (
        choose_compute_dtype, count_parameters, decide_checkpointing, device, load_model, load_tokenizer, quiet_libraries,
        resolve_model_path,
    )

    quiet_libraries(console.is_terminal)
    on_device = device()
    if recipe.training.distributed == "fsdp" and world_size() > 1 and on_device == "cpu":
        # accelerate runs FSDP only on accelerators and would silently replicate instead: say so first.
        raise UserError("training.distributed: fsdp needs GPUs (accelerate shards only on accelerators); on CPU use ddp")
    dtype = choose_compute_dtype(recipe.quantization.compute_dtype, on_device)
    console.print(f"Device: {on_device}; compute dtype: {str(dtype.dtype).removeprefix('torch.')} ({dtype.reason})")
    if on_device == "cpu":
        from .cpu import has_native_bfloat16, keep_freed_memory

        keep_freed_memory()
        if dtype.dtype == torch.bfloat16 and not has_native_bfloat16():
            console.print("[yellow]bfloat16 on a CPU without native bfloat16: it is emulated; float32 is usually far faster.")
    if recipe.model.trust_remote_code:
        console.print("[bold red]model.trust_remote_code is on: the model repository's Python code will run.")

    model_path = resolve_model_path(recipe.model.base, say=console.print)
    tokenizer = load_tokenizer(model_path, recipe)
    template = resolve_template(recipe.data.template, tokenizer)
    prepared = prepare(recipe, tokenizer, template, datasets)
    describe_data(console, datasets, prepared, recipe)
    fingerprints = {
        "recipe_fingerprint": recipe_fingerprint(recipe),
        "data_fingerprint": cache_key(tokenizer, template, datasets.train, options_of(recipe)),
    }
    if checkpoint is not None:
        if checkpoint.manifest.get("data_fingerprint") != fingerprints["data_fingerprint"]:
            raise UserError(f"--resume: the training data (or its tokenization) changed since {checkpoint.path} was written")
        console.print(f"Resuming from {checkpoint.path} (step {checkpoint.step})")

    checkpointing, why = decide_checkpointing(recipe, model_path, dtype.dtype, on_device)
    console.print(f"Gradient checkpointing: {'on' if checkpointing else 'off'} ({why})")
    set_seed(recipe.training.seed)
    model = load_model(model_path, recipe, dtype.dtype, on_device, checkpointing)
    trainable, total = count_parameters(model)
    console.print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})")

    if main:
        if checkpoint is None:
            # Everything checkable is checked and the model loaded: only now is an old run replaced.
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
        clear_staging(run_dir)
        # Atomic: on --resume the other ranks read the run's recipe while rank 0 writes the new one.
        write_text_atomic(run_dir / "recipe.yaml", to_yaml(recipe))

    fed = FedTokens()
    if checkpoint is not None and main:  # the manifest holds the totals of all ranks
        fed.tokens, fed.positions = checkpoint.manifest["fed_tokens"], checkpoint.manifest["fed_positions"]
    stops = StopRequests()
    checkpointer = make_checkpointer(recipe, run_dir, fed, stops, fingerprints, trainable)
    callbacks = [checkpointer]
    if main:  # only rank 0 logs: the metrics files are rewritten on resume
        metrics, progress = make_callbacks(run_dir, console, fed, checkpoint.step if checkpoint else None)
        mmlu = make_mmlu_evaluator(recipe, run_dir, tokenizer, mmlu_data, console) if mmlu_data else None
        callbacks += [metrics, progress, *([mmlu] if mmlu else [])]
    args = training_arguments(recipe, run_dir, dtype.dtype, on_device, has_eval=bool(prepared.eval))
    trainer = make_trainer(
        model, args, prepared, make_collator(recipe, tokenizer), fed, callbacks,
        group_by_length=recipe.data.group_by_length and not recipe.data.packing,
    )
    if recipe.training.distributed == "fsdp" and world_size() > 1 and not trainer.is_fsdp_enabled:
        raise RunFailure("training.distributed: fsdp was asked for, but accelerate did not enable FSDP on these devices")
    started = time.perf_counter()
    try:
        with stops:
            trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
    except NonFiniteLoss as error:
        raise RunFailure(
            f"the loss became non-finite at step {error.step}; training stopped before that step was applied. "
            f"Last good checkpoint: {checkpointer.last or 'none'}. Lower training.learning_rate, check the data, "
            "or use compute_dtype bfloat16/float32 instead of float16."
        ) from None
    except (MemoryError, torch.cuda.OutOfMemoryError):
        shape = fed.last_shape
        raise RunFailure(
            f"out of memory at step {trainer.state.global_step + 1} on a batch of {shape[0]} x {shape[1]} tokens "
            f"(training.batch_size {recipe.training.batch_size}, data.max_seq_len {recipe.data.max_seq_len}): lower "
            "training.batch_size (raise gradient_accumulation_steps to keep the effective batch), lower "
            "data.max_seq_len, or set training.gradient_checkpointing: true. "
            f"Last good checkpoint: {checkpointer.last or 'none'}"
        ) from None
    finally:
        if main:
            clear_staging(run_dir)
    train_seconds = time.perf_counter() - started
    if stops.requested:
        raise RunInterrupted(
            f"{stops.requested}: stopped after step {trainer.state.global_step}; checkpoint {checkpointer.last}.\n"
            f"Resume with: {resume_command}"
        )
    eval_loss = None
    if prepared.eval:
        eval_loss = trainer.evaluate()["eval_loss"]
    fed.tokens, fed.positions = sum_over_ranks([fed.tokens, fed.positions])
    if not main:
        barrier()  # wait while rank 0 writes the adapter and the summary
        return TrainingRun(summary={}, model=model, tokenizer=tokenizer)
    mmlu_accuracy = mmlu.measure(model, trainer.state.global_step) if mmlu else None

    save_adapter(model, tokenizer, template, run_dir / "adapter")
    if metrics.records:
        plot_loss(metrics.records, run_dir / "loss.png")
    peak, peak_kind = peak_memory_bytes(on_device)
    stats = prepared.train_stats
    summary = {
        "steps": trainer.state.global_step,
        "resumed_from_step": checkpoint.step if checkpoint else None,
        "examples": stats.examples,
        "train_tokens": fed.tokens,
        "fed_positions": fed.positions,
        "padding_fraction": round(fed.padding_fraction, 4),
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(fed.tokens / train_seconds, 1) if train_seconds and not checkpoint else None,
        "first_loss": metrics.records[0]["loss"] if metrics.records else None,
        "final_loss": metrics.records[-1]["loss"] if metrics.records else None,
        "eval_loss": eval_loss,
        "mmlu_accuracy": mmlu_accuracy,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "compute_dtype": str(dtype.dtype).removeprefix("torch."),
        "gradient_checkpointing": checkpointing,
        "device": on_device,
        "trainable_parameters": trainable,
        "processes": world_size(),
        "global_batch_size": recipe.training.batch_size * recipe.training.gradient_accumulation_steps * world_size(),
        "base_model": model_path,
        "rows_per_source": datasets.rows_per_source,
        "skipped_bad_rows": len(datasets.skipped),
        "truncated_examples": stats.truncated,
        "dropped_examples": stats.dropped_too_long + stats.dropped_no_trained_tokens,
        "versions": library_versions(),
    }
    if recipe.output.merge:
        from .merge import merge_run

        report = merge_run(run_dir, say=console.print, overwrite=True)
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
                ("tokens/s", summary["tokens_per_second"] or "-"),
                ("peak memory", f"{peak / 2**20:,.0f} MiB ({peak_kind})"),
                ("adapter", str(run_dir / "adapter")),
            ],
        )
    )
    barrier()
    return TrainingRun(summary=summary, model=model, tokenizer=tokenizer)
