"""ORPO (`--objective orpo`): TRL's ORPOTrainer (trl.experimental.orpo), reference-free.

With π's mean token log-probs of the pair's responses p_w, p_l (ORPO's odds need per-token
probabilities) and odds(y) = p(y) / (1 - p(y)):

  log_odds = (p_w - p_l) - (log(1 - e^{p_w}) - log(1 - e^{p_l}))      the log odds ratio
  loss     = NLL - λ · mean(log σ(log_odds))                          (Hong et al. 2024; λ = --beta, TRL's name)

NLL is the mean negative log-prob of the batch's chosen sequences' tokens, prompt AND response (TRL's
ORPO scores the whole chosen sequence, every token after the first; for a classification cloze the
question's own tokens too, which costs a second forward pass over the prompts). Logged, TRL's names:
rewards/* and logps/* (β × the mean log-probs), nll_loss, log_odds_ratio (the mean of log σ(log_odds)),
log_odds_chosen (the mean log_odds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..tasks import Task
from .cpo import reward_metrics
from .dpo.pairs import PairBatch, PairSet
from .dpo.policy import PairObjective

ORPO_METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (TRL's)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(β · log σ(log_odds) per pair, mean log σ(log_odds), mean log_odds) from mean log-probs, in fp32
    (TRL's ORPOTrainer.odds_ratio_loss)."""
    pc, pr = policy_chosen.float(), policy_rejected.float()
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    return beta * ratio, ratio.mean(), log_odds.mean()


class ORPOObjective(PairObjective):
    """ORPO over the stage's pairs, without a reference."""

    def __init__(self, cfg: RunConfig, task: Task, ps: PairSet, info: dict) -> None:
        super().__init__(cfg, task, ps, None, None, info)

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        beta = self.cfg.beta
        lp = self.policy_logps(model, batch, whole_chosen=True)
        pc, pr = lp.chosen / lp.chosen_len, lp.rejected / lp.rejected_len
        terms, log_odds_ratio, log_odds_chosen = odds_ratio_loss(pc, pr, beta)
        nll = -lp.whole_chosen_sum / lp.whole_chosen_tokens
        loss = nll - terms.mean()
        return loss, {**reward_metrics(pc.float(), pr.float(), beta), "nll_loss": nll.detach(),
                      "log_odds_ratio": log_odds_ratio.detach(), "log_odds_chosen": log_odds_chosen.detach()}

    def describe(self) -> dict:
        return {"objective": "orpo", "beta": self.cfg.beta, "logp_reduction": "mean", **self.info}
