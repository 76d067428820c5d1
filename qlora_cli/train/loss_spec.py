"""What the training loss computes, told without torch so that the memory planner can count it too:
which models it applies to, and how many logits it holds at once (see loss.py for the loss itself)."""

from __future__ import annotations

# Config keys of models whose logits are more than `lm_head(hidden)` (soft-capping, scaling); those train
# with their own loss.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

# Logits the chunked loss holds at once (16 MiB in float32: 85 rows of a 49k vocabulary): small enough for the
# allocator to reuse (see cpu.keep_freed_memory), large enough for an efficient matmul.
CHUNK_ELEMENTS = 2**22


def logits_are_plain(value_of) -> bool:
    """Whether a model's logits are `lm_head(hidden)` alone, given `value_of(key)` of its config."""
    return all(value_of(key) in (None, 1, 1.0) for key in LOGIT_TRANSFORM_KEYS)


def chunk_rows(vocab_size: int) -> int:
    """Positions projected onto the vocabulary at a time."""
    return max(1, CHUNK_ELEMENTS // vocab_size)
