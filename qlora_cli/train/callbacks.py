"""Training callbacks: metrics and progress, checkpoints on schedule or on a signal, multiple-choice
accuracy during training, and the stop requests that SIGINT/SIGTERM make."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from .checkpoint import checkpoint_bytes_estimate, finalize
from ..core.compat import library_versions
from ..core.console import format_seconds
from ..core.context import RunContext
from ..core.distributed import barrier, sum_over_ranks
from ..core.errors import Problem, RunFailure, UserError
from ..evaluation.mmlu import evaluate
from ..core.jsonl_log import JsonlLog
from ..core.recipe import MmluSection
from ..core.files import write_atomic
from ..core.rundir import EVAL_METRICS, METRICS


class TrainClock:
    """Training time over the whole run: the earlier sessions' (from the checkpoint a run resumes from) plus
    this session's, counted from `start` to `stop` (the final evaluation and saving are not training)."""

    def __init__(self, before: float = 0.0):
        self.before = before
        self.started: float | None = None
        self.stopped: float | None = None

    def start(self) -> None:
        self.started, self.stopped = time.perf_counter(), None

    def stop(self) -> None:
        if self.started is not None and self.stopped is None:
            self.stopped = time.perf_counter()

    @property
    def session(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped if self.stopped is not None else time.perf_counter()) - self.started

    @property
    def total(self) -> float:
        return self.before + self.session


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class NonFiniteGuard(TrainerCallback):
    """Stops before the optimizer applies a non-finite gradient, so that no state of it is ever saved.

    The losses of a step's micro-batches are checked on the device and read back once, just before the
    update: reading each one back would make the host wait for the GPU at every micro-batch.
    """

    def __init__(self) -> None:
        self.bad = None

    def observe(self, loss) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.bad = bad if self.bad is None else self.bad | bad

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        bad, self.bad = self.bad, None
        if bad is not None and bool(bad):
            raise NonFiniteLoss(state.global_step + 1)


