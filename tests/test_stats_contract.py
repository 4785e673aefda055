"""stats.py contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles are scipy/scikit-learn/sacreBLEU or closed forms (the bootstrap distribution of a one-example
difference is Binomial(n, 1/n) / n), never this module's own arithmetic.
"""

import numpy as np
import pytest
from scipy.stats import binom
from scipy.stats import t as student_t
from sklearn.metrics import f1_score

from sftdpo.config import SftdpoError
from sftdpo.stats import _resample_sums, corpus_chrf, f1_positive, holm, paired_bootstrap, t_interval


def triples(preds, refs, prefix="e"):
    return [(f"{prefix}{i}", str(p), str(r)) for i, (p, r) in enumerate(zip(preds, refs))]


def assert_fast_path_equals_sklearn(metric, a, b, ref, n_boot, seed):
    """The bootstrap's confusion-count path for `metric` equals scikit-learn's (or numpy's) metric
    recomputed on the same resamples, and its observed delta the plain difference of the two."""
    def brute(p, r):
        if metric == "accuracy":
            return float(np.mean(np.asarray(p) == np.asarray(r)))
        if metric == "macro_f1":
            return float(f1_score(r, p, average="macro", zero_division=0))
        return float(f1_score(r, p, labels=["1"], average=None, zero_division=0)[0])

    fast = paired_bootstrap(triples(a, ref), triples(b, ref), metric, n_boot=n_boot, seed=seed)
    slow = paired_bootstrap(triples(a, ref), triples(b, ref), brute, n_boot=n_boot, seed=seed)
    assert fast["delta"] == pytest.approx(brute(a, ref) - brute(b, ref))
    for k in ("delta", "p_value", "ci_lo", "ci_hi"):
        assert fast[k] == pytest.approx(slow[k], abs=1e-12), k


def test_t_interval_of_two_seeds_is_scipys():
    """Two seeds are the smallest study the report gives an interval for; catches a size check
    of `<= 2` or `< 3` that refuses them."""
    lo, hi = student_t.interval(0.95, 1, loc=1.5, scale=np.std([1.0, 2.0], ddof=1) / np.sqrt(2))
    mean, _, got_lo, got_hi = t_interval([1.0, 2.0])
    assert mean == 1.5 and (got_lo, got_hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))


def test_holm_is_clipped_at_one():
    """Catches an adjusted p-value above 1 (the clip at 1.0 changed): 2 x 0.6 = 1.2 must read 1."""
    assert holm([0.6, 0.9]) == [1.0, 1.0]
    assert holm([0.4, 0.5, 0.45]) == [1.0, 1.0, 1.0]  # 3 x 0.4 = 1.2, then kept monotone


def test_f1_positive_is_zero_when_the_positive_class_never_occurs():
    """The docstring's promise (0.0, not 1.0, when "1" is neither predicted nor present): catches
    zero_division=1."""
    assert f1_positive(["0", "0"], ["0", "0"]) == 0.0


def test_one_example_difference_has_the_binomial_bootstrap_distribution():
    """A beats B on one example of n, ties elsewhere: a resample's accuracy delta is K/n with
    K ~ Binomial(n, 1/n), so p = 2 P(K = 0) = 2 (1 - 1/n)^n and the 97.5% quantile is that of K.
    Catches a p-value that is not twice the one-sided share (3x, 1x), and an interval taken from
    the wrong quantiles."""
    n = 10
    ref = [1] * n
    a = [1] * n
    b = [1] * (n - 1) + [0]
    res = paired_bootstrap(triples(a, ref), triples(b, ref), "accuracy", n_boot=4000, seed=1)
    p0 = binom.pmf(0, n, 1 / n)
    sd = 2 * np.sqrt(p0 * (1 - p0) / 4000)
    assert res["delta"] == pytest.approx(1 / n)
    assert abs(res["p_value"] - 2 * p0) < 5 * sd
    assert res["ci_lo"] == 0.0 and res["ci_hi"] == pytest.approx(binom.ppf(0.975, n, 1 / n) / n)


def test_default_bootstrap_is_seed_zero_with_1000_resamples():
    """A report's p-values must not move between versions: catches a changed default seed or
    resample count (A and B differ on five of 60 examples, so p is a Monte Carlo share that moves
    with either)."""
    ref = [i % 2 for i in range(60)]
    a = [1 - r if i in (0, 1) else r for i, r in enumerate(ref)]
    b = [1 - r if i in (2, 3, 4) else r for i, r in enumerate(ref)]
    oa, ob = triples(a, ref), triples(b, ref)
    default = paired_bootstrap(oa, ob, "accuracy")
    assert default == paired_bootstrap(oa, ob, "accuracy", n_boot=1000, seed=0)
    assert default["p_value"] != paired_bootstrap(oa, ob, "accuracy", n_boot=1000, seed=1)["p_value"]
    assert default["p_value"] != paired_bootstrap(oa, ob, "accuracy", n_boot=1001, seed=0)["p_value"]


