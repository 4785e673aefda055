"""Token batches: right padding for training and scoring, left padding for generation, and the
length-bucketed, seeded batch order every epoch follows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A batch tensor on `device` without holding the host: on CUDA copied from pinned memory with
    non_blocking (from pageable memory the copy waits), so the host builds the next batch while the
    GPU runs this step."""
    if t is None:
        return None
    if device.type == "cuda" and not t.is_cuda:
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class Batch:
    """Right-padded token batch. `last` is each row's last real position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    index: torch.Tensor  # rows of the dataset this batch holds
    n_tokens: int  # non-padding tokens
    labels: torch.Tensor | None = None  # cloze: label token ids; LM: per-position targets (-100 = ignore)
    share: float = 1.0  # this batch's share of its optimizer step's loss (train.step; distributed.shard)

    def to(self, device: torch.device) -> "Batch":
        return replace(self, input_ids=to_device(self.input_ids, device), attention_mask=to_device(self.attention_mask, device),
                       last=to_device(self.last, device), labels=to_device(self.labels, device))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, index: Sequence[int]) -> Batch:
    n = len(seqs)
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return Batch(ids, mask, last, torch.tensor(list(index)), int(mask.sum()))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with every row's last real token in the last column, as generation needs."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within windows of 50 batches, shuffle the batches.
    Rows in a batch have similar lengths, so padding waste stays small while the order stays random.
    Deterministic in `seed`, which is what makes an interrupted run resume exactly."""
    idx = list(range(len(lengths)))
    if not shuffle:
        order = sorted(idx, key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(idx), generator=g).tolist()
    window = batch_size * 50
    batches: list[list[int]] = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def epoch_seed(seed: int, epoch: int) -> int:
    """The batch-order seed of an epoch: a pure function of the run seed and the epoch, so a resumed
    run draws the batches it would have drawn."""
    return seed * 1_000_003 + epoch
