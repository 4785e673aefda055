"""stats.py contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles are scipy/scikit-learn/sacreBLEU or closed forms (the bootstrap distribution of a one-example
difference is Binomial(n, 1/n) / n), never this module's own arithmetic.
"""

import numpy as np
import pytest
from scipy.stats import binom, norm, ttest_1samp
from statsmodels.stats.power import TTestPower
from scipy.stats import t as student_t
from sklearn.metrics import f1_score

from sftdpo.config import SftdpoError
from sftdpo.stats import (_resample_sums, claim_test, corpus_chrf, f1_positive, holm, mde_normal, mde_t, normal_p,
                          paired_bootstrap, per_class_f1, reading, seeds_bootstrap, t_interval, t_p)


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


# -- the claims' tests: one-sided directions, degenerate p-values, readings ----------------------------

def test_one_sided_p_values_point_the_way_each_kind_claims():
    """p_support is the one-sided t-test towards the claim (scipy's ttest_1samp at the kind's point:
    "less" for no-greater-than, "greater" for the others), p_contradict the other side. Catches a
    no-greater-than claim tested as if it were "greater" (the two-sided p is the same either way, so
    only the one-sided values tell)."""
    eff = [0.1, 0.3, -0.2, 0.2]
    for kind, margin, point, towards, away in (("greater", 0.0, 0.0, "greater", "less"),
                                               ("no-greater-than", 0.5, 0.5, "less", "greater"),
                                               ("no-less-than", 0.5, -0.5, "greater", "less")):
        t = claim_test(kind, margin, float(np.mean(eff)), eff)
        assert t["p_support"] == pytest.approx(ttest_1samp(eff, point, alternative=towards).pvalue, rel=1e-12), kind
        assert t["p_contradict"] == pytest.approx(ttest_1samp(eff, point, alternative=away).pvalue, rel=1e-12), kind
    assert claim_test("equivalent", 0.5, 0.1, eff)["point"] == 0.0  # the centre of the +-margin band
    # an effect far below the no-greater-than margin supports it
    assert reading(claim_test("no-greater-than", 0.5, -1.0, [-1.0, -1.1, -0.9, -1.05])) == "supports"


def test_effects_without_spread_have_the_limit_p_values():
    """Per-pair effects that are all equal (t infinite) or a zero standard error: p is 0 on the side the
    effect lies (strictly), 1 otherwise and at the point itself; two or more values are enough. Catches
    a flipped or shifted comparison (>= 0, > 1, < 1), the effect measured from -point, the "two-sided"
    case lost, a spread test other than exactly zero, and a size check that refuses two seeds."""
    for diff, greater, less, two in ((0.5, 0.0, 1.0, 0.0), (-0.5, 1.0, 0.0, 0.0), (0.0, 1.0, 1.0, 1.0),
                                     (1.0, 0.0, 1.0, 0.0)):
        for point in (0.0, 1.0):
            v = [point + diff] * 3
            assert [t_p(v, point, a) for a in ("greater", "less", "two-sided")] == [greater, less, two], (diff, point)
            assert [normal_p(point + diff, 0.0, point, a) for a in ("greater", "less", "two-sided")] == [greater, less, two]
    for v in ([0.0, 1.0, 0.5], [0.1, 0.3]):  # a spread of exactly 1; two values
        for a in ("greater", "less", "two-sided"):
            assert t_p(v, 0.0, a) == pytest.approx(ttest_1samp(v, 0.0, alternative=a).pvalue, rel=1e-12), (v, a)


def _test(kind, p_support, p_contradict, decides=True):
    p = p_support if kind == "equivalent" else min(1.0, 2 * min(p_support, p_contradict))
    return {"kind": kind, "decides": decides, "p_support": p_support, "p_contradict": p_contradict, "p": p}


@pytest.mark.parametrize("kind", ["greater", "no-greater-than", "no-less-than"])
def test_reading_of_a_directional_comparison(kind):
    """A directional comparison supports or contradicts only when its two-sided p is below alpha (strictly:
    p = alpha is not significant), and then in the direction of the smaller one-sided p; fewer than three
    pairs give no verdict. Catches the alpha boundary moved, the direction swapped, and a constant word."""
    assert reading(_test(kind, 0.01, 0.99)) == "supports"
    assert reading(_test(kind, 0.99, 0.01)) == "contradicts"
    assert reading(_test(kind, 0.3, 0.7)) == "neither"
    assert reading(_test(kind, 0.025, 0.975)) == "neither"  # p = 0.05 exactly
    assert reading(_test(kind, 0.024, 0.976)) == "supports"
    assert reading(_test(kind, 0.001, 0.999, decides=False)) == "no verdict"
    assert reading(_test(kind, 0.02, 0.98), alpha=0.01) == "neither"


