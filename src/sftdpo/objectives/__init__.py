"""What a training stage optimises: SFT (objectives/sft.py) or a preference objective (objectives/preference.py:
DPO in objectives/dpo/, SimPO and CPO in cpo.py, ORPO in orpo.py, KTO in kto.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from ..config import RunConfig
from ..tasks import Task


class Objective(Protocol):
    """A stage's loss over its own batches. The training step (train/step.py) only calls these."""

    stage: str
    train_mode: bool  # False: dropout off (DPO needs policy == reference at the start)

    def steps(self, epoch: int) -> Iterator[list[Any]]: ...  # an epoch's optimizer steps, each a list of micro-batches
    def n_steps(self) -> int: ...
    def loss(self, model, batch) -> tuple[torch.Tensor, dict]: ...
    def n_tokens(self, batch) -> int: ...
    def describe(self) -> dict: ...


@dataclass
class StageContext:
    """What building a stage's objective may use: the run's config, task and model (as they are at
    the stage's start), where it runs, and its directory (a stage may persist what it needs to
    resume there). `resumed_epoch`: the epochs the run had completed when the stage's objective is
    built (0 for a fresh run; inside the stage when resumed mid-stage); None outside the training loop."""

    cfg: RunConfig
    task: Task
    model: Any
    device: torch.device
    precision: str
    out: Path
    resumed_epoch: int | None = None
    is_main: bool = True  # data parallel: only rank 0 writes files
