"""Honest statistics for small studies: seed-level t intervals, dev-set metrics, and paired
bootstrap tests over dev examples (Holm-adjusted when several are shown).

Seeds are few (2-5): a bootstrap over so few values has too few distinct resamples to be an
interval, so seed aggregates use Student's t from three seeds on (report/table.py shows one or two
seeds' values instead). Differences between two systems are tested on the same dev examples
(paired), which is far more sensitive than comparing seed means and is what Koehn (2004) /
sacreBLEU do for MT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import math

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import chi, nct, norm, ttest_1samp
from scipy.stats import t as student_t
from sklearn.metrics import accuracy_score, f1_score

from .config import SftdpoError


# -- seed-level aggregates ---------------------------------------------------------------------

def t_interval(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(mean, std, lo, hi): mean over seeds, sample std (ddof=1) and the Student-t interval of the mean
    at level 1 - alpha, mean ± t(1 - alpha/2, n - 1) · std / sqrt(n). With a handful of seeds a
    bootstrap over them has too few distinct resamples to be an interval; t assumes the seeds' results
    are roughly normal, which is what they are asked to be. Needs n >= 2."""
    v = np.asarray([float(x) for x in values], dtype=float)
    if v.size < 2:
        raise ValueError("an interval needs at least two values")
    mean, std = float(v.mean()), float(v.std(ddof=1))
    half = float(student_t.ppf(1 - alpha / 2, v.size - 1)) * std / math.sqrt(v.size)
    return mean, std, mean - half, mean + half


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for a family of tests (controls the family-wise error)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


# -- dev-set metrics ---------------------------------------------------------------------------

def _labels(xs: Sequence[Any]) -> list[str]:
    # predictions are stored as "0"/"1" strings; accept ints too without silently mismatching
    return [str(x) for x in xs]


def _check_pair(pred: Sequence[Any], ref: Sequence[Any]) -> tuple[list[str], list[str]]:
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predictions but {len(ref)} references")
    if not len(pred):
        raise ValueError("no examples to score")
    return _labels(pred), _labels(ref)


def accuracy(pred: Sequence[Any], ref: Sequence[Any]) -> float:
    """Fraction of exact label matches (0..1), scikit-learn's accuracy_score."""
    p, r = _check_pair(pred, ref)
    return float(accuracy_score(r, p))


def macro_f1(pred: Sequence[Any], ref: Sequence[Any]) -> float:
    """Unweighted mean F1 over the labels seen in pred or ref: scikit-learn's
    f1_score(average="macro"), with 0 for a class that is never predicted."""
    p, r = _check_pair(pred, ref)
    return float(f1_score(r, p, average="macro", zero_division=0))


def f1_positive(pred: Sequence[Any], ref: Sequence[Any], positive: str = "1") -> float:
    """F1 of the positive (paraphrase) class; 0.0 when it is neither predicted nor present."""
    p, r = _check_pair(pred, ref)
    return float(f1_score(r, p, labels=[str(positive)], average=None, zero_division=0)[0])


def per_class_f1(pred: Sequence[Any], ref: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """F1 of each label in `labels` (0.0 for one neither predicted nor present), scikit-learn's."""
    p, r = _check_pair(pred, ref)
    values = f1_score(r, p, labels=_labels(labels), average=None, zero_division=0)
    return dict(zip(_labels(labels), map(float, values)))


def _f1_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-label F1 = 2tp / (2tp + fp + fn) from a [..., pred, ref] confusion array; NaN for labels
    absent from both predictions and references (scikit-learn leaves those out). For the paired
    bootstrap only: 1000 resamples of 40k dev examples as confusion-count sums took 1.7 s, where the
    2000 f1_score calls would take ~370 s (0.18 s each; this project's 2-core CPU, AMD EPYC)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    fp = conf.sum(axis=-1) - tp  # predicted as label, reference differs
    fn = conf.sum(axis=-2) - tp
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacreBLEU CHRF() defaults: chrF2, char order 6, no word n-grams), 0..100."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not len(hyps):
        raise ValueError("no examples to score")
    return float(CHRF().corpus_score(list(hyps), [list(refs)]).score)


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacreBLEU BLEU() defaults: 13a tokenisation, exp smoothing), 0..100."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not len(hyps):
        raise ValueError("no examples to score")
    return float(BLEU().corpus_score(list(hyps), [list(refs)]).score)


