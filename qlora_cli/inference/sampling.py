"""How answers are sampled, with the QLoRA paper's defaults for benchmark answers: nucleus 0.9, temperature 0.7.

Imports nothing heavy: the command line reads its defaults from here without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for generated answers; a temperature of 0 is greedy, and the seed fixes the draws."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0


DEFAULT_SAMPLING = Sampling()