def test_reading_of_an_equivalence_comparison():
    """An equivalence (TOST) comparison supports when TOST's p is below alpha, contradicts when the effect
    is shown beyond a margin, else neither; p = alpha decides nothing. Catches the directional rule
    applied to it (its p_support is TOST's, not half a two-sided p) and the alpha boundary moved."""
    assert reading(_test("equivalent", 0.03, 0.9)) == "supports"
    assert reading(_test("equivalent", 0.9, 0.03)) == "contradicts"  # read as directional: p = 0.9, neither
    assert reading(_test("equivalent", 0.05, 0.05)) == "neither"
    assert reading(_test("equivalent", 0.2, 0.6)) == "neither"
    assert reading(_test("equivalent", 0.001, 0.9, decides=False)) == "no verdict"


def _one_sided(per_pair, se, effect, point, alt):
    """(seeds, examples) one-sided p-values from scipy: Student's t over the pairs, z with the given se."""
    z = (effect - point) / se
    return (ttest_1samp(per_pair, point, alternative=alt).pvalue,
            float(norm.sf(z) if alt == "greater" else norm.cdf(z)))


def test_equivalence_test_with_both_sources_is_scipys():
    """An equivalence comparison: p_support is TOST's (the larger of the two one-sided tests at -margin and
    +margin), p_contradict twice the smaller one-sided p beyond a margin, clipped at 1, each the larger
    over the two sources (seeds' t, examples' z); n_pairs and the detectable effects of both sources at
    the given power. Catches a margin's sign, the factor 2, the clip, a source's mde computed for the
    directional test, the power or ddof not passed on, and the n = MIN_PAIRS boundary."""
    for per_pair, se, margin in (([0.4, -0.1, 0.3, 0.2], 0.15, 1.0), ([2.0, 2.4, 1.8], 0.3, 0.5)):
        eff = float(np.mean(per_pair))
        t = claim_test("equivalent", margin, eff, per_pair, se=se, power=0.9)
        sup = max(max(a, b) for a, b in zip(_one_sided(per_pair, se, eff, -margin, "greater"),
                                            _one_sided(per_pair, se, eff, margin, "less")))
        con = max(min(1.0, 2 * min(a, b)) for a, b in zip(_one_sided(per_pair, se, eff, -margin, "less"),
                                                          _one_sided(per_pair, se, eff, margin, "greater")))
        assert t["p_support"] == pytest.approx(sup, rel=1e-9) and t["p"] == t["p_support"]
        assert t["p_contradict"] == pytest.approx(con, rel=1e-9) and t["p_contradict"] <= 1.0
        assert t["n_pairs"] == len(per_pair) and t["decides"]
        assert t["mde_sources"] == pytest.approx({"examples": mde_normal(se, True, power=0.9),
                                                  "seeds": mde_t(float(np.std(per_pair, ddof=1)), len(per_pair), True,
                                                                 power=0.9)})
    assert claim_test("equivalent", 1.0, 0.1, [0.3, -0.1, 0.1], se=0.2)["p_contradict"] == 1.0  # clipped


def test_a_comparison_at_its_point_has_p_one():
    """Per-pair effects exactly at the point (no spread): both one-sided p-values are 1, so the two-sided
    p and each source's are 1, not 2. Catches the clip at 1 dropped."""
    t = claim_test("greater", 0.0, 0.0, [0.0, 0.0, 0.0], se=0.1)
    assert t["p"] == 1.0 and t["p_sources"] == {"examples": 1.0, "seeds": 1.0}


def test_t_detectable_effect_at_other_powers_and_its_lower_tail():
    """mde_t: statsmodels' two-sided power (both tails of the noncentral t) at our effect is the power asked
    for, to 1e-11, at 80% and at a power so low that the effect is under one standard error; fewer than
    three values is one clear error (scipy's noncentral t gives NaN at one degree of freedom). Catches the
    lower tail subtracted and a root bracket that starts above the root."""
    for n in (4, 5):
        assert TTestPower().power(effect_size=mde_t(1.0, n), nobs=n, alpha=0.05) == pytest.approx(0.8, abs=1e-11)
    assert mde_t(1.0, 30, power=0.1) == pytest.approx(TTestPower().solve_power(nobs=30, alpha=0.05, power=0.1), rel=1e-5)
    with pytest.raises(ValueError, match="at least 3"):
        mde_t(1.0, 2)


def test_normal_p_is_the_z_test():
    """normal_p: scipy's normal tail areas of z = (effect - point) / se, two-sided twice the smaller tail.
    Catches the factor 2 changed and the effect measured from -point."""
    for effect, se, point in ((0.3, 0.2, 0.0), (-0.5, 0.4, 0.1), (1.0, 0.5, 0.5)):
        z = (effect - point) / se
        assert normal_p(effect, se, point, "greater") == pytest.approx(norm.sf(z), rel=1e-12)
        assert normal_p(effect, se, point, "less") == pytest.approx(norm.cdf(z), rel=1e-12)
        assert normal_p(effect, se, point, "two-sided") == pytest.approx(2 * norm.sf(abs(z)), rel=1e-12)


