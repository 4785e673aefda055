"""Statistics: seed intervals, dev metrics against sklearn/sacreBLEU, paired bootstrap behaviour."""

import time

import numpy as np
import pytest
from sacrebleu.metrics import CHRF
from sklearn.metrics import f1_score

from sftdpo.config import SftdpoError
from sftdpo.stats import (accuracy, chrf_statistics, holm, t_interval, corpus_chrf, f1_positive, macro_f1,
                          paired_bootstrap)

SONNET_LINES = [
    "Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,", "And summer's lease hath all too short a date;",
    "Sometime too hot the eye of heaven shines,", "And often is his gold complexion dimm'd;",
]


def sonnets(n: int = 12, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """n fake sonnets (refs) and two systems' outputs: A close to the refs, B scrambled."""
    rng = np.random.default_rng(seed)
    refs, a, b = [], [], []
    for _ in range(n):
        lines = [SONNET_LINES[i] for i in rng.permutation(len(SONNET_LINES))]
        refs.append("\n".join(lines))
        a.append("\n".join(lines[:4] + [l[::-1] for l in lines[4:]]))
        b.append("\n".join(l[::-1] for l in lines))
    return refs, a, b


def triples(preds, refs, prefix="e"):
    return [(f"{prefix}{i}", str(p), str(r)) for i, (p, r) in enumerate(zip(preds, refs))]


# -- seed intervals and multiple comparisons ---------------------------------------------------

def test_t_interval_is_the_student_t_interval_of_the_mean():
    vals = [90.0, 91.0, 92.0, 93.0, 94.0]
    mean, std, lo, hi = t_interval(vals)
    # t(0.975, 4) = 2.776445; std = sqrt(2.5); half width = 2.776445 * 1.581139 / sqrt(5) = 1.963243
    assert mean == 92.0 and std == pytest.approx(1.5811388, rel=1e-6)
    assert (lo, hi) == (pytest.approx(92.0 - 1.963243, rel=1e-6), pytest.approx(92.0 + 1.963243, rel=1e-6))
    _, _, lo80, hi80 = t_interval(vals, alpha=0.2)  # a lower level is narrower
    assert lo < lo80 and hi80 < hi
    with pytest.raises(ValueError):
        t_interval([41.2])


def test_holm_adjusts_in_step_down_order():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04, kept monotone -> 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([0.02]) == [0.02] and holm([]) == []



# -- metrics -----------------------------------------------------------------------------------

def test_classification_metrics_match_sklearn_on_random_labels():
    rng = np.random.default_rng(1)
    for _ in range(20):
        ref = rng.integers(0, 2, 50)
        pred = np.where(rng.random(50) < 0.7, ref, 1 - ref)
        p, r = [str(x) for x in pred], [str(x) for x in ref]
        assert accuracy(p, r) == pytest.approx(np.mean(pred == ref))
        assert macro_f1(p, r) == pytest.approx(f1_score(r, p, average="macro"))
        assert f1_positive(p, r) == pytest.approx(f1_score(r, p, pos_label="1", zero_division=0))


def test_macro_f1_when_one_class_is_never_predicted():
    ref = ["0", "1", "1", "0", "1", "0", "0"]
    pred = ["0"] * len(ref)
    expected = f1_score(ref, pred, average="macro", zero_division=0)
    assert macro_f1(pred, ref) == pytest.approx(expected)
    assert macro_f1(pred, ref) == pytest.approx((2 * 4 / (2 * 4 + 3)) / 2)
    assert f1_positive(pred, ref) == 0.0


def test_macro_f1_three_classes_and_int_labels():
    ref = [0, 1, 2, 2, 1, 0, 2, 1]
    pred = [0, 2, 2, 1, 1, 0, 0, 1]
    assert macro_f1(pred, ref) == pytest.approx(f1_score(ref, pred, average="macro"))
    # ints and their string forms are the same labels
    assert macro_f1([str(x) for x in pred], ref) == macro_f1(pred, ref)


def test_metric_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "0"])


def test_corpus_chrf_is_sacrebleu_defaults():
    refs, a, _ = sonnets()
    assert corpus_chrf(a, refs) == CHRF().corpus_score(a, [refs]).score
    assert corpus_chrf(refs, refs) == pytest.approx(100.0)


def test_chrf_statistics_sum_equals_corpus_score_exactly():
    refs, a, _ = sonnets()
    chrf, stats = chrf_statistics(a, refs)
    assert stats.shape == (len(refs), 18)
    assert chrf._compute_f_score(list(stats.sum(axis=0))) == corpus_chrf(a, refs)


# -- paired bootstrap --------------------------------------------------------------------------

