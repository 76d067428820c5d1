"""The training stage, in three steps that read top to bottom:

    run = setup(recipe)                  everything checkable is checked, then the data and the model load
    result = fit(run, callbacks=[...])   the transformers Trainer's loop, with any callbacks a tool adds
    summary = finish(run, result)        the adapter, the loss curve, summary.json, and the merge if asked

`run_training` does all three, as `qlora train` does. What differs between training methods (SFT, preference
tuning) is the method's (train/methods); the Trainer is in trainer.py, the callbacks that log, checkpoint and
stop on signals in callbacks.py, the run directory's layout in core/rundir.py.
"""

from __future__ import annotations

import gc
import io
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import set_seed

from .. import __version__
from ..core import compat
from ..core.console import format_seconds, key_value_table, recipe_table, working
from ..core.context import RunContext, run_context
from ..core.cpu import keep_freed_memory
from ..core.memory_usage import AnonymousPeak
from ..core.distributed import barrier, rank, sum_over_ranks
from ..core.errors import RunFailure, RunInterrupted, UserError
from ..core.files import staged, write_atomic, write_json
from ..core.models import load_tokenizer, quiet_libraries, resolve_model_path
from .model import count_parameters, decide_checkpointing, load_model
from ..core.recipe import Recipe, to_yaml
from ..core.rundir import (
    ADAPTER, LOSS_PLOT, PARITY_PROMPT_COUNT, PARITY_PROMPT_TOKENS, PARITY_PROMPTS, RECIPE, SUMMARY, check_writable,
    is_run, read_run_recipe, save_adapter, start_fresh,
)
from ..data.prepare import PreparedData, expected_padding, prepare
from ..data.sources import Datasets, load_datasets
from ..data.templates import resolve_template
from ..data.store import lengths_of
from ..data.tokenize import FedTokens
from ..evaluation.mmlu import read_mmlu
from ..plan.configs import read_model_config
from ..plan.memory import plan_memory
from ..export.merge import merge_run
from .callbacks import Checkpointer, MetricsWriter, MmluEvaluator, NonFiniteLoss, ProgressReporter, StopRequests, TrainClock
from .checkpoint import (Checkpoint, clear_staging, finished_run, latest_checkpoint, recipe_differences,
                         recipe_fingerprint)
from .loss import forget_cast_weights
from .methods import load_method
from .methods.base import TrainingMethod
from .profile import PhaseClock, StepProfiler
from .trackers import TrackerLog, check_trackers_installed, tracker_environment
from .trainer import RecipeTrainer, make_trainer


# ---------------------------------------------------------------------------------------------
# Set-up: everything that can be checked before the model loads, then the data and the model

@dataclass
class Run:
    """A run ready to train: its recipe, context, data, tokenizer and model, and where it writes."""

    recipe: Recipe
    method: TrainingMethod
    context: RunContext
    console: Console
    run_dir: Path
    resume_from: Checkpoint | None
    resume_command: str
    datasets: Datasets
    mmlu_data: Any
    model_path: str
    tokenizer: Any
    template: str
    prepared: PreparedData
    fingerprints: dict[str, str]
    checkpointing: bool
    model: Any
    trainable_parameters: int
    memory: AnonymousPeak | None = None  # on CPU: the run's anonymous memory peak, sampled from its start


def checkpoint_to_resume(run_dir: Path, recipe: Recipe, say) -> Checkpoint:
    """The newest intact checkpoint of the run, after checking that the recipe still trains the same thing.

    Raises:
        UserError: no run to resume, no intact checkpoint, or a recipe changed in a way that matters.
    """
    if not is_run(run_dir):
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


def describe_context(console: Console, context: RunContext, recipe: Recipe) -> None:
    console.print(f"Device: {context.device}; compute dtype: {context.dtype_name} ({context.dtype_reason})")
    if recipe.training.distributed == "fsdp" and not context.sharded:
        console.print("[yellow]training.distributed: fsdp with one process has nothing to shard: the model trains whole "
                      "on this GPU (launch several with --nproc N to shard it)")
    if context.device == "cpu" and context.compute_dtype == torch.bfloat16 and not compat.cpu_has_native_bfloat16():
        console.print("[yellow]bfloat16 on a CPU without native bfloat16: it is emulated; float32 is usually far faster.")


