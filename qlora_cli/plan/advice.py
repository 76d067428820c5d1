"""What to change when a training run does not fit its GPUs: concrete changes to the recipe, cheapest first,
each judged by planning the changed recipe again (plan/memory.py), then their combination, then FSDP.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from ..core.recipe import Recipe, with_change
from .sizes import format_bytes

MAX_FSDP_GPUS = 64


class Plan(Protocol):
    """What advice reads of a plan (plan/memory.py's MemoryPlan), in bytes per device."""

    fits: bool | None
    total_bytes: int
    resident_bytes: int
    weights_bytes: int
    activation_bytes: int


# Plans a recipe on this many devices, sharded or not, for the model and device memory being advised on.
Replan = Callable[[Recipe, int, bool], Plan]


def _verdict(plan: Plan) -> str:
    return "fits" if plan.fits else "still too big"


def advice(recipe: Recipe, plan: Plan, device_memory: int, gpus: int, sharded: bool, replan: Replan) -> list[str]:
    """Concrete changes, cheapest first, each with what it would leave on each GPU; then, if no single change
    is enough, the combination that is; last, how many GPUs with FSDP would fit the recipe as it is.

    Args:
        plan: the recipe's plan on `gpus` devices with `device_memory` bytes each, `sharded` or not.
        replan: plans another recipe (or device count) on the same model and devices.
    """
    def replan_here(changed: Recipe) -> Plan:
        return replan(changed, gpus, sharded)

    training, data = recipe.training, recipe.data
    if plan.fits:  # it fits only because the paged optimizer spills its state to CPU RAM
        line = (
            f"fits by paging up to {format_bytes(plan.total_bytes - device_memory)} of optimizer state to CPU RAM, "
            "which slows each optimizer step"
        )
        if training.optimizer != "paged_adamw_8bit":
            eight = replan_here(with_change(recipe, "training", "optimizer", "paged_adamw_8bit"))
            if eight.total_bytes <= device_memory:
                line += (
                    f"; training.optimizer: paged_adamw_8bit would keep everything on the GPU "
                    f"({format_bytes(eight.total_bytes)})"
                )
        return [line]

    now = format_bytes(plan.resident_bytes)
    changes: list[str] = []
    if not training.gradient_checkpointing:
        on = replan_here(with_change(recipe, "training", "gradient_checkpointing", True))
        changes.append(
            f"turn on training.gradient_checkpointing: activations {format_bytes(plan.activation_bytes)} -> "
            f"{format_bytes(on.activation_bytes)}, per GPU {now} -> {format_bytes(on.resident_bytes)} ({_verdict(on)})"
        )
    if training.batch_size > 1:
        half = training.batch_size // 2
        smaller = replan_here(with_change(recipe, "training", "batch_size", half))
        changes.append(
            f"halve training.batch_size to {half} and double training.gradient_accumulation_steps to "
            f"{2 * training.gradient_accumulation_steps} to keep the effective batch: per GPU {now} -> "
            f"{format_bytes(smaller.resident_bytes)} ({_verdict(smaller)})"
        )
    if data.max_seq_len >= 16:
        shorter_len = data.max_seq_len // 2
        shorter = replan_here(with_change(recipe, "data", "max_seq_len", shorter_len))
        changes.append(
            f"lower data.max_seq_len to {shorter_len} (longer examples are then cut as data.truncation says): "
            f"per GPU {now} -> {format_bytes(shorter.resident_bytes)} ({_verdict(shorter)})"
        )
    if training.optimizer != "paged_adamw_8bit":
        paged = replan_here(with_change(recipe, "training", "optimizer", "paged_adamw_8bit"))
        # A paged 32-bit optimizer already moves its state off a full GPU; 8-bit state only helps the others.
        if paged.resident_bytes < plan.resident_bytes:
            changes.append(
                f"use training.optimizer: paged_adamw_8bit (8-bit state, paged to CPU RAM when the GPU is full): "
                f"per GPU {now} -> {format_bytes(paged.resident_bytes)} ({_verdict(paged)})"
            )
    if recipe.quantization.bits != 4:
        four = replan_here(with_change(recipe, "quantization", "bits", 4))
        changes.append(
            f"set quantization.bits: 4 (QLoRA): weights {format_bytes(plan.weights_bytes)} -> "
            f"{format_bytes(four.weights_bytes)}, per GPU {now} -> {format_bytes(four.resident_bytes)} ({_verdict(four)})"
        )
    if not any(line.endswith("(fits)") for line in changes):
        together = _combined_advice(recipe, gpus, sharded, replan)
        if together:
            changes.append(together)
    changes.append(_fsdp_advice(recipe, gpus, sharded, replan))
    return changes


def _combined_advice(recipe: Recipe, gpus: int, sharded: bool, replan: Replan) -> str | None:
    """When no single change is enough: the changes above applied together, in their order, stopping at the
    first combination that fits (batch size and sequence length halved as often as needed)."""
    steps: list[tuple[str, str, Any, str]] = [
        ("training", "gradient_checkpointing", True, "gradient checkpointing on"),
        ("training", "optimizer", "paged_adamw_8bit", "paged_adamw_8bit"),
        ("quantization", "bits", 4, "4-bit"),
    ]
    batch, seq = recipe.training.batch_size, recipe.data.max_seq_len
    while batch > 1:
        batch //= 2
        steps.append(("training", "batch_size", batch, f"batch_size {batch}"))
    while seq >= 128:
        seq //= 2
        steps.append(("data", "max_seq_len", seq, f"max_seq_len {seq}"))
    changed, said = recipe, []
    for section, key, value, words in steps:
        if getattr(getattr(changed, section), key) == value:
            continue
        changed = with_change(changed, section, key, value)
        said.append(words)
        candidate = replan(changed, gpus, sharded)
        if candidate.fits:
            return f"together: {', '.join(said)}: {format_bytes(candidate.resident_bytes)} per GPU (fits)"
    return None


def _fsdp_advice(recipe: Recipe, gpus: int, sharded: bool, replan: Replan) -> str:
    """How many GPUs sharding the model with FSDP would need, or why no number would do."""
    first = gpus + 1 if sharded else max(gpus, 2)
    for count in range(first, MAX_FSDP_GPUS + 1):
        candidate = replan(recipe, count, True)
        if candidate.fits:
            return (
                f"use {count} GPUs with FSDP sharding (weights, adapters, gradients and optimizer state split "
                f"across them): {format_bytes(candidate.resident_bytes)} per GPU (fits)"
            )
    activations = replan(recipe, MAX_FSDP_GPUS, True).activation_bytes
    return (
        f"even {MAX_FSDP_GPUS} GPUs with FSDP would not fit: sharding does not split activations, which alone "
        f"need {format_bytes(activations)} per GPU; lower the batch size or sequence length"
    )