def test_identical_systems_have_zero_delta_and_p_one():
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 2, 100)
    pred = np.where(rng.random(100) < 0.8, ref, 1 - ref)
    out = triples(pred, ref)
    for metric in ("accuracy", "macro_f1", "f1_positive"):
        res = paired_bootstrap(out, out, metric)
        assert res["delta"] == 0.0 and res["p_value"] == 1.0
        assert res["ci_lo"] == res["ci_hi"] == 0.0 and res["n"] == 100


def test_always_right_beats_thirty_percent_wrong():
    ref = np.array([i % 2 for i in range(100)])
    wrong = ref.copy()
    wrong[:30] = 1 - wrong[:30]
    res = paired_bootstrap(triples(ref, ref), triples(wrong, ref), "accuracy", n_boot=1000)
    assert res["delta"] == pytest.approx(0.3)
    assert res["p_value"] < 0.01
    assert res["p_value"] == pytest.approx(1 / 1001)  # floor: no resample disagreed
    assert 0.0 < res["ci_lo"] < 0.3 < res["ci_hi"]
    # direction flips the sign, not the p-value
    rev = paired_bootstrap(triples(wrong, ref), triples(ref, ref), "accuracy", n_boot=1000)
    assert rev["delta"] == pytest.approx(-0.3) and rev["p_value"] == res["p_value"]


def test_small_difference_is_not_significant():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 2, 200)
    a = np.where(rng.random(200) < 0.8, ref, 1 - ref)
    b = a.copy()
    b[:2] = 1 - b[:2]  # two flips out of 200
    res = paired_bootstrap(triples(a, ref), triples(b, ref), "accuracy")
    assert res["p_value"] > 0.05


@pytest.mark.parametrize("name,fn", [("accuracy", accuracy), ("macro_f1", macro_f1), ("f1_positive", f1_positive)])
def test_fast_classification_path_equals_brute_force(name, fn):
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 2, 60)
    a = np.where(rng.random(60) < 0.85, ref, 1 - ref)
    b = np.where(rng.random(60) < 0.6, ref, 1 - ref)
    fast = paired_bootstrap(triples(a, ref), triples(b, ref), name, n_boot=200, seed=7)
    slow = paired_bootstrap(triples(a, ref), triples(b, ref), lambda p, r: fn(p, r), n_boot=200, seed=7)
    assert fast["delta"] == pytest.approx(fn([str(x) for x in a], [str(x) for x in ref])
                                          - fn([str(x) for x in b], [str(x) for x in ref]))
    for k in ("delta", "p_value", "ci_lo", "ci_hi"):
        assert fast[k] == pytest.approx(slow[k])


def test_chrf_paired_bootstrap_is_fast_and_matches_corpus_scores():
    refs, a, b = sonnets(12)
    oa, ob = triples(a, refs, "s"), triples(b, refs, "s")
    t0 = time.perf_counter()
    res = paired_bootstrap(oa, ob, "chrf", n_boot=1000)
    assert time.perf_counter() - t0 < 5
    assert res["delta"] == pytest.approx(corpus_chrf(a, refs) - corpus_chrf(b, refs), abs=1e-9)
    assert res["delta"] > 0 and res["ci_lo"] > 0 and res["p_value"] < 0.01
    # same resamples recomputed with sacreBLEU corpus_score give the same interval
    slow = paired_bootstrap(oa, ob, lambda p, r: corpus_chrf(p, r), n_boot=50, seed=3)
    fast = paired_bootstrap(oa, ob, "chrf", n_boot=50, seed=3)
    for k in ("delta", "p_value", "ci_lo", "ci_hi"):
        assert fast[k] == pytest.approx(slow[k], abs=1e-9)


def test_outputs_are_aligned_by_id_not_position():
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 2, 80)
    a = np.where(rng.random(80) < 0.9, ref, 1 - ref)
    b = np.where(rng.random(80) < 0.7, ref, 1 - ref)
    oa, ob = triples(a, ref), triples(b, ref)
    shuffled = [ob[i] for i in rng.permutation(len(ob))]
    assert paired_bootstrap(oa, ob, "accuracy") == paired_bootstrap(oa, shuffled, "accuracy")


def test_mismatched_examples_are_errors():
    out = triples(["1", "0"], ["1", "1"])
    with pytest.raises(SftdpoError, match="ids differ"):
        paired_bootstrap(out, out[:1], "accuracy")
    other_ref = [(i, p, "0") for i, p, _ in out]
    with pytest.raises(SftdpoError, match="references differ"):
        paired_bootstrap(out, other_ref, "accuracy")
    with pytest.raises(SftdpoError, match="unknown metric"):
        paired_bootstrap(out, out, "bleu")
