"""One optimizer step, the learning-rate schedule and the optimizer: the training loop and the
benchmark both call `train_step`, so what `sftdpo bench` times is what a run executes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from ..distributed import all_reduce_grads
from ..models import autocast
from ..objectives import Objective
from ..peft_methods import MethodHooks


# transformers' names for the schedules after warm-up (`--schedule`)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
# parameters without weight decay: biases and normalisation weights, transformers' Trainer rule
# (Trainer.get_decay_parameter_names; tests/test_training.py holds ours equal to it)
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up steps of a schedule over `total_steps`: transformers' TrainingArguments.get_warmup_steps."""
    return math.ceil(total_steps * warmup_ratio)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                   schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule, as TRL's trainers build it: a linear warm-up from 0 over
    warmup_steps(), then `linear` decay to 0 at total_steps, `cosine` decay to 0, or `constant`."""
    return get_scheduler(SCHEDULES[schedule], opt, num_warmup_steps=warmup_steps(total_steps, warmup_ratio),
                         num_training_steps=total_steps)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   lr_factor: Callable[[str, torch.Tensor], float] | None = None) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters (betas 0.9/0.999, eps 1e-8, transformers' defaults),
    weight decay on all but biases and normalisation weights, as transformers' Trainer does. Fused on
    every device: on CPU the fused kernel is several times faster than the multi-tensor (foreach) one and
    gives the same updates up to float rounding. `lr_factor(name, param)`: a weight's learning rate as a
    multiple of `lr` (LoRA+, peft_methods.MethodHooks)."""
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    if lr_factor is not None:  # each group split by factor
        factor = {id(p): lr_factor(n, p) for n, p in named}
        groups = [{**g, "params": [p for p in g["params"] if factor[id(p)] == k], "lr": lr * k}
                  for g in groups for k in sorted({factor[id(p)] for p in g["params"]})]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


@dataclass
class StepStats:
    """What one optimizer step measured on this rank, kept on the device (reading a value back would
    make the host wait for the device at every step): the step's loss and logged metrics, each the
    share-weighted sum over its micro-batches (summed over ranks, the global step's), the
    non-padding tokens this rank trained on, the global gradient's norm before clipping
    (TRL's `grad_norm`), and the learning rate this step's update used (what transformers' Trainer
    logs as `learning_rate`: read before the scheduler's step)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]
    tokens: int
    grad_norm: torch.Tensor
    lr: float
    # per logged metric, the summed share of the micro-batches that reported it (1 over all ranks when
    # every one did: KTO's rewards/rejected is absent from a micro-batch without undesirable examples)
    log_shares: dict[str, float] = field(default_factory=dict)


def train_step(model, objective: Objective, window: Sequence, opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler, params: Sequence[torch.nn.Parameter], *,
               device: torch.device, precision: str, max_grad_norm: float, hooks: MethodHooks | None = None) -> StepStats:
    """One optimizer step over the micro-batches of `window`: forward under autocast, backward of each
    micro-batch's loss times its share of the step (its loss units over the step's: examples, pairs
    or target tokens; see Task.train_steps), gradients summed over ranks, clipped (--max-grad-norm 0:
    not clipped), AdamW, the schedule, gradients cleared. The gradient is that of the step's loss over
    all its examples, however it is split into micro-batches and ranks. `hooks`: what the run's --param adds (AdaLoRA's regulariser
    before clipping and its rank allocation after the update; virtual tokens in the token count)."""
    loss_sum: torch.Tensor | None = None
    logs_sum: dict[str, torch.Tensor] = {}
    log_shares: dict[str, float] = {}
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
            log_shares[k] = log_shares.get(k, 0.0) + float(batch.share)
        if batch.share:  # a stand-in row (share 0) trains on nothing
            tokens += objective.n_tokens(batch) + (hooks.extra_tokens(_rows(batch)) if hooks else 0)
    all_reduce_grads(params)
    if hooks:
        hooks.before_update()
    # the norm before clipping, whether or not we clip (inf: measured, never scaled)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    lr = sched.get_last_lr()[0]  # the rate opt.step() applies now
    opt.step()
    sched.step()
    if hooks:
        hooks.after_update(sched.last_epoch - 1)  # the stage's steps before this one
    opt.zero_grad(set_to_none=True)
    return StepStats(loss_sum, logs_sum, tokens, grad_norm.detach().double(), lr, log_shares)


def _rows(batch) -> int:
    """Sequences in a micro-batch (a DPO pair batch holds its token batch)."""
    return getattr(batch, "batch", batch).input_ids.size(0)
