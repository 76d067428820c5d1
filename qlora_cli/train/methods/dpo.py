"""Direct Preference Optimization (Rafailov et al., 2023): the adapter learns to raise the chosen answer's
log-probability ratio to the reference above the rejected one's, with no reward model and no sampling.

The reference is the same 4-bit base with the adapter off (or the run's starting adapter, frozen): see
preference.py. Loss variants, by `preference.loss`, as TRL computes them:
  - `sigmoid`: -log σ(β·Δ), Δ = (log π/π_ref)(chosen) - (log π/π_ref)(rejected); with `label_smoothing` ε, the
    conservative DPO of a label flipped with probability ε: -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ);
  - `ipo`: (Δ̄ - 1/(2β))², Δ̄ from the log ratios averaged over each answer's tokens (Azar et al., 2023);
  - `hinge`: max(0, 1 - β·Δ) (SLiC);
  - `robust`: the unbiased loss under label noise ε (Chowdhury et al., 2024).
Metrics, with TRL's names: rewards/chosen and rewards/rejected (β times the log ratios), rewards/accuracies (the
share of pairs whose chosen reward is the higher), rewards/margins, logps/chosen and logps/rejected (summed over
each answer's tokens, under the trained model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .preference import PreferenceMethod

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, loss: str,
               label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each pair, from the log ratios log π/π_ref of its answers (summed over their tokens)."""
    delta = chosen_logratios - rejected_logratios
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss == "ipo":
        average = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (average - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    if loss == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss {loss!r}")


def pair_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


class Method(PreferenceMethod):
    name = "dpo"
    metric_names = PAIR_METRICS

    def compute_loss(self, trainer, model, inputs, num_items_in_batch):
        settings = self.settings
        policy, reference, counts = self.policy_and_reference_logps(trainer, model, inputs)
        chosen_logps, rejected_logps = policy.chunk(2)
        chosen_ref, rejected_ref = reference.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        chosen_logratios, rejected_logratios = chosen_logps - chosen_ref, rejected_logps - rejected_ref
        losses = dpo_losses(chosen_logratios, rejected_logratios, settings.beta, settings.loss,
                            settings.label_smoothing, chosen_tokens, rejected_tokens)
        trainer.record_metrics(pair_metrics(chosen_logps, rejected_logps, settings.beta * chosen_logratios,
                                            settings.beta * rejected_logratios))
        return losses.mean(), {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}
