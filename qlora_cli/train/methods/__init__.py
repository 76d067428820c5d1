"""Training methods: what differs between supervised fine-tuning and preference tuning, one module per method.

A method owns what is specific to it, and nothing else (see `base.TrainingMethod` for the contract):
  - its row formats and the example type they become (read and checked before any model loads);
  - tokenization with labels, and what besides the examples decides it (the tokenization cache's `cache_tag`);
  - the collator that batches its rows, and each row's length (length grouping, padding estimates);
  - the loss, and the metrics it logs besides the loss;
  - what `qlora data preview` shows of a row, and the prompts a merge is checked on;
  - its term in the memory plan (`COSTS` below, torch-free so that `qlora plan` imports no torch).
The run itself (setup, fit, finish, the run directory, checkpoints, signals, resume, DDP, progress) is shared:
train/run.py asks the method for these and knows nothing else of it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import TrainingMethod

# The module of each method, by the name `training.method` gives it.
MODULES = {"sft": "sft", "dpo": "dpo", "orpo": "orpo", "kto": "kto"}
METHOD_NAMES = tuple(MODULES)


@dataclass(frozen=True)
class MethodCost:
    """What one example costs a training step, for the memory plan.

    Attributes:
        sequences: sequences of up to `data.max_seq_len` tokens each example runs forward and backward
            (a preference pair runs two).
        reference_sequences: sequences it runs forward without gradients through a reference model (the same
            base with the adapter off: no second copy of the weights, only that pass's transient activations).
    """

    sequences: int = 1
    reference_sequences: int = 0


COSTS = {
    "sft": MethodCost(sequences=1),
    # A pair trains its chosen and its rejected answer, and scores both through the reference.
    "dpo": MethodCost(sequences=2, reference_sequences=2),
    "orpo": MethodCost(sequences=2),
    # An answer, and the mismatched answer its KL estimate scores through the trained model and the reference.
    "kto": MethodCost(sequences=1, reference_sequences=3),
}


def load_method(name: str, recipe=None) -> "TrainingMethod":
    """A fresh instance of the method `name` (one of METHOD_NAMES), for one run of `recipe` (whose settings a
    method reads; None: its defaults, enough to read and tokenize data)."""
    module = importlib.import_module(f".{MODULES[name]}", __name__)
    return module.Method(recipe)