def describe_data(console: Console, datasets: Datasets, prepared: PreparedData, recipe: Recipe,
                  method: TrainingMethod) -> float:
    """Print what will be trained on; return the padding fraction the batching is expected to feed."""
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
    padding = expected_padding(recipe, lengths_of(method, prepared.train))
    batching = "packed, no padding" if recipe.data.packing else (
        "grouped by length" if recipe.data.group_by_length else "random batches"
    )
    console.print(f"Batching: {batching}; expected padding {padding:.1%} of fed positions")
    return padding


def parity_prompts(method: TrainingMethod, prepared: PreparedData) -> dict[str, Any]:
    """The token ids the merge is checked on, kept in the run so that a merge needs neither the data files nor
    their tokenization: the first rows of the evaluation data, else of the training data, as trained on."""
    held_out = bool(prepared.eval)
    rows = (prepared.eval if held_out else prepared.train)[:PARITY_PROMPT_COUNT]
    prompts = [ids[:PARITY_PROMPT_TOKENS] for ids in method.parity_prompts(rows)]
    where = "evaluation rows" if held_out else "training rows (the run has no evaluation rows)"
    return {"prompts": prompts, "from": f"the first {len(prompts)} {where}, at most {PARITY_PROMPT_TOKENS} tokens each"}


def setup(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    console: Console | None = None,
    resume_command: str = "qlora train RECIPE --resume",
) -> Run:
    """Check, load and prepare a run. Nothing in the run directory changes until the model has loaded.

    Raises:
        UserError: bad recipe, data, model source or run directory.
    """
    context = run_context(recipe.quantization.compute_dtype, recipe.training.distributed)
    console = console or Console()
    if not context.is_main:
        console = Console(file=io.StringIO())  # rank 0 speaks for the run
    run_dir = recipe.output.dir
    assert run_dir is not None, "load_recipe sets output.dir"
    memory = AnonymousPeak().start() if context.device == "cpu" else None
    # Every rank checks the recipe and the data; rank 0 alone owns the run directory.
    resume_from = checkpoint_to_resume(run_dir, recipe, console.print) if resume else None
    if not resume and context.is_main:
        check_writable(run_dir, overwrite)
    method = load_method(recipe.training.method, recipe)
    check_trackers_installed(recipe.training.report_to)
    with working(console, "Reading and checking the data"):
        datasets = load_datasets(recipe.data, recipe.training.seed, method.read_row)
    mmlu_data = None
    if recipe.training.eval_mmlu is not None:
        mmlu_data = read_mmlu(recipe.training.eval_mmlu.data)
    console.print(recipe_table(recipe))
    console.print(f"Read {len(datasets.train):,} training and {len(datasets.eval):,} evaluation rows.")

    quiet_libraries(console.is_terminal)
    describe_context(console, context, recipe)
    if context.device == "cpu":
        keep_freed_memory()
    if recipe.model.trust_remote_code:
        console.print("[bold red]model.trust_remote_code is on: the model repository's Python code will run.")

    model_path = resolve_model_path(recipe.model.base, console)
    tokenizer = load_tokenizer(model_path, recipe.model)
    template = resolve_template(recipe.data.template, tokenizer)
    prepared = prepare(recipe, tokenizer, template, datasets, method, console=console)
    describe_data(console, datasets, prepared, recipe, method)
    fingerprints = {
        "recipe_fingerprint": recipe_fingerprint(recipe),
        "data_fingerprint": prepared.fingerprint,
    }
    if resume_from is not None:
        if resume_from.manifest.get("data_fingerprint") != fingerprints["data_fingerprint"]:
            raise UserError(f"--resume: the training data (or its tokenization) changed since {resume_from.path} was written")
        console.print(f"Resuming from {resume_from.path} (step {resume_from.step})")

    checkpointing, why = decide_checkpointing(recipe, model_path, context)
    console.print(f"Gradient checkpointing: {'on' if checkpointing else 'off'} ({why})")
    set_seed(recipe.training.seed)
    bits = {4: f"in 4-bit {recipe.quantization.quant_type.upper()}", 8: "in 8-bit", 16: "unquantized"}[recipe.quantization.bits]
    with working(console, f"Loading {recipe.model.base} {bits} with LoRA"):
        model = load_model(model_path, recipe, context, checkpointing, fresh=resume_from is None, say=console.print)
    trainable, total = count_parameters(model)
    console.print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})")

    if context.is_main:
        if resume_from is None:
            # Everything checkable is checked and the model loaded: only now is an old run replaced.
            start_fresh(run_dir, recipe)
            write_json(run_dir / PARITY_PROMPTS, parity_prompts(method, prepared))
        else:
            clear_staging(run_dir)
            # Atomic: the other ranks read the run's recipe while rank 0 writes the new one.
            write_atomic(run_dir / RECIPE, to_yaml(recipe))
    return Run(recipe, method, context, console, run_dir, resume_from, resume_command, datasets, mmlu_data, model_path,
               tokenizer, template, prepared, fingerprints, checkpointing, model, trainable, memory)


