"""Seeded, nested subsets of a task's examples (--max-train-examples, --data-fraction, --balance-labels)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, TypeVar

from ..config import SftdpoError

T = TypeVar("T")


def subsample(items: list[T], n: int | None = None, fraction: float = 1.0, seed: int = 0,
              label: Callable[[T], Any] | None = None) -> list[T]:
    """Seeded random subset, in the original order: `fraction` of the items, then at most `n`.

    Both cuts take a prefix of one seeded permutation, so smaller subsets are nested in larger
    ones (a data-fraction study adds data rather than resampling it). With `label`, the second cut
    keeps equal counts per label (the first ones of each in the permutation), so a few-hundred-example
    run does not spend its few steps learning the majority class.
    """
    if not 0 < fraction <= 1:
        raise SftdpoError(f"data fraction must be in (0, 1] (got {fraction})")
    if n is not None and n < 0:
        raise SftdpoError(f"max examples must be >= 0 (got {n})")
    k = len(items)
    if fraction < 1 and items:
        k = max(1, round(k * fraction))  # never round a non-empty set down to nothing
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if label is not None:
        labels = {i: label(items[i]) for i in order[:k]}  # in permutation order
        counts = Counter(labels.values())
        quota = min(counts.values(), default=0)
        if n is not None and counts:
            quota = min(quota, n // len(counts))
        taken: Counter = Counter()
        keep = []
        for i, c in labels.items():
            if taken[c] < quota:
                taken[c] += 1
                keep.append(i)
        return [items[i] for i in sorted(keep)]
    if n is not None:
        k = min(k, n)
    if k == len(items):
        return list(items)
    return [items[i] for i in sorted(order[:k])]
