"""Training callbacks: metrics and progress, checkpoints on schedule or on a signal, multiple-choice
accuracy during training, and the stop requests that SIGINT/SIGTERM make."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .checkpoint import checkpoint_bytes_estimate, finalize, library_versions
from .console import format_seconds
from .errors import RunFailure
from .recipe import Recipe


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class StopRequests:
    """SIGINT/SIGTERM during training: the first asks for a checkpoint and a clean stop after the
    current step; the second aborts at once (a checkpoint being written is then left in staging,
    which is never taken for a checkpoint)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        import signal

        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step and writing a checkpoint (again to abort now)", file=sys.stderr)

    def __enter__(self) -> "StopRequests":
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def make_checkpointer(recipe: Recipe, run_dir: Path, fed, stops: StopRequests, fingerprints: dict[str, str], trainable: int):
    """Decides when to checkpoint (every save_steps, or on a stop request) and seals each checkpoint."""
    from transformers import TrainerCallback

    class Checkpointer(TrainerCallback):
        last: Path | None = None

        def on_step_end(self, args, state, control, **kwargs):
            every = recipe.training.save_steps
            due = bool(every) and state.global_step % every == 0
            if stops.requested:
                control.should_training_stop = True
            if not (due or stops.requested):
                return
            needed = checkpoint_bytes_estimate(run_dir, trainable)
            free = shutil.disk_usage(run_dir).free
            if free < needed:
                raise RunFailure(
                    f"not enough free disk for the checkpoint of step {state.global_step} in {run_dir}: "
                    f"needs about {needed / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free; "
                    f"last good checkpoint: {self.last or 'none'}"
                )
            control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            from .distributed import barrier, is_main, sum_over_ranks

            tokens, positions = sum_over_ranks([fed.tokens, fed.positions])
            barrier()  # every rank has written its part (its RNG state) into staging
            if is_main():
                manifest = {**fingerprints, "fed_tokens": tokens, "fed_positions": positions,
                            "versions": library_versions()}
                self.last = finalize(run_dir, state.global_step, manifest, recipe.training.keep_checkpoints)
            barrier()  # nobody writes into staging while it is sealed

    return Checkpointer()


def read_records(path: Path, up_to_step: int | None) -> list[dict[str, Any]]:
    """The JSONL records of an earlier session of this run up to a step (all when None), and the
    file rewritten to hold just those: a resumed run logs the later steps again."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in records if up_to_step is None or r["step"] <= up_to_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


def make_mmlu_evaluator(recipe: Recipe, run_dir: Path, tokenizer, mmlu_data, console: Console):
    """Multiple-choice accuracy every `eval_steps` updates, logged to eval_metrics.jsonl."""
    from transformers import TrainerCallback

    from .evaluation.mmlu import evaluate

    settings = recipe.training.eval_mmlu

    class MmluEvaluator(TrainerCallback):
        last: float | None = None

        def measure(self, model, step: int) -> float:
            result = evaluate(model, tokenizer, *mmlu_data, shots=settings.shots, limit=settings.limit)
            self.last = result["accuracy"]
            with (run_dir / "eval_metrics.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "mmlu_accuracy": self.last,
                                         "mmlu_questions": result["questions"]}) + "\n")
            console.print(f"step {step}: multiple-choice accuracy {self.last:.1%} on {result['questions']} questions")
            return self.last

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = recipe.training.eval_steps
            if every and state.global_step % every == 0 and state.global_step < state.max_steps:
                self.measure(model, state.global_step)

    return MmluEvaluator()


def make_callbacks(run_dir: Path, console: Console, fed, resumed_step: int | None = None):
    """Callbacks that write metrics.jsonl (and eval_metrics.jsonl) and show progress (a bar on a TTY,
    lines otherwise). `fed` counts the tokens the training collator has handed to the model."""
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        def __init__(self) -> None:
            self.path = run_dir / "metrics.jsonl"
            self.records = read_records(self.path, resumed_step) if resumed_step else []
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

            self.eval_records = read_records(run_dir / "eval_metrics.jsonl", resumed_step) if resumed_step else []

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