# ---------------------------------------------------------------------------------------------
# The fit

@dataclass
class FitResult:
    trainer: RecipeTrainer
    fed: FedTokens  # totals over all ranks and sessions
    clock: TrainClock
    metrics: MetricsWriter | None  # rank 0 only
    mmlu: MmluEvaluator | None
    eval_loss: float | None
    eval_metrics: dict[str, float]  # the training method's metrics over the evaluation rows, named eval_...
    trackers: TrackerLog | None = None  # rank 0, with training.report_to


def fit(run: Run, callbacks: list | tuple = (), profile_steps: int | None = None) -> FitResult:
    """Train, with the project's callbacks and `callbacks` added (a memory recorder, ...).

    Args:
        profile_steps: profile this many optimizer steps after a warm-up into RUN_DIR/profile (see profile.py).

    Raises:
        RunFailure: a non-finite loss, out of memory, or no disk for a checkpoint.
        RunInterrupted: SIGINT/SIGTERM; a checkpoint was written and the message says how to resume.
    """
    recipe, context, run_dir = run.recipe, run.context, run.run_dir
    fed = FedTokens()
    resumed_step = run.resume_from.step if run.resume_from else None
    if run.resume_from is not None and context.is_main:  # the manifest holds the totals of all ranks
        fed.tokens, fed.positions = run.resume_from.manifest["fed_tokens"], run.resume_from.manifest["fed_positions"]
    stops = StopRequests()
    clock = TrainClock(run.resume_from.manifest.get("train_seconds", 0.0) if run.resume_from else 0.0)
    checkpointer = Checkpointer(run_dir, recipe.training.save_steps, recipe.training.keep_checkpoints, fed, stops,
                                run.fingerprints, run.trainable_parameters, context, clock)
    ours: list = [checkpointer]
    metrics = mmlu = reporter = profiler = trackers = None
    if context.is_main:  # only rank 0 logs: the metrics files are rewritten on resume
        metrics = MetricsWriter(run_dir, fed, clock, resumed_step, run.method.metric_names)
        reporter = ProgressReporter(run.console, fed, run.method.metric_names)
        ours += [metrics, reporter]
        if run.mmlu_data is not None:
            mmlu = MmluEvaluator(recipe.training.eval_mmlu, recipe.training.eval_steps, run_dir, run.tokenizer,
                                 run.mmlu_data, run.console)
            ours.append(mmlu)
        if recipe.training.report_to:
            trackers = TrackerLog(recipe, recipe.training.report_to)
            ours.append(trackers)
        if profile_steps:
            profiler = StepProfiler(run_dir, profile_steps, context.device, fed, say=run.console.print)
            ours.append(profiler)
    phases = profiler.clock if profiler is not None else PhaseClock(context.device)
    # The trackers' integrations read their settings when the Trainer is made (TensorBoard) and when it starts.
    with tracker_environment(run_dir, recipe.training.report_to):
        trainer = make_trainer(run, fed, [*ours, *callbacks], phases)
    if context.sharded and not trainer.is_fsdp_enabled:
        raise RunFailure("training.distributed: fsdp was asked for, but accelerate did not enable FSDP on these devices")
    clock.start()
    try:
        with stops, tracker_environment(run_dir, recipe.training.report_to):
            trainer.train(resume_from_checkpoint=str(run.resume_from.path) if run.resume_from else None)
    except NonFiniteLoss as error:
        raise RunFailure(
            f"the loss became non-finite at step {error.step}; training stopped before that step was applied. "
            f"Last good checkpoint: {checkpointer.last or 'none'}. Lower training.learning_rate, check the data, "
            "or use compute_dtype bfloat16/float32 instead of float16."
        ) from None
    except (MemoryError, torch.cuda.OutOfMemoryError):
        rows, length = fed.last_shape
        raise RunFailure(
            f"out of memory at step {trainer.state.global_step + 1} on a batch of {rows} x {length} tokens "
            f"(training.batch_size {recipe.training.batch_size}, data.max_seq_len {recipe.data.max_seq_len}): lower "
            "training.batch_size (raise gradient_accumulation_steps to keep the effective batch), lower "
            "data.max_seq_len, or set training.gradient_checkpointing: true. "
            f"Last good checkpoint: {checkpointer.last or 'none'}"
        ) from None
    finally:
        # transformers ends its callbacks only when training ends normally: a failure must not leave the
        # profiler running or the progress bar drawn.
        clock.stop()
        if reporter is not None:
            reporter.stop()
        if profiler is not None:
            profiler.finish()  # what was profiled before a failure is written too
        if context.is_main:
            clear_staging(run_dir)
    if stops.requested:
        raise RunInterrupted(
            f"{stops.requested}: stopped after step {trainer.state.global_step}; checkpoint {checkpointer.last}.\n"
            f"Resume with: {run.resume_command}"
        )
    eval_loss, eval_metrics = None, {}
    if run.prepared.eval:
        with working(run.console, f"Evaluating on {len(run.prepared.eval):,} rows"):
            evaluation = trainer.evaluate()
        eval_loss = evaluation["eval_loss"]
        eval_metrics = {f"eval_{name}": evaluation[f"eval_{name}"] for name in run.method.metric_names
                        if f"eval_{name}" in evaluation}
    fed.tokens, fed.positions = sum_over_ranks([fed.tokens, fed.positions])
    return FitResult(trainer, fed, clock, metrics, mmlu, eval_loss, eval_metrics, trackers)