class StopRequests:
    """SIGINT/SIGTERM during training: the first asks for a checkpoint and a clean stop after the
    current step; the second aborts at once (a checkpoint being written is then left in staging,
    which is never taken for a checkpoint)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step and writing a checkpoint (again to abort now)", file=sys.stderr)

    def __enter__(self) -> "StopRequests":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Checkpointer(TrainerCallback):
    """Decides when to checkpoint (every `save_steps` updates, or on a stop request) and seals each checkpoint.

    Attributes:
        last: the newest sealed checkpoint of this session, for failure messages.
    """

    def __init__(self, run_dir: Path, save_steps: int | None, keep: int, fed, stops: StopRequests,
                 fingerprints: dict[str, str], trainable_parameters: int, context: RunContext, clock: TrainClock):
        self.run_dir, self.save_steps, self.keep = run_dir, save_steps, keep
        self.fed, self.stops, self.fingerprints, self.clock = fed, stops, fingerprints, clock
        self.trainable_parameters, self.context = trainable_parameters, context
        self.last: Path | None = None

    def on_step_end(self, args, state, control, **kwargs):
        due = bool(self.save_steps) and state.global_step % self.save_steps == 0
        if self.stops.requested:
            control.should_training_stop = True
        if not (due or self.stops.requested):
            return
        needed = checkpoint_bytes_estimate(self.run_dir, self.trainable_parameters)
        free = shutil.disk_usage(self.run_dir).free
        if free < needed:
            raise RunFailure(
                f"not enough free disk for the checkpoint of step {state.global_step} in {self.run_dir}: "
                f"needs about {needed / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free; "
                f"last good checkpoint: {self.last or 'none'}"
            )
        control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        tokens, positions = sum_over_ranks([self.fed.tokens, self.fed.positions])
        barrier()  # every rank has written its part (its RNG state) into staging
        if self.context.is_main:
            manifest = {**self.fingerprints, "fed_tokens": tokens, "fed_positions": positions,
                        "train_seconds": round(self.clock.total, 3), "versions": library_versions()}
            self.last = finalize(self.run_dir, state.global_step, manifest, self.keep)
        barrier()  # nobody writes into staging while it is sealed


def read_records(path: Path, up_to_step: int | None) -> list[dict[str, Any]]:
    """The JSONL records of an earlier session of this run up to a step (all when None), and the
    file rewritten to hold just those: a resumed run logs the later steps again."""
    if not path.is_file():
        return []
    # A last line cut short by a kill is left out: its step comes after the checkpoint, and is logged again.
    lines = JsonlLog(path).read().decode("utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(Problem(f"not a JSON record ({error.msg}); the run's log is damaged", file=path,
                                    line=number)) from None
    kept = [r for r in records if up_to_step is None or r["step"] <= up_to_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def append_record(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


class MmluEvaluator(TrainerCallback):
    """Multiple-choice accuracy every `eval_steps` updates, logged to eval_metrics.jsonl."""

    def __init__(self, settings: MmluSection, eval_steps: int | None, run_dir: Path, tokenizer, mmlu_data, console: Console):
        self.settings, self.eval_steps, self.run_dir = settings, eval_steps, run_dir
        self.tokenizer, self.mmlu_data, self.console = tokenizer, mmlu_data, console
        self.last: float | None = None

    def measure(self, model, step: int) -> float:
        result = evaluate(model, self.tokenizer, *self.mmlu_data, shots=self.settings.shots, limit=self.settings.limit)
        self.last = result["accuracy"]
        append_record(self.run_dir / EVAL_METRICS,
                      {"step": step, "mmlu_accuracy": self.last, "mmlu_questions": result["questions"]})
        self.console.print(f"step {step}: multiple-choice accuracy {self.last:.1%} on {result['questions']} questions")
        return self.last

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step < state.max_steps:
            self.measure(model, state.global_step)


class MetricsWriter(TrainerCallback):
    """Writes metrics.jsonl (and the evaluation losses to eval_metrics.jsonl); `fed` counts the tokens the
    Trainer has trained on and `clock` the training time, both over the whole run. A resumed run first cuts
    both files back to the step it resumes from."""

    def __init__(self, run_dir: Path, fed, clock: TrainClock, resumed_step: int | None = None,
                 metric_names: tuple[str, ...] = ()):
        self.run_dir, self.fed, self.clock, self.metric_names = run_dir, fed, clock, metric_names
        self.records = read_records(run_dir / METRICS, resumed_step) if resumed_step else []
        if resumed_step:
            read_records(run_dir / EVAL_METRICS, resumed_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        elapsed = round(self.clock.total, 3)
        if logs and "eval_loss" in logs:
            append_record(self.run_dir / EVAL_METRICS,
                          {"step": state.global_step, "eval_loss": logs["eval_loss"], "elapsed_seconds": elapsed,
                           **{f"eval_{name}": logs[f"eval_{name}"] for name in self.metric_names if f"eval_{name}" in logs}})
        if not logs or "loss" not in logs:
            return
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "epoch": logs.get("epoch"),
            "tokens": self.fed.tokens,
            "elapsed_seconds": elapsed,
            **{name: logs[name] for name in self.metric_names if name in logs},  # the training method's own
        }
        self.records.append(record)
        append_record(self.run_dir / METRICS, record)


class ProgressReporter(TrainerCallback):
    """Progress of the training steps: a live bar on a terminal, a line per logged step otherwise."""

    def __init__(self, console: Console, fed, metric_names: tuple[str, ...] = ()):
        self.console, self.fed, self.metric_names = console, fed, metric_names
        self.live = console.is_terminal
        self.progress = None
        self.task = None
        self.started = time.perf_counter()
        self.first_step = 0  # a resumed run: the rate and the ETA are this session's
        self.tokens_before = 0
        self.last: dict[str, Any] = {}

    def _fields(self) -> dict[str, str]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        loss = self.last.get("loss")
        lr = self.last.get("learning_rate")
        return {
            "loss": f"{loss:.4f}" if loss is not None else "-",
            "lr": f"{lr:.2e}" if lr is not None else "-",
            "tps": f"{(self.fed.tokens - self.tokens_before) / elapsed:,.0f}",
            # the training method's own metrics, as logged with the loss
            "method": "".join(f"  {name} {self.last[name]:.4g}" for name in self.metric_names if name in self.last),
        }

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.first_step, self.tokens_before = state.global_step, self.fed.tokens
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}{task.fields[method]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               loss="-", lr="-", tps="0", method="")

    def on_step_end(self, args, state, control, **kwargs):
        # The fields wait for the next log: the token count lives on the device, and reading it here would
        # make the host wait for the GPU at every step.
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.last = logs
        if self.progress is not None:
            self.progress.update(self.task, **self._fields())
            return
        fields = self._fields()
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / max(state.global_step - self.first_step, 1) * (state.max_steps - state.global_step)
        self.console.print(
            f"step {state.global_step}/{state.max_steps}  loss {fields['loss']}{fields['method']}  lr {fields['lr']}  "
            f"{fields['tps']} tok/s  eta {format_seconds(remaining)}"
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
