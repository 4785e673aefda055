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


def _classification_scores(name: str, pa: list[str], pb: list[str], ref: list[str],
                           n_boot: int, rng: np.random.Generator) -> tuple[float, float, np.ndarray, np.ndarray]:
    labels = sorted(set(pa) | set(pb) | set(ref))
    k = len(labels)
    ix = {lab: i for i, lab in enumerate(labels)}
    r = np.array([ix[v] for v in ref])
    # one-hot confusion cell per example for each system: columns [A cells | B cells]
    x = np.zeros((len(ref), 2 * k * k))
    x[np.arange(len(ref)), np.array([ix[v] for v in pa]) * k + r] = 1
    x[np.arange(len(ref)), k * k + np.array([ix[v] for v in pb]) * k + r] = 1
    sums = np.vstack([x.sum(axis=0, keepdims=True), _resample_sums(x, n_boot, rng)])
    conf_a, conf_b = sums[:, :k * k].reshape(-1, k, k), sums[:, k * k:].reshape(-1, k, k)

    def score(conf: np.ndarray) -> np.ndarray:
        if name == "accuracy":
            return np.trace(conf, axis1=1, axis2=2) / conf.sum(axis=(1, 2))
        f1 = _f1_from_confusion(conf)
        if name == "macro_f1":
            return np.nanmean(f1, axis=1)
        pos = ix.get("1")
        return np.zeros(len(conf)) if pos is None else np.nan_to_num(f1[:, pos])

    sa, sb = score(conf_a), score(conf_b)
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
    if name in ("accuracy", "macro_f1", "f1_positive"):
        obs_a, obs_b, bs_a, bs_b = _classification_scores(name, _labels(pa), _labels(pb), _labels(ref), n_boot, rng)
    elif name == "chrf":
        chrf, st_a = chrf_statistics(pa, ref)
        _, st_b = chrf_statistics(pb, ref)
        d = st_a.shape[1]
        sums = np.vstack([np.hstack([st_a, st_b]).sum(axis=0, keepdims=True),
                          _resample_sums(np.hstack([st_a, st_b]), n_boot, rng)])
        sa = np.array([chrf._compute_f_score(list(s[:d])) for s in sums])
        sb = np.array([chrf._compute_f_score(list(s[d:])) for s in sums])
        obs_a, obs_b, bs_a, bs_b = sa[0], sb[0], sa[1:], sb[1:]
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
