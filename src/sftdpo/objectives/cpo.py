"""CPO and SimPO (`--objective cpo | simpo`): TRL's CPOTrainer (trl.experimental.cpo), reference-free.

No reference model: the stage builds its pairs as DPO does (objectives/dpo/pairs.py) and never builds
or caches a reference; DPO-only with them trains from the pretrained model with nothing but the pairs.
With π's log-probs of the pair's responses p_w, p_l (TRL's units: sums for sigmoid and hinge, means
over the response tokens for ipo and simpo) and z = p_w - p_l:

  cpo sigmoid   -(1-ε) log σ(βz) - ε log σ(-βz)           CPO's preference term (Xu et al. 2024; ε = --label-smoothing)
  cpo hinge     max(0, 1 - βz)
  cpo ipo       (z - 1/(2β))²
  simpo         the sigmoid form on z - γ/β               SimPO (Meng et al. 2024; γ = --simpo-gamma)

loss = mean(preference term) + cpo_alpha × NLL, NLL the mean negative log-prob of the batch's chosen
response tokens (CPO's behaviour-cloning term; `--cpo-alpha`, TRL's default 1.0 for cpo, 0 for simpo:
SimPO has none, CPO-SimPO is simpo with --cpo-alpha > 0). Logged, TRL's names and units:
rewards/chosen, rewards/rejected (β × p), rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected, nll_loss (0 when cpo_alpha is 0, as TRL, which then does not compute it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..tasks import Task
from .dpo.pairs import PairBatch, PairSet
from .dpo.policy import PairObjective

CPO_METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected", "nll_loss")


def cpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> torch.Tensor:
    """Per-pair CPO/SimPO preference terms (P,) from the policy's log-probs (TRL's CPOTrainer.cpo_loss)."""
    logits = policy_chosen - policy_rejected
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown CPO loss type {loss_type!r}")


def reward_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The reference-free trainers' (CPO, ORPO) logged rewards: β × the policy's log-probs, batch means."""
    chosen_rewards, rejected_rewards = beta * policy_chosen.detach(), beta * policy_rejected.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


class CPOObjective(PairObjective):
    """CPO or SimPO over the stage's pairs, without a reference."""

    def __init__(self, cfg: RunConfig, task: Task, ps: PairSet, info: dict) -> None:
        super().__init__(cfg, task, ps, None, None, info)
        self.loss_type = "simpo" if cfg.objective == "simpo" else cfg.loss_type
        self.cpo_alpha = cfg.cpo_alpha if cfg.cpo_alpha is not None else (0.0 if cfg.objective == "simpo" else 1.0)
        self.average = self.loss_type in ("ipo", "simpo")  # TRL's average_log_prob

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        lp = self.policy_logps(model, batch)
        sums, means = (lp.chosen, lp.rejected), (lp.chosen / lp.chosen_len, lp.rejected / lp.rejected_len)
        trl = means if self.average else sums  # TRL's units (the logged metrics)
        pc, pr = {"auto": trl, "sum": sums, "mean": means}[cfg.logp_reduction]
        losses = cpo_losses(pc, pr, cfg.beta, self.loss_type, cfg.label_smoothing, cfg.simpo_gamma)
        if self.cpo_alpha:  # the mean over the batch's chosen response tokens
            nll = -lp.chosen_plain.sum() / lp.chosen_len.sum()
        else:
            nll = torch.zeros((), device=pc.device)
        loss = losses.mean() + self.cpo_alpha * nll
        return loss, {**reward_metrics(*trl, cfg.beta), "nll_loss": nll.detach()}

    def describe(self) -> dict:
        cfg = self.cfg
        return {"objective": cfg.objective, "loss_type": self.loss_type, "beta": cfg.beta, "cpo_alpha": self.cpo_alpha,
                "simpo_gamma": cfg.simpo_gamma if self.loss_type == "simpo" else None,
                "label_smoothing": cfg.label_smoothing, "logp_reduction": cfg.loss_logp_reduction, **self.info}
