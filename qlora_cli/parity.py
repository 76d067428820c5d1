"""How far one causal LM's next-token distributions are from another's, on the same token ids: the check
every merged or exported model passes against the model that was trained."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ParityReport:
    max_abs_logit_diff: float
    mean_kl: float  # KL(trained || merged), nats per token
    tokens: int


def parity(trained_model, merged_model, batches: list[list[int]]) -> ParityReport:
    """Max |Δlogit| and mean KL(trained || merged) per token over the prompts."""
    max_diff, kl_sum, tokens = 0.0, 0.0, 0
    trained_device = next(trained_model.parameters()).device
    with torch.no_grad():
        for ids in batches:
            tensor = torch.tensor([ids])
            reference = trained_model(input_ids=tensor.to(trained_device)).logits.float().cpu()[0]
            candidate = merged_model(input_ids=tensor).logits.float()[0]
            max_diff = max(max_diff, (reference - candidate).abs().max().item())
            log_p = torch.log_softmax(reference, dim=-1)
            log_q = torch.log_softmax(candidate, dim=-1)
            # KL is never negative; float rounding can make a per-token value a hair below zero.
            kl_sum += (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum().item()
            tokens += len(ids)
    return ParityReport(max_abs_logit_diff=max_diff, mean_kl=kl_sum / tokens, tokens=tokens)
