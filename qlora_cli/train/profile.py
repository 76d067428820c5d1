"""`qlora train --profile [N]`: where a training step's time goes, on CPU or GPU.

After WARMUP_STEPS optimizer steps (allocator warm-up, lazy initialisation, kernel selection), the torch
profiler records N optimizer steps of the run, which otherwise goes on as usual. Each of those steps is
split into phases, timed with the device synchronised at their boundaries and marked in the trace:

    data        fetching and collating the step's batches (Trainer.get_batch_samples)
    forward     the model's forward and the loss (compute_loss), over the step's micro-batches; the chunked
                loss (loss.py) makes its own gradient here, so the output projection's backward is in it
    backward    the rest of each micro-batch's training step: the backward pass and the token counts
    optimizer   the optimizer's update (between on_pre_optimizer_step and on_optimizer_step)
    other       everything else in the step: gradient clipping, the scheduler, callbacks, host waits

What it writes, into RUN_DIR/profile/:

    trace.json        the torch profiler's trace (open it in https://ui.perfetto.dev or chrome://tracing)
    operations.txt    the operations with the most self time (device time on a GPU), with call counts
    steps.json        each profiled step's phase seconds and tokens, and their means
    summary.md        the phase table and the top operations, as printed at the end
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

from ..core import compat
from ..core.files import staged
from ..core.rundir import PROFILE

WARMUP_STEPS = 2
PHASES = ("data", "forward", "backward", "optimizer", "other")
TOP_OPERATIONS = 25


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PhaseClock:
    """Times the phases of the profiled steps (see the module's docstring). Outside them it does nothing, so
    the trainer calls it on every step: `begin_step` before fetching a step's data, then `clock(phase)`."""

    def __init__(self, device: str):
        self.device = device
        self.profiled: range = range(0)  # the optimizer steps (1-based) to time
        self.active = False
        self.seconds: dict[str, float] = {}
        self.step_started = 0.0

    def begin_step(self, step: int) -> None:
        self.active = step in self.profiled
        if self.active:
            synchronize(self.device)
            self.seconds = {}
            self.step_started = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        synchronize(self.device)
        started = time.perf_counter()
        with torch.profiler.record_function(f"qlora/{phase}"):
            yield
        synchronize(self.device)
        self.add(phase, time.perf_counter() - started)


def phase_breakdown(step_seconds: float, seconds: dict[str, float]) -> dict[str, float]:
    """The phases of one step, with `backward` net of the forward it contains and `other` the remainder.

    `seconds` holds what the clock measured, where `training_step` spans the forward and the backward.
    """
    forward = seconds.get("forward", 0.0)
    phases = {
        "data": seconds.get("data", 0.0),
        "forward": forward,
        "backward": max(seconds.get("training_step", 0.0) - forward, 0.0),
        "optimizer": seconds.get("optimizer", 0.0),
    }
    phases["other"] = max(step_seconds - sum(phases.values()), 0.0)
    return phases


class StepProfiler(TrainerCallback):
    """Profiles `steps` optimizer steps after WARMUP_STEPS, and writes RUN_DIR/profile/ when they are done
    (or at the end of training, if it ends first). The trainer drives its `clock`."""

    def __init__(self, run_dir: Path, steps: int, device: str, fed, say=print):
        self.folder = run_dir / PROFILE
        self.steps, self.device, self.fed, self.say = steps, device, fed, say
        self.clock = PhaseClock(device)
        self.profiler = None
        self.records: list[dict[str, Any]] = []
        self.tokens_at_start = 0
        self.optimizer_started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        first = state.global_step  # a resumed run counts on from where it stopped
        self.clock.profiled = range(first + WARMUP_STEPS + 1, first + WARMUP_STEPS + self.steps + 1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        # The profiler counts its own steps from here; its warm-up (one step traced, then discarded) is the
        # last of ours.
        self.profiler = profile(activities=activities,
                                schedule=schedule(wait=WARMUP_STEPS - 1, warmup=1, active=self.steps, repeat=1))
        self.profiler.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.clock.active:  # read back on profiled steps only: the count lives on the device
            self.tokens_at_start = self.fed.tokens  # counted as each micro-batch trains, after this

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.clock.active:
            synchronize(self.device)
            self.optimizer_started = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.clock.active:
            synchronize(self.device)
            self.clock.add("optimizer", time.perf_counter() - self.optimizer_started)

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock.active:
            synchronize(self.device)
            wall = time.perf_counter() - self.clock.step_started
            self.records.append({"step": state.global_step, "seconds": wall, "tokens": self.fed.tokens - self.tokens_at_start,
                                 "phases": phase_breakdown(wall, self.clock.seconds)})
            self.clock.active = False
        if self.profiler is not None:
            self.profiler.step()
            if len(self.records) == self.steps:
                self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        self.finish()

    def finish(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        if not self.records:
            self.say(f"Profile: training ended before step {WARMUP_STEPS + 1}; nothing was profiled")
            return
        self.write(profiler)

    def write(self, profiler) -> None:
        operations = operations_table(profiler, self.device)
        report = profile_report(self.records, self.device)
        with staged(self.folder) as staging:
            staging.mkdir()
            profiler.export_chrome_trace(str(staging / "trace.json"))
            (staging / "operations.txt").write_text(operations + "\n", encoding="utf-8")
            (staging / "steps.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            (staging / "summary.md").write_text(summary_markdown(report, operations), encoding="utf-8")
        self.say(summary_markdown(report, operations, top=12))
        self.say(f"Profile of {len(self.records)} step(s): {self.folder} (trace.json opens in https://ui.perfetto.dev)")


def operations_table(profiler, device: str) -> str:
    """The operations with the most self time (device time on a GPU). The phase marks are left out: they hold
    operations, not time of their own. `ProfilerStep*` stays: its self time is the host's time outside any
    operation (Python, the Trainer, callbacks)."""
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return compat.profiler_table(profiler.key_averages(), lambda event: not event.key.startswith("qlora/"),
                                 sort_by=sort_by, row_limit=TOP_OPERATIONS)


def profile_report(records: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The profiled steps and their means: seconds per phase, share of the step, tokens per second."""
    count = len(records)
    mean_seconds = sum(r["seconds"] for r in records) / count
    mean_phases = {phase: sum(r["phases"][phase] for r in records) / count for phase in PHASES}
    tokens = sum(r["tokens"] for r in records)
    return {
        "device": device,
        "warmup_steps": WARMUP_STEPS,
        "steps": records,
        "mean_step_seconds": mean_seconds,
        "mean_phase_seconds": mean_phases,
        "phase_share": {phase: (seconds / mean_seconds if mean_seconds else 0.0) for phase, seconds in mean_phases.items()},
        "tokens_per_second": tokens / sum(r["seconds"] for r in records) if records else 0.0,
        "note": "phases are timed with the device synchronised at their boundaries, which removes overlap between them",
    }


def summary_markdown(report: dict[str, Any], operations: str, top: int = TOP_OPERATIONS) -> str:
    lines = [
        f"Where a step's time goes ({len(report['steps'])} profiled step(s) after {report['warmup_steps']} warm-up, "
        f"{report['device']}; {report['tokens_per_second']:,.0f} tokens/s while profiled):",
        "",
        "| phase | ms per step | share |",
        "| --- | ---: | ---: |",
    ]
    for phase in PHASES:
        lines.append(f"| {phase} | {report['mean_phase_seconds'][phase] * 1e3:,.1f} | {report['phase_share'][phase]:.1%} |")
    lines.append(f"| step | {report['mean_step_seconds'] * 1e3:,.1f} | 100% |")
    table = operations.splitlines()
    # The operations table: a header of 3 lines, then one line per operation, then totals.
    lines += ["", "Top operations by self time:", "", "```", *table[: 3 + top], *table[-3:], "```", ""]
    return "\n".join(lines)
