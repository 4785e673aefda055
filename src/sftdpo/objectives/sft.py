"""Supervised fine-tuning: the task's own loss (label-token cross-entropy, or the LM loss)."""

from __future__ import annotations

from typing import Iterator

import torch

from ..ops.batching import Batch
from ..tasks import Task


class SFTObjective:
    stage = "sft"
    train_mode = True

    def __init__(self, task: Task) -> None:
        self.task = task

    def steps(self, epoch: int) -> Iterator[list[Batch]]:
        return self.task.sft_steps(epoch)

    def n_steps(self) -> int:
        return self.task.n_sft_steps()

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        return self.task.sft_loss(model, batch)

    def n_tokens(self, batch: Batch) -> int:
        return batch.n_tokens

    def describe(self) -> dict:
        return {"objective": "sft", "train_examples": len(self.task.train_ids)}