@pytest.mark.parametrize("metric", ["macro_f1", "f1_positive", "accuracy"])
def test_rare_and_one_sided_labels_equal_sklearn_per_resample(metric):
    """Labels that only one system predicts, or that vanish from a resample, or whose F1 has a
    denominator of 1: the fast confusion-count path must equal scikit-learn's f1_score/accuracy on
    the same resamples. Catches labels collected as an intersection, absent labels scored 0 instead
    of left out (denom >= 0), a denominator of 1 treated as absent (denom > 1)."""
    ref = ["0"] * 10 + ["1"] * 9 + ["2"]
    a = ["0"] * 10 + ["1"] * 8 + ["3", "2"]   # "3" only in A
    b = ["0"] * 9 + ["4"] + ["1"] * 9 + ["0"]  # "4" only in B; B never predicts "2"

    assert_fast_path_equals_sklearn(metric, a, b, ref, n_boot=300, seed=11)


def test_f1_positive_without_a_positive_label_is_zero_for_both():
    """No "1" in predictions or references and two other labels: F1 of the positive class is 0 for
    both systems; catches the branch for an absent positive class being skipped."""
    ref = ["0", "2"] * 10
    b = ["0"] * 20
    res = paired_bootstrap(triples(ref, ref), triples(b, ref), "f1_positive", n_boot=50)
    assert res["delta"] == 0.0 and res["p_value"] == 1.0 and res["ci_lo"] == res["ci_hi"] == 0.0


def test_chrf_bootstrap_delta_is_the_corpus_difference_on_varied_segments():
    """Segments of different text (so a resample's chrF differs from the corpus's): the observed
    delta is corpus_chrf(A) - corpus_chrf(B) from sacreBLEU; catches a resample's score standing in
    for either system's observed score."""
    refs = [f"line {i}: " + "the quick brown fox jumps over the lazy dog"[i:] * (1 + i % 3) for i in range(12)]
    a = [r if i % 2 else r[: len(r) // 2] for i, r in enumerate(refs)]
    b = [r[::-1] if i % 3 else r for i, r in enumerate(refs)]
    res = paired_bootstrap(triples(a, refs), triples(b, refs), "chrf", n_boot=200)
    assert res["delta"] == pytest.approx(corpus_chrf(a, refs) - corpus_chrf(b, refs), abs=1e-9)


def test_resampling_draws_n_boot_resamples_of_n_examples_past_one_chunk():
    """Dev sets above 4000 examples are resampled in chunks: exactly n_boot resamples, each of n
    examples, however n_boot splits into chunks. Catches a last chunk that overshoots n_boot."""
    n = 5000  # chunk = 4e6 // 5000 = 800 rows: 1000 resamples are two chunks
    sums = _resample_sums(np.ones((n, 1)), 1000, np.random.default_rng(0))
    assert sums.shape == (1000, 1) and (sums[:, 0] == n).all()


def test_duplicate_ids_in_either_system_are_errors():
    """Catches a duplicate check that needs duplicates in both systems (`and` for `or`)."""
    out = triples(["1", "0"], ["1", "1"])
    with pytest.raises(SftdpoError, match="duplicate"):
        paired_bootstrap(out + out[:1], out, "accuracy")
    with pytest.raises(SftdpoError, match="duplicate"):
        paired_bootstrap(out, out + out[:1], "accuracy")


@pytest.mark.parametrize("metric", ["f1_positive", "macro_f1", "accuracy"])
def test_labels_only_one_system_predicts_on_either_side_of_the_positive_label(metric):
    """A label only A predicts sorts before "1" ("00") and one only B predicts sorts after it ("9"):
    both systems must be scored over the same label list, or B's positive-class F1 is read from
    another label's cell. Catches the shared labels collected as (A ∩ B) ∪ references."""
    ref = ["0"] * 8 + ["1"] * 8
    a = ["0"] * 6 + ["00", "1"] + ["1"] * 6 + ["0", "0"]
    b = ["0"] * 7 + ["1"] + ["1"] * 5 + ["9", "0", "1"]

    assert_fast_path_equals_sklearn(metric, a, b, ref, n_boot=200, seed=5)
