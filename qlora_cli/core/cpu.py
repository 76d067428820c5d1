"""What training on a CPU needs from the machine: a native bfloat16 matmul, and an allocator that keeps memory
(and what a merge needs instead: one that gives it back).

Both are measured effects on a 2-core AVX512-BF16 machine, SmolLM2-135M, one 4 x 300-token step
(see scripts/bench_train.py for the whole-run figures):

- bfloat16 matmuls run at about 4x the float32 rate where the CPU has AVX512-BF16 or AMX; elsewhere
  bfloat16 is emulated and several times slower than float32.
- glibc returns every freed block above its mmap threshold to the kernel, so each activation of a
  training step (a few MiB each) is page-faulted and zeroed again on the next step: elementwise ops on
  the MLP's activations ran 3-4x slower than on reused memory, and the step 19% slower in all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

from .compat import replace_lora_dropouts

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems: blocks up to this size are served from the heap.
_MMAP_THRESHOLD_MAX = 32 * 2**20
# Freed heap memory is returned to the kernel only beyond this much at the top of the heap.
_TRIM_THRESHOLD = 4 * 2**30
# The heap grows by this much more than asked each time it must grow.
_TOP_PAD = 2**30
# return_freed_memory: blocks from this size are unmapped when freed; glibc's own trim threshold and top pad.
_RETURNED_BLOCK = 2**20
_DEFAULT_TRIM_THRESHOLD = 128 * 2**10
_DEFAULT_TOP_PAD = 128 * 2**10


def _set_allocator(settings: tuple[tuple[int, int], ...]) -> bool:
    """glibc's mallopt for each (parameter, value); False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    if not done:
        log.debug("mallopt refused the allocator settings")
    return done


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    return _set_allocator(((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))


def return_freed_memory() -> bool:
    """The opposite, for a process whose peak memory matters more than its speed (the merge): every block of
    1 MiB or more is mapped on its own and unmapped when freed, and the heap is trimmed as glibc does by default.

    glibc otherwise raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
    tensors of a few MiB come from a heap that fragments and is not given back: a float32 merge of a 1.2 B
    parameter model (scripts/measure_merge.py) peaked at 2,021 MiB resident that way, and at 1,735 MiB with this.
    """
    return _set_allocator(((_M_MMAP_THRESHOLD, _RETURNED_BLOCK), (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD), (_M_TOP_PAD, _DEFAULT_TOP_PAD)))


# Dropout masks from 15 random bits per element, four elements per 64-bit draw of torch's generator.
_MASK_BITS = 15
_MASK_LEVELS = 2**_MASK_BITS


def cheap_dropout(x, p: float):
    """Inverted dropout whose mask costs a quarter of the random draws of `torch.nn.functional.dropout`.

    Each element is kept with probability 1 - round(p * 2**15) / 2**15 (p to within 2e-5) and scaled by
    the inverse of that probability, so the expectation is exact. The bits come from torch's default
    generator, so seeds and saved RNG states reproduce the masks. On a 2-core CPU, for a 1200 x 576
    activation, torch's dropout takes 2.8 ms (a generator draw per element) and this 1.0 ms.
    """
    threshold = round(p * _MASK_LEVELS)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
    # random_() fills [0, 2**63): the top bit of each draw is always 0, so use the low 15 bits of each quarter.
    bits = draws.view(torch.int16)[: x.numel()].view(x.shape).bitwise_and_(_MASK_LEVELS - 1)
    keep = bits >= threshold
    return x * keep * (_MASK_LEVELS / (_MASK_LEVELS - threshold))


class CheapDropout(torch.nn.Dropout):
    """`torch.nn.Dropout` with `cheap_dropout`'s mask for CPU tensors in training."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return cheap_dropout(x, self.p)


def use_cheap_lora_dropout(model) -> int:
    """Give every LoRA layer's dropout the cheap mask above; returns how many were replaced."""
    def cheap(dropout):
        return CheapDropout(dropout.p) if type(dropout) is torch.nn.Dropout and dropout.p > 0 else None

    return replace_lora_dropouts(model, cheap)
