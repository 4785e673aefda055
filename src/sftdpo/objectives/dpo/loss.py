"""The DPO losses (`--loss-type`): every loss type of TRL 1.16's DPOTrainer, alone or several weighted
(`--loss-weights`, TRL's multi-loss form), its f-divergences, LD-DPO and WPO weighting, and its logged
metrics. TRL's own formulas, term for term (tests/test_objectives.py holds each equal to
DPOTrainer._compute_loss on the same batch).

Per pair, the log-ratios r_w = log π(y_w) - log π_ref(y_w) and r_l = log π(y_l) - log π_ref(y_l) (summed
token log-probs); the scores s_w, s_l are the log-ratios (`--f-divergence-type reverse_kl`, DPO) or their
f-DPO transform f'(π/π_ref); Δ = s_w - s_l; |y| a response's token count:

  sigmoid       -log σ(βΔ)                                           DPO (Rafailov et al. 2023); the default
  hinge         max(0, 1 - βΔ)                                       SLiC
  ipo           (s_w/|y_w| - s_l/|y_l| - 1/(2β))²                    IPO (Azar et al. 2023), TRL's length normalisation
  exo_pair      σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)   EXO (ε = --label-smoothing > 0)
  nca_pair      -log σ(βr_w) - ½ log σ(-βr_w) - ½ log σ(-βr_l)      NCA
  robust        [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε)           rDPO (Chowdhury et al. 2024; ε = --label-smoothing)
  bco_pair      -log σ(βr_w) - log σ(-βr_l)                          BCO, paired
  sppo_hard     (r_w - 1/(2β))² + (r_l + 1/(2β))²                    SPPO with hard labels
  aot           -(1-ε) log σ(βd) - ε log σ(-βd), d = sort(policy log π(y_w)-log π(y_l)) - sort(reference's), over the batch
  aot_unpaired  the same with d = sort(r_w) - sort(r_l) over the batch       AOT
  apo_zero      1 - σ(βr_w) + σ(βr_l)                                APO-zero
  apo_down      σ(βr_w) + 1 - σ(β(r_w - r_l))                        APO-down
  discopop      -log σ(βΔ)(1 - σ(βΔ/τ)) + exp(-βΔ) σ(βΔ/τ)           DiscoPOP (τ = --discopop-tau)
  sft           -(mean log π of the batch's chosen response tokens)  an SFT term on the chosen responses
  sigmoid_norm  -log σ(β(s_w/|y_w| - s_l/|y_l|))                     length-normalised sigmoid

Several loss types: Σ_k weight_k × mean(loss_k). `--use-weighting` (WPO) multiplies each per-pair loss
by w_w·w_l, w = exp(mean over the response's tokens of log p(y_t) - log Σ_v p(v)²) under the policy,
without gradient. `--ld-alpha` (LD-DPO) replaces every summed log-prob (policy and reference) by the sum
over the first min(|y_w|, |y_l|) response tokens plus ld_alpha × the sum over the rest.

With policy == reference every log-ratio is 0: sigmoid and robust start at ln 2, all rewards at 0.

Logged metrics, TRL's names and units (summed log-probs, LD-weighted with --ld-alpha, whatever
--logp-reduction the loss uses): rewards/chosen, rewards/rejected (β × the log-ratio, batch mean),
rewards/margins, rewards/accuracies (share of pairs whose chosen reward is above the rejected's),
logps/chosen, logps/rejected (policy log-probs, batch mean).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
# the loss types that divide each response's score by its length (TRL's ipo and sigmoid_norm)
LENGTH_NORMALISED = ("ipo", "sigmoid_norm")
SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")  # the loss types that read label_smoothing


def f_scores(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, f_divergence_type: str = "reverse_kl",
             alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_w, s_l): the log-ratios under f-DPO's f'(t), t = π/π_ref (TRL's f_divergence_type)."""
    if f_divergence_type == "reverse_kl":  # f'(t) = log t: plain DPO
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(α-1) - 1) / (α-1); α = 1: log t
        if abs(alpha - 1.0) < 1e-6:
            return chosen_logratios, rejected_logratios
        out = []
        for lr in (chosen_logratios, rejected_logratios):
            t = (alpha - 1.0) * lr
            clamp = {torch.float16: 11.0}.get(t.dtype, 80.0)  # exp(.) stays representable (TRL's bounds)
            out.append((torch.exp(torch.clamp(t.float(), max=clamp)) - 1.0).to(t.dtype) / (alpha - 1.0))
        return out[0], out[1]
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
               chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
               sft_logps: torch.Tensor | None = None, sft_tokens: torch.Tensor | None = None,
               f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
               discopop_tau: float = 0.05) -> torch.Tensor:
    """Per-pair losses (P,) of one DPO loss type from per-pair response log-probs (P,). `chosen_len` and
    `rejected_len`: what ipo and sigmoid_norm divide the scores by (None: 1, the scores as given);
    `sft_logps`/`sft_tokens`: the chosen responses' plain summed token log-probs and token counts that
    the sft term averages (default: policy_chosen over chosen_len)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    chosen_scores, rejected_scores = f_scores(chosen_logratios, rejected_logratios, f_divergence_type,
                                              f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores
    eps = label_smoothing
    if loss_type in LENGTH_NORMALISED:
        nc = 1.0 if chosen_len is None else chosen_len.clamp(min=1.0)
        nr = 1.0 if rejected_len is None else rejected_len.clamp(min=1.0)
        delta = chosen_scores / nc - rejected_scores / nr
    if loss_type in ("sigmoid", "sigmoid_norm"):  # sigmoid_norm: delta of the length-normalised scores (above)
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":  # KL(softmax over {w, l} of β·scores || (1-ε, ε)), EXO's Eq. 16
        e = torch.tensor(eps, device=delta.device)
        losses = (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-e))
                  + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(e)))
    elif loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type in ("aot", "aot_unpaired"):  # optimal transport: sorted over the batch
        if loss_type == "aot":
            d = (torch.sort(policy_chosen - policy_rejected, dim=0)[0]
                 - torch.sort(ref_chosen - ref_rejected, dim=0)[0])
        else:
            d = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "discopop":
        logits = beta * delta
        mix = torch.sigmoid(logits / discopop_tau)
        losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    elif loss_type == "sft":  # one batch-level term: the mean over all the batch's chosen tokens
        lp = policy_chosen if sft_logps is None else sft_logps
        n = (torch.ones_like(lp) if chosen_len is None else chosen_len) if sft_tokens is None else sft_tokens
        losses = (-lp.sum() / n.sum()).expand(lp.size(0))
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


def combined_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float, loss_types: list[str] | str = "sigmoid",
                  label_smoothing: float = 0.0, *, loss_weights: list[float] | tuple[float, ...] | None = None,
                  weights: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """TRL's DPO loss: Σ_k weight_k × mean over pairs of loss_k (× the WPO pair `weights` when given)."""
    types = loss_types.split(",") if isinstance(loss_types, str) else list(loss_types)
    if label_smoothing and not any(t in SMOOTHED for t in types):
        raise ValueError(f"label_smoothing applies to the loss types {', '.join(SMOOTHED)}, not {types}")
    loss_weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(loss_weights) != len(types):
        raise ValueError(f"{len(loss_weights)} loss weights for {len(types)} loss types")
    total = 0.0
    for loss_type, w in zip(types, loss_weights):
        losses = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, **kw)
        if weights is not None:
            losses = losses * weights
        total = total + losses.mean() * w
    return total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: list[str] | str = "sigmoid",
             label_smoothing: float = 0.0, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (combined_loss: one loss type or several) and the metrics, both from the same log-probs."""
    loss = combined_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, **kw)
    return loss, dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def ld_weights(rows: torch.Tensor, n_rows: int, shared_len: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's weight of each response token: 1 for a row's first `shared_len[row]` response tokens,
    ld_alpha after them. `rows`: the row of each token, tokens in row-major order (target_logprobs')."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(rows.numel(), device=rows.device) - starts[rows]  # 0-based, within the response
    one = torch.ones((), device=rows.device)
    return torch.where(position < shared_len.to(rows.device)[rows], one, one * ld_alpha)
