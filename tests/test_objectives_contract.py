"""Contracts of the reference-free objectives that mutmut's survivors showed untested (`make mutate`).

test_objectives.py holds each objective equal to TRL's trainer on a tiny random model, whose
probabilities are all ~1/vocab: there ORPO's log odds ratio is its log-probability ratio to 1e-4,
so its odds term (log(1 - p)) went unchecked. Oracles: TRL's ORPOTrainer.odds_ratio_loss and log1mexp
on log-probs where p is large, mpmath at 50 digits, and CPOTrainer.cpo_loss with CPOConfig's defaults.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from sftdpo.objectives.cpo import cpo_losses
from sftdpo.objectives.orpo import log1mexp, odds_ratio_loss

trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

# mean token log-probs of a confident model (p from 0.37 to 0.9999) and of an unsure one
XS = [-30.0, -8.0, -1.0, -0.7, -0.6931, -0.69, -0.5, -0.1, -1e-2, -1e-4, -1e-6]


def test_log1mexp_is_log_one_minus_p_to_float32_precision_on_both_sides_of_ln2():
    """log(1 - e^x) in float32 within 4 ulps (relative) of mpmath at 50 digits, for p = e^x from 1e-13 to
    1 - 1e-6, and TRL's log1mexp. Catches a sign flipped inside either branch (log(1 + p), or the log
    of a negative number) and the branches swapped or the switch point moved to where one loses
    precision (log1p(-e^x) near x = 0 cancels catastrophically; log(-expm1(x)) for x << 0 rounds to 0)."""
    mpmath = pytest.importorskip("mpmath")  # sympy's, a torch dependency
    mpmath.mp.dps = 50
    x = torch.tensor(XS, dtype=torch.float32)
    got = log1mexp(x)
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(float(v))))) for v in x], dtype=torch.float64)
    ulps = 4 * torch.finfo(torch.float32).eps
    assert torch.allclose(got.double(), want, rtol=ulps, atol=0.0)
    assert torch.allclose(got, trl_orpo.log1mexp(x), rtol=ulps, atol=0.0)


def test_odds_ratio_loss_equals_trls_where_the_odds_differ_from_the_probabilities():
    """β · log σ(log odds ratio) per pair, its mean and the mean log odds equal ORPOTrainer's
    odds_ratio_loss on pairs whose chosen or rejected response is likely (p up to 0.99), where
    log(1 - p) is far from 0. Catches the log(1 - p) terms added instead of subtracted, or each
    other's sign flipped (a log-probability ratio instead of an odds ratio)."""
    pc = torch.tensor([-0.05, -0.3, -1.2, -0.01, -2.0])
    pr = torch.tensor([-0.6, -0.02, -2.5, -0.9, -0.015])
    beta = 0.3
    terms, ratio, log_odds = odds_ratio_loss(pc, pr, beta)
    me = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    want_terms, _, _, want_ratio, want_log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(me, pc, pr)
    plain = float(torch.nn.functional.logsigmoid(pc - pr).mean())  # the probability ratio alone
    assert abs(float(want_ratio) - plain) > 0.1  # the odds matter on these pairs
    eps = 4 * torch.finfo(torch.float32).eps
    assert torch.allclose(terms, want_terms, rtol=eps, atol=eps)
    assert float(ratio) == pytest.approx(float(want_ratio), rel=eps, abs=eps)
    assert float(log_odds) == pytest.approx(float(want_log_odds), rel=eps, abs=eps)


def test_cpo_losses_equal_trls_cpo_loss_with_its_defaults_and_at_a_beta_other_than_one_half():
    """cpo_losses called with its defaults equals CPOTrainer.cpo_loss under CPOConfig's own defaults (loss
    type, label smoothing, SimPO's γ), and each loss type at β = 0.3 equals it under the same settings.
    Catches another default loss type, smoothing or γ for callers that leave them out, and IPO's target
    1/(2β) written 2β (the two agree at β = ½, the β of test_objectives.py)."""
    trl_cpo = pytest.importorskip("trl.experimental.cpo")
    defaults = {f.name: f.default for f in dataclasses.fields(trl_cpo.CPOConfig)}
    pc = torch.tensor([-3.0, -8.0, -1.5, -4.0])
    pr = torch.tensor([-6.0, -5.0, -1.7, -2.5])

    def trl(beta: float, **kw) -> torch.Tensor:
        me = SimpleNamespace(alpha=0.0, beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")),
                             **{k: kw.get(k, defaults[k]) for k in ("loss_type", "label_smoothing", "simpo_gamma")})
        return trl_cpo.CPOTrainer.cpo_loss(me, pc, pr)[0]

    eps = 4 * torch.finfo(torch.float32).eps
    assert torch.allclose(cpo_losses(pc, pr, 0.3), trl(0.3), rtol=eps, atol=eps)
    assert torch.allclose(cpo_losses(pc, pr, 0.3, "simpo"), trl(0.3, loss_type="simpo"), rtol=eps, atol=eps)
    for loss_type in ("sigmoid", "hinge", "ipo", "simpo"):
        got = cpo_losses(pc, pr, 0.3, loss_type, 0.1, 0.8)
        assert torch.allclose(got, trl(0.3, loss_type=loss_type, label_smoothing=0.1, simpo_gamma=0.8), rtol=eps, atol=eps)


def test_reward_accuracy_counts_a_tie_as_not_preferred_as_trl_does():
    """rewards/accuracies is the share of pairs whose chosen reward is strictly above the rejected's (TRL's
    `chosen_rewards > rejected_rewards`): at a DPO run's first step the policy is its reference, every
    reward is 0, and TRL logs 0; under CPO a pair whose responses have the same log-prob counts as not
    preferred. Catches `>=` (1.0 logged for an untrained policy)."""
    from sftdpo.objectives.cpo import reward_metrics
    from sftdpo.objectives.dpo.loss import dpo_metrics

    pc, pr = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-2.0, -4.0, -1.5])
    assert float(dpo_metrics(pc, pr, pc, pr, 0.1)["rewards/accuracies"]) == 0.0
    assert float(reward_metrics(pc, pr, 0.1)["rewards/accuracies"]) == pytest.approx(2 / 3)
