"""The DPO loss (`--loss-type`, TRL's formulas; Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))):

  sigmoid  -log σ(βΔ)                                            (Rafailov et al. 2023; the default)
  ipo      (Δ - 1/(2β))²                                         (Azar et al. 2023)
  hinge    max(0, 1 - βΔ)                                        (SLiC)
  robust   [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε)          (Chowdhury et al. 2024; ε = --label-smoothing)

The log-probs in Δ are a response's summed token log-probs, or their mean over the response's
tokens (`--logp-reduction`; `auto` = TRL's choice: the mean for ipo, whose squared loss otherwise
grows with the response length, the sum for the others). With policy == reference every loss above
is at its starting value (ln 2 for sigmoid and robust) and all rewards are 0.

Logged metrics, TRL's names and units (summed log-probs, whatever the loss's reduction, as TRL logs
them): rewards/chosen, rewards/rejected (β times the log-ratio, batch mean), rewards/margins,
rewards/accuracies (share of pairs with chosen reward > rejected reward), logps/chosen,
logps/rejected (policy log-probs, batch mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO losses (B,) from per-pair response log-probs of shape (B,)."""
    if label_smoothing and loss_type != "robust":
        raise ValueError("label_smoothing only applies to loss_type='robust'")
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses


def dpo_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """TRL's logged DPO metrics (detached batch means); pass summed log-probs for TRL's units."""
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean per-pair DPO loss and the metrics, both from the same log-probs."""
    losses = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)
    return losses.mean(), dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
