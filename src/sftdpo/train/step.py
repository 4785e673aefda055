"""One optimizer step, the learning-rate schedule and the optimizer: the training loop and the
benchmark both call `train_step`, so what `sftdpo bench` times is what a run executes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..distributed import all_reduce_grads, reduce_batch_stats
from ..models import autocast
from ..objectives import Objective


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak: a linear
    warm-up over round(total_steps x warmup_ratio) steps, then `linear` decay to 0 at total_steps,
    `cosine` decay to 0, or `constant`."""
    warmup = int(round(total_steps * warmup_ratio))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused on every device: on CPU the fused kernel is several times faster than the
    multi-tensor (foreach) one and gives the same updates up to float rounding."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                   schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, total_steps, warmup_ratio, schedule))


@dataclass
class MicroBatchStats:
    """A micro-batch's loss, logged metrics and tokens (the global batch's, under data parallelism)."""

    loss: float
    logs: dict[str, float]
    tokens: int


def train_step(model, objective: Objective, window: Sequence, opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler, params: Sequence[torch.nn.Parameter], *,
               device: torch.device, precision: str, max_grad_norm: float, accum: int) -> list[MicroBatchStats]:
    """One optimizer step over the micro-batches of `window`: forward under autocast, backward of each
    loss scaled by its share of the global batch (data parallel; 1 in one process) over `accum`,
    gradients summed over ranks, clipped, AdamW, the schedule, gradients cleared."""
    out = []
    for batch in window:
        batch = batch.to(device)
        with autocast(device, precision):
            loss, logs = objective.loss(model, batch)
        (loss * batch.share / accum).backward()
        out.append(MicroBatchStats(*reduce_batch_stats(loss, logs, objective.n_tokens(batch), batch.share)))
    all_reduce_grads(params)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return out
