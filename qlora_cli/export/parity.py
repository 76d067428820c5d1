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


def model_logits(model, batches: list[list[int]]) -> list[torch.Tensor]:
    """The float32 logits of `model` on each prompt, on the CPU, one [tokens, vocab] tensor per prompt."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids]).to(device)).logits.float().cpu()[0] for ids in batches]


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> ParityReport:
    """Max |Δlogit| and mean KL(reference || candidate) per token, over prompts given as [tokens, vocab] logits."""
    max_diff, kl_sum, tokens = 0.0, 0.0, 0
    for expected, got in zip(reference, candidate, strict=True):
        max_diff = max(max_diff, (expected - got).abs().max().item())
        # In float64: float32's own rounding of the log-probabilities gives a KL of ~1e-8 for identical
        # distributions up to the last bit, which would hide how exact a float32 merge is.
        log_p = torch.log_softmax(expected.double(), dim=-1)
        log_q = torch.log_softmax(got.double(), dim=-1)
        # KL is never negative; float rounding can make a per-token value a hair below zero.
        kl_sum += (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum().item()
        tokens += expected.shape[0]
    return ParityReport(max_abs_logit_diff=max_diff, mean_kl=kl_sum / tokens, tokens=tokens)