def test_normal_detectable_effects_have_the_power_they_claim():
    """mde_normal's effect has the asked-for power under its own test, checked from the power definition
    (not the formula): a two-sided z-test at alpha rejects with probability `power` at that effect (its
    far tail, below 1e-5 here, left out as usual), and TOST at a true effect of 0 shows that margin with
    probability `power` (|Z| < k/se - z(1 - alpha)). The default is the two-sided test. Catches any
    change to the two formulas' terms or to the default."""
    for se, alpha, power in ((1.0, 0.05, 0.8), (0.7, 0.1, 0.9)):
        k = mde_normal(se, alpha=alpha, power=power) / se
        zc = norm.ppf(1 - alpha / 2)
        assert norm.sf(zc - k) == pytest.approx(power, abs=1e-12) and norm.cdf(-zc - k) < 1e-5
        m = mde_normal(se, True, alpha, power) / se
        assert 2 * norm.cdf(m - norm.ppf(1 - alpha)) - 1 == pytest.approx(power, abs=1e-12)
    assert mde_normal(1.0) == mde_normal(1.0, False) != mde_normal(1.0, True)


def _runs(rng, ids, labels, accuracy):
    ref = rng.choice(labels, len(ids))
    pred = np.where(rng.random(len(ids)) < accuracy, ref, rng.choice(labels, len(ids)))
    return ref, pred


def test_seeds_bootstrap_of_one_pair_is_the_paired_bootstrap():
    """With one pair of runs the cluster bootstrap is the paired bootstrap over the same resamples (seed 0,
    2000 by default): its replicates' 2.5/97.5% quantiles are paired_bootstrap's interval, se their sd
    (ddof 1), even when one system predicts a label the other never does (shared confusion cells). Catches
    labels taken per system, the defaults changed, an unseeded generator, a replicate dropped, and another ddof."""
    rng = np.random.default_rng(3)
    ids = [f"e{i}" for i in range(60)]
    ref, pa = _runs(rng, ids, ["0", "1"], 0.8)
    u = rng.random(60)
    pa = np.where(u < 0.1, "3", np.where(u > 0.93, "4", pa))  # A alone predicts "3" and "4": more labels than B
    pb = np.where(rng.random(60) < 0.6, ref, "2")  # B alone predicts "2"
    a, b = triples(pa, ref), triples(pb, ref)
    for metric in ("accuracy", "macro_f1"):
        got = seeds_bootstrap([(a, b)], metric)
        want = paired_bootstrap(a, b, metric, n_boot=2000, seed=0)
        assert len(got["replicates"]) == 2000 and got["effect"] == pytest.approx(want["delta"], abs=1e-12)
        assert np.quantile(got["replicates"], [0.025, 0.975]) == pytest.approx([want["ci_lo"], want["ci_hi"]], abs=1e-12)
        assert got["se"] == pytest.approx(np.std(got["replicates"], ddof=1), rel=1e-12)
        assert seeds_bootstrap([(a, b)], metric)["se"] == got["se"]  # seeded


def test_seeds_bootstrap_groups_pairs_by_their_dev_examples():
    """Pairs scored on the same example ids share one draw (one group); pairs on other ids are drawn apart
    (two groups, and the smallest set's size as n). Catches every pair put in one group."""
    rng = np.random.default_rng(4)
    one, two = [f"a{i}" for i in range(40)], [f"b{i}" for i in range(30)]
    pairs = []
    for ids in (one, one, two):
        ref, pa = _runs(rng, ids, ["0", "1"], 0.85)
        _, pb = _runs(rng, ids, ["0", "1"], 0.7)
        pairs.append((triples(pa, ref, ids[0][0]), triples(pb, ref, ids[0][0])))
    got = seeds_bootstrap(pairs, "accuracy", n_boot=200)
    assert got["groups"] == 2 and got["n"] == 30
    assert seeds_bootstrap(pairs[:2], "accuracy", n_boot=200)["groups"] == 1


def test_per_class_f1_follows_the_labels_it_is_given():
    """per_class_f1 returns scikit-learn's F1 for each label in the order given, 0.0 for a label neither
    predicted nor present. Catches the labels argument dropped (scikit-learn's own sorted labels zipped
    with ours) and zero_division=1."""
    pred, ref = ["1", "0", "1", "1", "0"], ["1", "1", "1", "0", "0"]
    got = per_class_f1(pred, ref, ["1", "2", "0"])
    want = f1_score(ref, pred, labels=["1", "2", "0"], average=None, zero_division=0)
    assert list(got) == ["1", "2", "0"] and list(got.values()) == pytest.approx(list(want)) and got["2"] == 0.0
