"""Check `qlora plan` against a real run: the memory a training run's tensors really take at their peak.

A check, not a test of speed: it trains the recipe's model for a few steps with `qlora train`'s own code
on batches that fill the plan's shape exactly (batch_size rows of max_seq_len tokens, every token
trained), and records every tensor allocation and free of the run with the torch profiler. The peak is
the tensors alive when training starts (the quantized weights with their constants, the layers kept in
float32, the adapters) plus the highest the allocations reach while it runs (gradients, optimizer
states, activations, transients). It measures CPU runs: on a GPU `torch.cuda.max_memory_allocated` is
that figure already, while on a CPU no allocator keeps it, hence the profiler. The plan's side is its
resident total without the CUDA context and allocator overhead, which a CPU does not have.

    python scripts/measure_plan.py RECIPE [--steps 2] [--set KEY=VALUE ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
from pathlib import Path

from transformers import TrainerCallback


def live_model_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters, buffers and 4-bit quantization states."""
    import bitsandbytes as bnb
    import torch

    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            state = module.weight.quant_state
            for value in (state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.nested else ())):
                add(value)
    return sum(storages.values())


def peak_of(events) -> int:
    """The highest running total of the profiler's memory events (allocations positive, frees negative)."""
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def full_length_rows(count: int, words: int, seed: int = 0) -> list[dict]:
    """Text rows longer than any max_seq_len asked for here, so that truncation makes every one exactly that long."""
    rng = random.Random(seed)
    vocabulary = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{rng.choice('nrst')}" for _ in range(500)]
    return [{"text": " ".join(rng.choice(vocabulary) for _ in range(words))} for _ in range(count)]


class RecordAllocations(TrainerCallback):
    """Every tensor allocation and free of the training loop (torch profiler), and what was alive at its start."""

    def __init__(self) -> None:
        self.measured: dict[str, int] = {}
        self.profiler = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.profiler import ProfilerActivity, profile

        self.measured["at_start"] = live_model_bytes(model)
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        from qlora_cli.core.compat import profiler_memory_events

        self.profiler.__exit__(None, None, None)
        events = profiler_memory_events(self.profiler)
        self.measured["during_training"] = peak_of(e for e in events if str(e.device_type()).endswith("CPU"))


def measure(recipe_path: Path, steps: int, work: Path, overrides: list[str] = ()) -> dict:
    """Train `steps` steps of the recipe on full-length rows; return the plan's figures and the measured ones."""
    from rich.console import Console

    from qlora_cli.plan.configs import read_model_config
    from qlora_cli.plan.memory import plan_memory
    from qlora_cli.core.models import resolve_model_path
    from qlora_cli.core.recipe import Recipe, load_recipe
    from qlora_cli.train.run import finish, fit, setup

    recipe = load_recipe(recipe_path, list(overrides))
    rows = recipe.training.batch_size * recipe.training.gradient_accumulation_steps * steps
    data = work / "full-length.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in full_length_rows(rows, 4 * recipe.data.max_seq_len)))
    fields = recipe.model_dump()
    fields["data"].update(train=[{"path": data, "format": "text"}], eval=[], eval_size=0, truncation="right")
    fields["training"].update(max_steps=steps, eval_mmlu=None, eval_steps=None, save_steps=None)
    fields["output"].update(dir=work / "run", merge=False)
    recipe = Recipe.model_validate(fields)

    recorder = RecordAllocations()
    run = setup(recipe, console=Console(file=io.StringIO()))
    summary = finish(run, fit(run, callbacks=[recorder]))  # qlora train's own loop, with the recorder added
    measured = recorder.measured
    planned = recipe.model_copy(deep=True)
    planned.quantization.compute_dtype = summary["compute_dtype"]
    planned.training.gradient_checkpointing = summary["gradient_checkpointing"]
    plan = plan_memory(read_model_config(resolve_model_path(recipe.model.base)), planned)
    plan_bytes = plan.weights_bytes + plan.lora_bytes + plan.gradient_bytes + plan.optimizer_bytes + plan.activation_bytes
    peak = measured["at_start"] + measured["during_training"]
    return {
        "recipe": str(recipe_path),
        "tokens_per_step": recipe.training.batch_size * recipe.data.max_seq_len,
        "compute_dtype": summary["compute_dtype"],
        "gradient_checkpointing": summary["gradient_checkpointing"],
        "plan": {"weights_bytes": plan.weights_bytes, "lora_bytes": plan.lora_bytes, "gradient_bytes": plan.gradient_bytes,
                 "optimizer_bytes": plan.optimizer_bytes, "activation_bytes": plan.activation_bytes, "total_bytes": plan_bytes},
        "measured": {"at_train_start_bytes": measured["at_start"], "peak_during_training_bytes": measured["during_training"],
                     "peak_bytes": peak},
        "measured_over_plan": round(peak / plan_bytes, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe key.")
    args = parser.parse_args()
    import torch

    if torch.cuda.is_available():
        parser.exit(2, "measure_plan.py measures CPU runs; on a GPU compare torch.cuda.max_memory_allocated with the plan\n")
    with tempfile.TemporaryDirectory(prefix="qlora-measure-") as work:
        report = measure(args.recipe.resolve(), args.steps, Path(work), args.set)
    mib = 2**20
    for part, value in report["plan"].items():
        print(f"plan {part:<22} {value / mib:10.1f} MiB")
    for part, value in report["measured"].items():
        print(f"measured {part:<27} {value / mib:10.1f} MiB")
    print(f"measured peak / plan: {report['measured_over_plan']:.3f} "
          f"({report['compute_dtype']}, checkpointing {'on' if report['gradient_checkpointing'] else 'off'}, "
          f"{report['tokens_per_step']} tokens per step)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