# ---------------------------------------------------------------------------------------------
# The finish: what the run leaves behind

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
    with staged(path) as staging:  # the staging name keeps the suffix, from which matplotlib takes the format
        figure.savefig(staging)
    plt.close(figure)


def peak_rss_bytes() -> int:
    """The process's peak resident set, mapped files' pages included."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # KiB on Linux, bytes on macOS


def peak_memory_bytes(device: str, memory: AnonymousPeak | None = None) -> tuple[int, str]:
    """The run's peak memory and what it counts: on CUDA the tensors (torch's peak allocated); on CPU the
    anonymous memory (not the model files mapped while loading, which the kernel can drop) where the system
    says it, else the process's peak RSS."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "CUDA max allocated"
    if memory is not None and memory.available:
        return memory.stop(), "anonymous memory, sampled: not the model files mapped while loading"
    return peak_rss_bytes(), "process peak RSS, model files mapped while loading included"


def planned_memory_bytes(run: Run) -> int | None:
    """What `qlora plan` says this run's tensors take (its allocated bytes), for the run's compute dtype and
    gradient checkpointing; None for a model it cannot plan."""
    planned = run.recipe.model_copy(deep=True)
    planned.quantization.compute_dtype = run.context.dtype_name
    planned.training.gradient_checkpointing = run.checkpointing
    try:
        return plan_memory(read_model_config(run.model_path), planned).allocated_bytes
    except UserError:
        return None


def run_summary(run: Run, result: FitResult, mmlu_accuracy: float | None) -> dict[str, Any]:
    """What summary.json holds."""
    recipe, context, fed = run.recipe, run.context, result.fed
    records = result.metrics.records if result.metrics else []
    peak, peak_kind = peak_memory_bytes(context.device, run.memory)
    stats = run.prepared.train_stats
    seconds = result.clock.total
    return {
        "qlora_version": __version__,
        "steps": result.trainer.state.global_step,
        "epochs": round(result.trainer.state.epoch or 0.0, 6),  # what a --resume must exceed to train further
        "resumed_from_step": run.resume_from.step if run.resume_from else None,
        "examples": stats.examples,
        "train_tokens": fed.tokens,
        "fed_positions": fed.positions,
        "padding_fraction": round(fed.padding_fraction, 4),
        "train_seconds": round(seconds, 3),  # every session of the run, as tokens are
        "session_train_seconds": round(result.clock.session, 3),
        "tokens_per_second": round(fed.tokens / seconds, 1) if seconds else None,
        "method": recipe.training.method,
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        # the training method's own metrics, as last logged
        **{name: records[-1][name] for name in run.method.metric_names if records and name in records[-1]},
        "eval_loss": result.eval_loss,
        **result.eval_metrics,
        "mmlu_accuracy": mmlu_accuracy,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "peak_rss_bytes": peak_rss_bytes(),
        "planned_memory_bytes": planned_memory_bytes(run),
        "compute_dtype": context.dtype_name,
        "gradient_checkpointing": run.checkpointing,
        "device": context.device,
        "trainable_parameters": run.trainable_parameters,
        "processes": context.world_size,
        "global_batch_size": recipe.training.batch_size * recipe.training.gradient_accumulation_steps * context.world_size,
        "base_model": run.model_path,
        "rows_per_source": run.datasets.rows_per_source,
        "skipped_bad_rows": len(run.datasets.skipped),
        "truncated_examples": stats.truncated,
        "dropped_examples": stats.dropped_too_long + stats.dropped_no_trained_tokens,
        "versions": compat.library_versions(),
    }


