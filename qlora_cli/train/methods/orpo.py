"""ORPO, odds-ratio preference optimization (Hong et al., 2024): supervised fine-tuning on the chosen answer and a
preference term in one stage, with no reference model (no reference pass at all).

As TRL computes it: loss = NLL(chosen) - β · mean log σ(log odds(chosen) - log odds(rejected)), where the NLL is the
chosen answers' mean cross-entropy per token, odds(y) = p/(1-p), and p is the answer's per-token average probability
(exp of its mean log-probability); β (`preference.beta`) is the paper's λ. Metrics with TRL's names: rewards/* are β
times the mean log-probabilities, logps/* those mean log-probabilities, nll_loss, log_odds_ratio (the mean
log σ term) and log_odds_chosen (the mean log odds ratio).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dpo import PAIR_METRICS, pair_metrics
from .preference import PreferenceMethod, sequence_logps
from ...core import compat


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_terms(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log σ(log odds ratio), log odds ratio) of each pair, from its answers' mean log-probabilities per token."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds), log_odds


class Method(PreferenceMethod):
    name = "orpo"
    metric_names = (*PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")

    def compute_loss(self, trainer, model, inputs, num_items_in_batch):
        compat.loss_is_a_mean_per_micro_batch(trainer)
        beta = self.settings.beta
        sums, counts = sequence_logps(model, self.head, inputs)
        chosen_sums, _ = sums.chunk(2)
        chosen_counts, _ = counts.chunk(2)
        means = sums / counts.clamp(min=1)
        chosen_means, rejected_means = means.chunk(2)
        nll = -chosen_sums.sum() / chosen_counts.sum().clamp(min=1)
        ratio, log_odds = odds_ratio_terms(chosen_means, rejected_means)
        loss = nll - beta * ratio.mean()
        metrics = pair_metrics(chosen_means, rejected_means, beta * chosen_means, beta * rejected_means)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                        "log_odds_chosen": log_odds.detach().mean()})
        trainer.record_metrics(metrics)
        return loss, {"chosen_logps": chosen_means, "rejected_logps": rejected_means}
