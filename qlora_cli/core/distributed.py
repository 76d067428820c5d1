"""Running on torch distributed: launching under torchrun, who is rank 0, and the few collectives the
run needs. The Trainer (through accelerate) does the data-parallel training itself."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine: its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def sum_over_ranks(values: list[int]) -> list[int]:
    """Each value summed over all ranks (the values themselves when not distributed)."""
    if not _initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `qlora <argv>` in `nproc` processes on this machine with torchrun; returns its exit code.

    Equivalent to `torchrun --standalone --nproc_per_node N -m qlora_cli <argv>`; for several machines run
    torchrun yourself with its rendezvous options (--nnodes, --node_rank, --rdzv_endpoint).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "qlora_cli", *argv]
    return subprocess.call(command)
