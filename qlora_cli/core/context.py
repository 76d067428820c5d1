"""Where and how this process computes, decided once per run: the device, the compute dtype, and its place
in a distributed run. Every stage reads these from the `RunContext` instead of asking again."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compat import cpu_has_native_bfloat16
from .distributed import local_rank, rank, world_size
from .errors import UserError


def detect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def choose_compute_dtype(setting: str, device: str) -> DtypeChoice:
    """The compute dtype for `quantization.compute_dtype` on this device.

    Raises:
        UserError: float16 on CPU, which has no float16 matmul kernels worth using.
    """
    if setting == "auto":
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return DtypeChoice(torch.bfloat16, "auto: this GPU supports bfloat16")
            return DtypeChoice(torch.float16, "auto: this GPU has no bfloat16, using float16")
        if cpu_has_native_bfloat16():
            return DtypeChoice(torch.bfloat16, "auto: this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)")
        return DtypeChoice(torch.float32, "auto: float32 on a CPU without native bfloat16, where bfloat16 is emulated and slow")
    dtype = getattr(torch, setting)
    if device == "cpu" and dtype == torch.float16:
        raise UserError("quantization.compute_dtype: float16 is not supported on CPU; use float32 or auto")
    return DtypeChoice(dtype, f"set in the recipe ({setting})")


@dataclass(frozen=True)
class RunContext:
    """Attributes:
        device: "cuda" or "cpu".
        compute_dtype: what 4-bit weights are dequantized to and autocast computes in.
        dtype_reason: why that dtype, for the user.
        rank, local_rank, world_size: this process in a torchrun/accelerate launch (0, 0, 1 alone).
        sharded: FSDP shards the model over the processes (`training.distributed: fsdp` with several).
    """

    device: str
    compute_dtype: torch.dtype
    dtype_reason: str = ""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    sharded: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, logs, progress and plots; the other ranks only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")

    @property
    def device_map(self) -> dict:
        """The whole model on one device: this process's own GPU, or the CPU."""
        return {"": self.local_rank if self.device == "cuda" else "cpu"}


def run_context(compute_dtype: str, distributed: str, *, processes: int | None = None) -> RunContext:
    """The context of a training process, from `quantization.compute_dtype` and `training.distributed`.

    Args:
        processes: the world size to plan for (before launching); default, this process's own.

    Raises:
        UserError: FSDP on CPU, where accelerate would silently replicate instead of sharding; float16 on CPU.
    """
    device = detect_device()
    if distributed == "fsdp" and device == "cpu":
        raise UserError("training.distributed: fsdp needs GPUs (accelerate shards only on accelerators); on CPU use ddp")
    processes = world_size() if processes is None else processes
    choice = choose_compute_dtype(compute_dtype, device)
    return RunContext(device, choice.dtype, choice.reason, rank(), local_rank(), processes,
                      sharded=distributed == "fsdp" and processes > 1)


def inference_context(compute_dtype: str = "auto") -> RunContext:
    """The context of a process that loads a model to generate, merge or evaluate, on this process's device."""
    device = detect_device()
    choice = choose_compute_dtype(compute_dtype, device)
    return RunContext(device, choice.dtype, choice.reason, rank(), local_rank(), 1)
