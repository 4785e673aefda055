"""Contracts of ops/ that mutmut's survivors showed untested (`make mutate`, docs/mutation.md)."""

import torch

from sftdpo.ops.batching import bucketed_batches


def test_bucketed_batches_sort_windows_of_fifty_batches_and_shuffle_the_batches():
    """The documented order, step by step with torch's generator: a seeded permutation of the rows,
    sorted by length within windows of 50 batches, cut into batches, the batches permuted by the same
    generator. 230 rows in batches of 2 make two full windows and a short one. Catches another window
    size, a sort by row number instead of length, windows that skip or overlap rows, and batches left in
    length order (the order a run's batches, and so its numbers, follow from its seed)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randperm(1000, generator=g)[:230].tolist()  # distinct lengths: one sorted order
    got = bucketed_batches(lengths, 2, seed=5)
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(230, generator=g).tolist()
    batches = []
    for start in (0, 100, 200):
        window = sorted(perm[start:start + 100], key=lambda i: lengths[i])
        batches += [window[i:i + 2] for i in range(0, len(window), 2)]
    order = torch.randperm(len(batches), generator=g).tolist()
    assert got == [batches[i] for i in order]
    unshuffled = bucketed_batches(lengths, 2, seed=5, shuffle=False)
    by_length = sorted(range(230), key=lambda i: lengths[i])
    assert unshuffled == [by_length[i:i + 2] for i in range(0, 230, 2)]
