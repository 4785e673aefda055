"""What every task has: training examples as token ids, an epoch's batches (shared across data-parallel
ranks), an SFT loss, and a dev evaluation that returns its metrics and per-example outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..config import RunConfig
from ..distributed import shard
from ..ops.batching import Batch, bucketed_batches, epoch_seed


@dataclass
class Evaluation:
    """A dev evaluation: metrics (without the `dev/` prefix), one (id, prediction, reference) per
    example, and for generation tasks the samples per example ((number, [sample per draw]))."""

    metrics: dict[str, float]
    outputs: list[tuple[str, str, str]]
    generations: list[tuple[int, list[str]]] = field(default_factory=list)


class Task:
    name: str
    primary_metric: str
    metrics: tuple[str, ...]
    train_ids: list[list[int]]
    source: str

    def __init__(self, cfg: RunConfig, tok, *, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.tok = cfg, tok
        self.pad_id = tok.pad_token_id
        # data parallel (distributed.py): this process trains on its share of every global batch
        self.rank, self.world_size = rank, world_size

    def train_lengths(self) -> list[int]:
        return [len(s) for s in self.train_ids]

    def sft_batches(self, epoch: int) -> Iterator[Batch]:
        for rows, share in self.train_shards(self.train_lengths(), epoch, self.sft_loss_units()):
            b = self.collate(rows)
            b.share = share
            yield b

    def n_sft_batches(self) -> int:
        return self.n_train_batches(len(self.train_ids))

    def sft_loss_units(self) -> list[int] | None:
        """What sft_loss averages over, per training row (None: the rows themselves)."""
        return None

    def train_shards(self, lengths: Sequence[int], epoch: int, units: Sequence[int] | None = None) -> list[tuple[list[int], float]]:
        """An epoch's training batches as (rows, loss share) for this rank: its part of each global batch
        of batch_size x world_size rows (the batches themselves, share 1, in one process)."""
        global_batches = bucketed_batches(lengths, self.cfg.batch_size * self.world_size, epoch_seed(self.cfg.seed, epoch))
        return shard(global_batches, self.rank, self.world_size, units)

    def n_train_batches(self, n_rows: int) -> int:
        return math.ceil(n_rows / (self.cfg.batch_size * self.world_size))

    # what each task defines
    def collate(self, rows: Sequence[int], split: str = "train") -> Batch:
        raise NotImplementedError

    def sft_loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        raise NotImplementedError