def chrf_statistics(hyps: Sequence[str], refs: Sequence[str]) -> tuple[CHRF, np.ndarray]:
    """Per-segment chrF sufficient statistics (n_segments x 3*order) from sacreBLEU itself; corpus
    chrF of any subset/multiset is chrf._compute_f_score(sum of its rows). sacreBLEU's public API
    has no per-segment statistics: scoring each resample with the public corpus_score took 21.5 ms
    per call on the 12 dev sonnets, 43 s per comparison of 1000 resamples, against 0.2 s here; its
    public PairedTest reports a different (Moses) p-value and no interval of the difference. The
    identity resample equals the public corpus_score exactly (tests/test_stats.py)."""
    chrf = CHRF()
    stats = chrf._extract_corpus_statistics(list(hyps), [list(refs)])
    return chrf, np.asarray(stats, dtype=np.float64)


# -- paired bootstrap --------------------------------------------------------------------------

METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "macro_f1": macro_f1, "f1_positive": f1_positive, "chrf": corpus_chrf,
}


def _align(outputs_a: Sequence[tuple[str, str, str]], outputs_b: Sequence[tuple[str, str, str]]):
    a = {str(i): (p, r) for i, p, r in outputs_a}
    b = {str(i): (p, r) for i, p, r in outputs_b}
    if len(a) != len(outputs_a) or len(b) != len(outputs_b):
        raise SftdpoError("paired bootstrap: duplicate example ids in dev outputs")
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise SftdpoError(f"paired bootstrap: example ids differ ({len(only_a)} only in A, e.g. {only_a[:3]}; "
                          f"{len(only_b)} only in B, e.g. {only_b[:3]})")
    if not a:
        raise SftdpoError("paired bootstrap: no dev outputs to compare")
    ids = sorted(a)
    bad = [i for i in ids if a[i][1] != b[i][1]]
    if bad:
        raise SftdpoError(f"paired bootstrap: references differ for {len(bad)} example(s), e.g. {bad[:3]}")
    return [a[i][0] for i in ids], [b[i][0] for i in ids], [a[i][1] for i in ids]