def summary_table(run: Run, summary: dict[str, Any]):
    loss = f"{summary['first_loss']:.4f} → {summary['final_loss']:.4f}" if summary["first_loss"] is not None else "-"
    return key_value_table(
        "Summary",
        [
            ("run directory", str(run.run_dir)),
            ("steps", summary["steps"]),
            ("loss (first → last)", loss),
            *([("eval loss", f"{summary['eval_loss']:.4f}")] if summary["eval_loss"] is not None else []),
            ("tokens trained on", f"{summary['train_tokens']:,} ({summary['padding_fraction']:.1%} padding fed)"),
            ("time", format_seconds(summary["train_seconds"])),
            ("tokens/s", summary["tokens_per_second"] or "-"),
            ("peak memory", f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB ({summary['peak_memory_kind']})"),
            *([("planned (qlora plan)", f"{summary['planned_memory_bytes'] / 2**20:,.0f} MiB of tensors; the process "
                "also holds the libraries and the data")] if summary.get("planned_memory_bytes") else []),
            ("adapter", str(run.run_dir / ADAPTER)),
        ],
    )


def release_trained_model(run: Run, result: FitResult) -> None:
    """Drop the run's references to the trained model, its trainer and optimizer, so that what comes next (the
    merge, which reads the run back from disk) has the memory training had."""
    run.model = None
    result.trainer = None
    result.mmlu = None
    forget_cast_weights()
    gc.collect()
    if run.context.device == "cuda":
        torch.cuda.empty_cache()


def finish(run: Run, result: FitResult) -> dict[str, Any]:
    """Write the adapter, the loss curve and summary.json (rank 0), and merge when the recipe asks, after
    releasing the trained model (the merge reads the run back from disk, a layer at a time).

    Returns:
        the summary written (empty on the other ranks).
    """
    if not run.context.is_main:
        barrier()  # wait while rank 0 writes the adapter and the summary
        return {}
    mmlu_accuracy = result.mmlu.measure(run.model, result.trainer.state.global_step) if result.mmlu else None
    save_adapter(run.model, run.tokenizer, run.template, run.run_dir)
    if result.metrics and result.metrics.records:
        plot_loss(result.metrics.records, run.run_dir / LOSS_PLOT)
    summary = run_summary(run, result, mmlu_accuracy)
    if run.recipe.output.merge:
        release_trained_model(run, result)
        report = merge_run(run.run_dir, console=run.console, overwrite=True)
        summary["merged"] = {key: report[key] for key in ("out", "dtype", "max_abs_logit_diff", "mean_kl_nats_per_token")}
    write_json(run.run_dir / SUMMARY, summary)
    if result.trackers is not None:
        result.trackers.log_summary(summary)
    run.console.print(summary_table(run, summary))
    barrier()
    return summary


@dataclass
class TrainingRun:
    summary: dict[str, Any]
    model: Any  # the trained PeftModel, still in memory; None when `output.merge` released it to merge
    tokenizer: Any


def run_training(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    console: Console | None = None,
    resume_command: str = "qlora train RECIPE --resume",
    profile_steps: int | None = None,
) -> TrainingRun:
    """Train the recipe and write its run directory (or continue it from its newest checkpoint).

    Raises:
        UserError: bad recipe, data, model source or run directory, found before training starts.
        RunFailure: a non-finite loss, out of memory, or no disk for a checkpoint, during training.
        RunInterrupted: SIGINT/SIGTERM; a checkpoint was written and the message says how to resume.
    """
    if resume and (finished := finished_run(recipe.output.dir, recipe)) is not None:
        # A job scheduler may pass --resume every time: a finished run is left exactly as it is.
        if rank() == 0:
            (console or Console()).print(
                f"{recipe.output.dir} has finished ({finished['steps']} steps, {finished.get('epochs', '?')} epochs); "
                "nothing was changed. To train further, raise training.max_steps (or training.epochs without "
                "max_steps), e.g. --set training.max_steps=N")
        return TrainingRun(summary=finished, model=None, tokenizer=None)
    run = setup(recipe, overwrite=overwrite, resume=resume, console=console, resume_command=resume_command)
    result = fit(run, profile_steps=profile_steps)
    summary = finish(run, result)
    return TrainingRun(summary=summary, model=run.model, tokenizer=run.tokenizer)
