"""What every task has: training examples as token ids, an epoch's batches (shared across data-parallel
ranks), an SFT loss, and a dev evaluation that returns its metrics and per-example outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
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

    def sft_steps(self, epoch: int) -> Iterator[list[Batch]]:
        """An epoch's SFT optimizer steps, each a list of micro-batches (see train_steps)."""
        for step in self.train_steps(self.train_lengths(), epoch, self.sft_loss_units()):
            batches = []
            for rows, share in step:
                b = self.collate(rows)
                b.share = share
                batches.append(b)
            yield batches

    def n_sft_steps(self) -> int:
        return self.n_train_steps(len(self.train_ids))

    def sft_loss_units(self) -> list[int] | None:
        """What sft_loss averages over, per training row (None: the rows themselves)."""
        return None

    def train_steps(self, lengths: Sequence[int], epoch: int,
                    units: Sequence[int] | None = None) -> list[list[tuple[list[int], float]]]:
        """An epoch's optimizer steps for this rank, each a list of micro-batches (rows, loss share).

        A step trains on one global batch of batch_size x grad_accum x world_size rows (length-bucketed,
        seeded by the epoch), split into grad_accum micro-batches of batch_size x world_size rows, of
        which this rank takes every world_size-th row (distributed.shard). A micro-batch's share is
        its loss units (`units` per row: target tokens for an LM loss; None: rows) over the step's, so
        the shares of a step sum to 1 over micro-batches and ranks, also for a short last step:
        batch B x grad_accum k trains exactly as batch kB (tests/test_training.py)."""
        per_micro = self.cfg.batch_size * self.world_size
        count = len if units is None else (lambda rows: sum(units[i] for i in rows))
        steps = []
        for rows in bucketed_batches(lengths, per_micro * self.cfg.grad_accum, epoch_seed(self.cfg.seed, epoch)):
            micro = [rows[i : i + per_micro] for i in range(0, len(rows), per_micro)]
            steps.append(shard(micro, self.rank, self.world_size, units, total=count(rows)))
        return steps

    def n_train_steps(self, n_rows: int) -> int:
        return math.ceil(n_rows / (self.cfg.batch_size * self.cfg.grad_accum * self.world_size))

    # what each task defines
    def collate(self, rows: Sequence[int], split: str = "train") -> Batch:
        raise NotImplementedError

    def sft_loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        raise NotImplementedError

    def write_outputs(self, out: Path, ev: Evaluation) -> None:
        """The task's own output files of a run (predictions, generations) beside dev_outputs.jsonl."""