def _resample_sums(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of per-example statistics x (n x d) over n_boot resamples with replacement, done as
    (resample counts) @ x in chunks so memory stays bounded for 100k-example dev sets."""
    n = x.shape[0]
    chunk = max(1, 4_000_000 // n)
    out = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        counts = np.bincount((np.arange(m)[:, None] * n + idx).ravel(), minlength=m * n).reshape(m, n)
        out.append(counts @ x)
    return np.concatenate(out)


def _statistics(name: str, preds: Sequence[str], refs: Sequence[str],
                labels: Sequence[str] | None = None) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Per-example sufficient statistics of a corpus metric and the function from their sums to the
    metric: (x: n x d, score: (m x d) sums -> m values). Classification metrics: each example's one-hot
    confusion cell over `labels` (give every system's labels so that systems share the cells); chrF:
    sacreBLEU's own per-segment statistics. Any multiset of examples scores as score(counts @ x)."""
    if name in ("accuracy", "macro_f1", "f1_positive"):
        labels = sorted(set(labels or ()) | set(preds) | set(refs))
        k = len(labels)
        ix = {lab: i for i, lab in enumerate(labels)}
        x = np.zeros((len(refs), k * k))
        cell = np.array([ix[v] for v in preds], dtype=int) * k + np.array([ix[v] for v in refs], dtype=int)
        x[np.arange(len(refs)), cell] = 1

        def score(sums: np.ndarray) -> np.ndarray:
            conf = sums.reshape(-1, k, k)
            if name == "accuracy":
                return np.trace(conf, axis1=1, axis2=2) / conf.sum(axis=(1, 2))
            f1 = _f1_from_confusion(conf)
            if name == "macro_f1":
                return np.nanmean(f1, axis=1)
            pos = ix.get("1")
            return np.zeros(len(conf)) if pos is None else np.nan_to_num(f1[:, pos])

        return x, score
    if name == "chrf":
        chrf, x = chrf_statistics(preds, refs)
        return x, lambda sums: np.array([chrf._compute_f_score(list(row)) for row in sums])
    raise SftdpoError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")


def _paired_scores(name: str, pa: list[str], pb: list[str], ref: list[str],
                   n_boot: int, rng: np.random.Generator) -> tuple[float, float, np.ndarray, np.ndarray]:
    labels = sorted(set(pa) | set(pb) | set(ref))
    xa, score = _statistics(name, pa, ref, labels)
    xb, _ = _statistics(name, pb, ref, labels)
    d = xa.shape[1]  # columns [A cells | B cells], resampled together
    x = np.hstack([xa, xb])
    sums = np.vstack([x.sum(axis=0, keepdims=True), _resample_sums(x, n_boot, rng)])
    sa, sb = score(sums[:, :d]), score(sums[:, d:])
    return float(sa[0]), float(sb[0]), sa[1:], sb[1:]


def paired_bootstrap(outputs_a: Sequence[tuple[str, str, str]], outputs_b: Sequence[tuple[str, str, str]],
                     metric: str | Callable[..., float], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap test of metric(A) - metric(B) over the same dev examples.

    outputs are (example_id, prediction, reference) triples, aligned by id (the id sets and
    references must agree). Each resample draws example indices with replacement, shared by A
    and B, and recomputes the corpus-level metric of both. Returns delta (observed, in the
    metric's units: fractions for accuracy/F1, 0..100 for chrF), the 95% percentile interval
    of the resampled deltas, n examples and a two-sided p-value

        p = 2 * min(P*(d <= 0), P*(d >= 0)),  clipped to [1/(n_boot+1), 1],

    i.e. twice the share of resamples whose delta does not keep one sign (Koehn 2004 style);
    the floor says "no resample disagreed" without claiming p = 0. Identical systems give p = 1.

    metric: "accuracy", "macro_f1", "f1_positive", "chrf" (or those functions) use sufficient
    statistics summed per resample (chrF via sacreBLEU's own per-segment statistics, so the
    identity resample equals corpus_chrf exactly); any other callable(pred, ref) is recomputed
    per resample (slow).
    """
    pa, pb, ref = _align(outputs_a, outputs_b)
    name = metric if isinstance(metric, str) else next((k for k, f in METRICS.items() if f is metric), None)
    if isinstance(metric, str) and name not in METRICS:
        raise SftdpoError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    rng = np.random.default_rng(seed)
    n = len(ref)
    if name in METRICS:
        obs_a, obs_b, bs_a, bs_b = _paired_scores(name, _labels(pa), _labels(pb), _labels(ref), n_boot, rng)
    else:
        obs_a, obs_b = metric(pa, ref), metric(pb, ref)
        bs_a, bs_b = np.empty(n_boot), np.empty(n_boot)
        for j in range(n_boot):
            idx = rng.integers(0, n, size=n)
            r = [ref[i] for i in idx]
            bs_a[j], bs_b[j] = metric([pa[i] for i in idx], r), metric([pb[i] for i in idx], r)
    deltas = np.asarray(bs_a) - np.asarray(bs_b)
    p = 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return {"delta": float(obs_a - obs_b), "p_value": float(min(1.0, max(p, 1 / (n_boot + 1)))),
            "ci_lo": float(lo), "ci_hi": float(hi), "n": n}


# -- effects over seeds: the claims' tests ------------------------------------------------------
# A claim compares conditions A and B over paired runs (one pair per seed). Two sources of noise
# decide whether a difference is real: the dev set (a finite sample of examples) and training (the
# seed). The bootstrap below measures the first, the t-test over the pairs' effects the second;
# a claim is decided only where both reject (an intersection-union test: the larger p-value;
# Berger 1982, Berger & Hsu 1996), so one lucky seed cannot decide anything.

ALPHA = 0.05
POWER = 0.8
MIN_PAIRS = 3  # a t-test over seeds needs a variance: n - 1 >= 2 degrees of freedom
# what a claim asserts about the effect A - B: greater (than 0), no greater than +margin, no less
# than -margin, or equivalent (within +-margin; TOST)
KINDS = ("greater", "no-greater-than", "no-less-than", "equivalent")


def seeds_bootstrap(pairs: Sequence[tuple[Sequence[tuple[str, str, str]], Sequence[tuple[str, str, str]]]],
                    metric: str, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The effect metric(A) - metric(B) averaged over paired runs, and its bootstrap over dev examples.

    `pairs`: per pair (seed) of runs, A's and B's dev outputs as (example_id, prediction, reference)
    triples, aligned by id within the pair. Each run's metric is its corpus-level value (chrF is not a
    mean over examples); the effect is the mean over pairs of the per-pair differences. Resampling is
    a cluster bootstrap over dev examples: one draw of example ids, shared by every pair and both
    systems, because the seeds are scored on the same dev set, so an example that is hard for every
    seed is one piece of evidence, not one per seed (Davison & Hinkley 1997, §3.8; Field & Welsh 2007).
    Pairs scored on other example ids (a different dev set) are drawn separately (a stratified
    bootstrap, Davison & Hinkley §3.2). Returns effect, se (the sd of the resampled effects), the
    resampled effects, each pair's effect and metric values, n (examples per pair, the smallest) and
    groups (how many distinct dev sets)."""
    if not pairs:
        raise SftdpoError("seeds bootstrap: no pairs of runs to compare")
    if metric not in METRICS:
        raise SftdpoError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    aligned = []
    for a, b in pairs:
        a_ids = sorted({str(i) for i, _, _ in a})
        pa, pb, ref = _align(a, b)
        aligned.append((tuple(a_ids), _labels(pa), _labels(pb), _labels(ref)))
    labels = sorted({v for _, pa, pb, ref in aligned for v in (*pa, *pb, *ref)})
    rng = np.random.default_rng(seed)
    values_a, values_b = np.empty((len(pairs), n_boot + 1)), np.empty((len(pairs), n_boot + 1))
    groups: dict[tuple, list[int]] = {}
    for j, (ids, *_rest) in enumerate(aligned):
        groups.setdefault(ids, []).append(j)
    for members in groups.values():
        blocks, scores = [], []
        for j in members:
            _, pa, pb, ref = aligned[j]
            xa, score = _statistics(metric, pa, ref, labels)
            xb, _ = _statistics(metric, pb, ref, labels)
            blocks += [xa, xb]
            scores.append(score)
        x = np.hstack(blocks)
        sums = np.vstack([x.sum(axis=0, keepdims=True), _resample_sums(x, n_boot, rng)])
        d = blocks[0].shape[1]
        for k, (j, score) in enumerate(zip(members, scores)):
            values_a[j] = score(sums[:, 2 * k * d:(2 * k + 1) * d])
            values_b[j] = score(sums[:, (2 * k + 1) * d:(2 * k + 2) * d])
    effects = (values_a - values_b).mean(axis=0)
    return {"effect": float(effects[0]), "se": float(np.std(effects[1:], ddof=1)), "replicates": effects[1:],
            "per_pair": [float(v) for v in values_a[:, 0] - values_b[:, 0]],
            "a": [float(v) for v in values_a[:, 0]], "b": [float(v) for v in values_b[:, 0]],
            "n": min(len(ids) for ids, *_ in aligned), "groups": len(groups)}


def normal_p(effect: float, se: float, point: float, alternative: str) -> float:
    """p-value of a z-test of the effect against `point` with the given standard error (the bootstrap's):
    alternative "greater" (H1: effect > point), "less" or "two-sided"."""
    if se <= 0:
        return _degenerate_p(effect - point, alternative)
    z = (effect - point) / se
    return float({"greater": norm.sf(z), "less": norm.cdf(z), "two-sided": min(1.0, 2 * norm.sf(abs(z)))}[alternative])


def t_p(values: Sequence[float], point: float, alternative: str) -> float:
    """p-value of Student's one-sample t-test of the mean of `values` (per-pair effects) against
    `point` (scipy's ttest_1samp; a paired t-test of A's and B's seed values when point = 0)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        raise ValueError("a t-test needs at least two values")
    if np.ptp(v) == 0:  # no spread: t is infinite (or undefined at the point itself)
        return _degenerate_p(float(v[0]) - point, alternative)
    return float(ttest_1samp(v, point, alternative=alternative).pvalue)


def _degenerate_p(diff: float, alternative: str) -> float:
    side = {"greater": diff > 0, "less": diff < 0, "two-sided": diff != 0}[alternative]
    return 0.0 if side else 1.0


def mde_normal(se: float, equivalence: bool = False, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest effect a z-test with this standard error detects with probability `power`: for a
    two-sided test at level alpha, (z(1 - alpha/2) + z(power)) * se (2.80 se at 0.05 / 80%). For an
    equivalence claim (TOST, each one-sided test at alpha), the smallest margin it shows with that
    power when the true effect is 0: (z(1 - alpha) + z(1 - (1 - power)/2)) * se (2.93 se)."""
    if equivalence:
        return float((norm.ppf(1 - alpha) + norm.ppf(1 - (1 - power) / 2)) * se)
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * se)


def mde_t(sd: float, n: int, equivalence: bool = False, alpha: float = ALPHA, power: float = POWER) -> float:
    """The same for Student's t over n per-pair effects with standard deviation sd, exactly (not the
    normal approximation, which is 5% optimistic at n = 3): the two-sided test's power from the
    noncentral t distribution; TOST's at a true effect of 0 from the distribution of the sample sd
    (its power is E[2 Phi(k - t(1 - alpha) s) - 1]^+ for a margin of k standard errors, s the sample sd
    in units of the true one: Phillips 1990)."""
    if n < MIN_PAIRS:  # at n = 2 (df = 1) scipy's noncentral t returns NaN near 80% power
        raise ValueError(f"a detectable effect over seeds needs at least {MIN_PAIRS} values")
    df = n - 1
    if equivalence:
        tc = student_t.ppf(1 - alpha, df)
        s = chi(df, scale=1 / math.sqrt(df))  # the sample sd in units of the true sd

        def pw(k: float) -> float:  # both one-sided tests reject iff |mean| < k - tc * s (0 beyond s = k / tc)
            return float(quad(lambda x: (2 * norm.cdf(k - tc * x) - 1) * s.pdf(x), 0, k / tc)[0])
    else:
        tc = student_t.ppf(1 - alpha / 2, df)

        def pw(k: float) -> float:
            return float(nct.sf(tc, df, k) + nct.cdf(-tc, df, k))
    k = brentq(lambda k: pw(k) - power, 0.0, tc + 10 if equivalence else tc + 4)
    return float(k * sd / math.sqrt(n))


def claim_test(kind: str, margin: float, effect: float, per_pair: Sequence[float], se: float | None = None,
               alpha: float = ALPHA, power: float = POWER) -> dict[str, Any]:
    """The test of one comparison of a claim (effect = A - B, in any units; a ratio as its log).

    Sources: the dev-example bootstrap (`se`; None where the metric has no per-example outputs, e.g.
    wall-clock) and Student's t over the per-pair effects (from MIN_PAIRS pairs). Each p-value is the
    largest of the sources' (intersection-union), and only with the t-test present does it decide.
    Directional kinds test the effect against their point (greater: 0, no-greater-than: +margin,
    no-less-than: -margin): p_support and p_contradict are the one-sided p-values towards and against
    the claim, p the two-sided one. `equivalent`: p = p_support is TOST's (both one-sided tests at
    -margin and +margin, Schuirmann 1987), p_contradict that the effect lies beyond one margin (both
    sides tested: twice the smaller one-sided p). mde: the largest of the sources' detectable effects
    (80% power, two-sided; for `equivalent` the smallest margin shown)."""
    if kind not in KINDS:
        raise SftdpoError(f"unknown claim kind {kind!r}; known: {', '.join(KINDS)}")
    n = len(per_pair)
    tests: dict[str, Callable[[float, str], float]] = {}
    if se is not None:
        tests["examples"] = lambda point, alt: normal_p(effect, se, point, alt)
    if n >= MIN_PAIRS:
        tests["seeds"] = lambda point, alt: t_p(per_pair, point, alt)
    equiv = kind == "equivalent"
    point = {"greater": 0.0, "no-greater-than": margin, "no-less-than": -margin, "equivalent": 0.0}[kind]
    towards = "less" if kind == "no-greater-than" else "greater"
    away = "greater" if towards == "less" else "less"
    sources = {}
    for name, p in tests.items():
        if equiv:
            sources[name] = (max(p(-margin, "greater"), p(margin, "less")),
                             min(1.0, 2 * min(p(-margin, "less"), p(margin, "greater"))))
        else:
            sources[name] = (p(point, towards), p(point, away))
    sup = max((v[0] for v in sources.values()), default=None)
    con = max((v[1] for v in sources.values()), default=None)
    mdes = {}
    if se is not None:
        mdes["examples"] = mde_normal(se, equiv, alpha, power)
    if n >= MIN_PAIRS:
        mdes["seeds"] = mde_t(float(np.std(per_pair, ddof=1)), n, equiv, alpha, power)
    return {"kind": kind, "effect": effect, "point": point, "n_pairs": n, "decides": "seeds" in tests,
            "p_support": sup, "p_contradict": con,
            "p": sup if equiv or sup is None else min(1.0, 2 * min(sup, con)),
            "p_sources": {k: v[0] if equiv else min(1.0, 2 * min(v)) for k, v in sources.items()},
            "mde_sources": mdes, "mde": max(mdes.values(), default=None)}


def reading(test: dict[str, Any], alpha: float = ALPHA) -> str:
    """What one comparison says on its own, unadjusted: supports / contradicts / neither; "no verdict"
    when it cannot decide (fewer than MIN_PAIRS pairs)."""
    if not test["decides"]:
        return "no verdict"
    if test["kind"] == "equivalent":
        return "supports" if test["p_support"] < alpha else "contradicts" if test["p_contradict"] < alpha else "neither"
    if test["p"] >= alpha:
        return "neither"
    return "supports" if test["p_support"] < test["p_contradict"] else "contradicts"


def claim_p(tests: list[dict[str, Any]]) -> tuple[float, str] | None:
    """One p-value for a claim over its comparisons, and which way it points (supported or contradicted);
    None when no comparison can decide. A claim holds for each comparison it makes: supported only when
    every one supports (intersection-union, the largest p_support; a comparison that cannot decide
    counts as p = 1), contradicted when any one contradicts (Bonferroni over the deciding ones). The
    claim's p is the smaller of the two, doubled for a directional claim as a two-sided test's is (for
    one comparison it is that comparison's two-sided p); an equivalence claim's two alternatives
    exclude each other (TOST's p stands as is). Holm's adjustment across claims takes it from here."""
    deciding = [t for t in tests if t["decides"]]
    if not deciding:
        return None
    sup = max(t["p_support"] if t["decides"] else 1.0 for t in tests)
    con = min(1.0, len(deciding) * min(t["p_contradict"] for t in deciding))
    p = min(sup, con) if tests[0]["kind"] == "equivalent" else min(1.0, 2 * min(sup, con))
    return p, "supported" if sup <= con else "contradicted"
