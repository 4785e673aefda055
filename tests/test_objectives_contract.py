"""Contracts of the reference-free objectives that mutmut's survivors showed untested (`make mutate`).

test_objectives.py holds each objective equal to TRL's trainer on a tiny random model, whose
probabilities are all ~1/vocab: there ORPO's log odds ratio is its log-probability ratio to 1e-4,
so its odds term (log(1 - p)) went unchecked. Oracles: TRL's ORPOTrainer.odds_ratio_loss and log1mexp
on log-probs where p is large, and mpmath at 50 digits.
"""

from types import SimpleNamespace

import pytest
import torch

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
