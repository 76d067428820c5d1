"""LoftQ's start for an adapter on a 4-bit base that is already quantized (one LoftQ iteration, as peft's
`replace_lora_weights_loftq` does): each LoRA starts as the rank-r SVD of the quantization error
W - dequant(quant(W)), so the adapted model starts nearer the original weights than the quantized base alone.

peft's own function computes on "cuda" unconditionally (peft 0.21.2, utils/loftq_utils.py `_loftq_init_new`) and
ignores the LoRA scaling, so that its start is the error times alpha / r; this one runs on the model's device and
divides the scaling out. The base weights are not changed: merging and resuming read the base as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bitsandbytes.functional import dequantize_4bit

PEFT_PREFIX = "base_model.model."


@dataclass
class LoftqResult:
    layers: int
    error_before: float  # ||W - dequant(quant(W))||_F summed over the adapted layers
    error_after: float  # ||W - (dequant(quant(W)) + scaling * B A)||_F, the same sum


def low_rank_split(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling * B @ A the best rank-`rank` approximation of `residual` (out x in), the singular
    values shared evenly between the two factors."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@torch.no_grad()
def loftq_start(model, files, adapter: str = "default") -> LoftqResult:
    """Give every LoRA on a 4-bit layer of the peft `model` LoftQ's start, from the original weights in `files`
    (export.streaming.CheckpointFiles of the base checkpoint)."""
    from peft.tuners.lora import LoraLayer

    from . import compat

    layers, before, after = 0, 0.0, 0.0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        if not compat.is_4bit_weight(base.weight):
            continue
        device = base.weight.device
        original = files.read(name.removeprefix(PEFT_PREFIX) + ".weight", torch.float32, device)
        residual = original - dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        a, b = low_rank_split(residual, module.r[adapter], module.scaling[adapter])
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        layers += 1
        before += residual.norm().item()
        after += (residual - module.scaling[adapter] * (lora_b.float() @ lora_a.float())).norm().item()
    return LoftqResult(layers, before, after)
