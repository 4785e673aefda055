"""One optimizer step, the learning-rate schedule and the optimizer: the training loop and the
benchmark both call `train_step`, so what `sftdpo bench` times is what a run executes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..distributed import all_reduce_grads
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
class StepStats:
    """What one optimizer step measured on this rank, kept on the device (reading a value back would
    make the host wait for the device at every step): the step's loss and logged metrics, each the
    share-weighted sum over its micro-batches (summed over ranks, the global step's), and the
    non-padding tokens this rank trained on."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]
    tokens: int


def train_step(model, objective: Objective, window: Sequence, opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler, params: Sequence[torch.nn.Parameter], *,
               device: torch.device, precision: str, max_grad_norm: float) -> StepStats:
    """One optimizer step over the micro-batches of `window`: forward under autocast, backward of each
    micro-batch's loss times its share of the step (its loss units over the step's: examples, pairs
    or target tokens; see Task.train_steps), gradients summed over ranks, clipped, AdamW, the schedule,
    gradients cleared. The gradient is that of the step's loss over all its examples, however it is
    split into micro-batches and ranks."""
    loss_sum: torch.Tensor | None = None
    logs_sum: dict[str, torch.Tensor] = {}
    tokens = 0
    for batch in window:
        batch = batch.to(device)
        with autocast(device, precision):
            loss, logs = objective.loss(model, batch)
        (loss * batch.share).backward()
        weighted = loss.detach().double() * batch.share  # float64 sums: the logged values do not drift with the step count
        loss_sum = weighted if loss_sum is None else loss_sum + weighted
        for k, v in logs.items():
            v = v.detach().double() * batch.share
            logs_sum[k] = logs_sum[k] + v if k in logs_sum else v
        tokens += objective.n_tokens(batch) if batch.share else 0  # a stand-in row (share 0) trains on nothing
    all_reduce_grads(params)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return StepStats(loss_sum, logs_sum, tokens)
