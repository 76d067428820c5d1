"""The memory plan as a table for the console."""

from __future__ import annotations

from rich.table import Table

from .memory import MemoryPlan
from .sizes import format_bytes


def plan_table(plan: MemoryPlan, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    rows = [
        ("4-bit/8-bit weights (with quantization constants)", plan.quantized_weights_bytes),
        ("weights kept in float32 (embeddings, norms, head)", plan.kept_weights_bytes),
        (f"LoRA parameters ({plan.lora_parameters:,})", plan.lora_bytes),
        ("LoRA gradients", plan.gradient_bytes),
        ("optimizer states" + (" (paged: may spill to CPU RAM)" if plan.pageable_bytes else ""), plan.optimizer_bytes),
        ("activations", plan.activation_bytes),
        ("  with gradient checkpointing", plan.activation_bytes_checkpointed),
        ("  without gradient checkpointing", plan.activation_bytes_full),
        ("CUDA context and allocator overhead", plan.overhead_bytes),
    ]
    for name, count in rows:
        table.add_row(name, format_bytes(count), style="dim" if name.startswith("  ") else None)
    table.add_row("total", format_bytes(plan.total_bytes), style="bold")
    if plan.pageable_bytes:
        table.add_row("must stay on the GPU", format_bytes(plan.resident_bytes), style="bold")
    table.add_row("  of which tensors (torch.cuda.max_memory_allocated)", format_bytes(plan.allocated_bytes), style="dim")
    if plan.device_memory_bytes is not None:
        verdict = "[green]fits" if plan.fits else "[red]does not fit"
        table.add_row(f"GPU memory x {plan.gpus}" + (" (FSDP)" if plan.sharded else ""),
                      f"{format_bytes(plan.device_memory_bytes)}  {verdict}")
    for line in plan.advice:
        table.add_row(f"[yellow]{line}", "")
    return table
