"""Data-parallel training: one process per GPU (or per CPU process, with gloo), launched by
`torchrun --nproc-per-node N -m sftdpo.cli train ...` or `accelerate launch`, every rank holding the
whole model. One process (no launcher, or WORLD_SIZE=1) runs exactly as before: every helper below
is then the identity.

How a run is split:

  Batches   every rank computes the same global batch order (tasks.bucketed_batches with the epoch
            seed) with global batches of batch_size x world_size rows, and takes rows rank,
            rank + W, ... of each (`shard`). The effective batch (batch_size x grad_accum x
            world_size) and the sample order are those of one process with batch_size x world_size.
  Gradients each rank scales its loss by its share of the global batch's loss: its loss units over
            the batch's units, where a unit is what the loss averages over (an example or a pair; a
            target token for sonnet SFT). Summed over ranks (`all_reduce_grads`, once per optimizer
            step, before clipping), the gradients are those of the global batch's mean loss,
            also for an uneven last batch. A rank left without rows (a last batch shorter than
            world_size) runs a stand-in row with share 0, so every rank takes the same steps.
            The model is not wrapped in DistributedDataParallel: the task losses call
            model.get_decoder() and model.get_output_embeddings(), which would bypass DDP's forward;
            the explicit all-reduce is DDP's gradient averaging without its overlap with backward.
  Metrics   the logged loss and DPO metrics are the global batch's (share-weighted sums over the
            ranks); token counts are summed.
  Evaluation rank 0 evaluates (all ranks hold the same weights) and sends the metrics to the others:
            dev metrics are computed exactly as in one process.
  Files     only rank 0 writes (config, metrics, checkpoints, summary, outputs). The DPO stage's
            pairs and reference log-probs are built by rank 0 and written to <run>/dpo/; the other
            ranks read them after a barrier. Every rank loads the checkpoint on resume.
  Random    every rank seeds from the run seed, so dropout masks come from the same stream on every
            rank (as after a resume, which restores rank 0's RNG state on all ranks).

Equivalence: in fp32 a run on N ranks matches one process with batch_size x N to float rounding
(padding widths and summation order differ); tests/test_distributed.py checks 2 gloo ranks against
one process at 1e-4 relative on losses, with dropout off (masks cannot match across batch shapes).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("sftdpo")

# rank 0 alone builds DPO pairs (sonnet generation) and evaluates while the others wait
TIMEOUT = datetime.timedelta(hours=2)


def init_from_env() -> dict:
    """{"rank", "world_size"} for training.Run when launched with WORLD_SIZE > 1 (torchrun and
    accelerate set RANK, WORLD_SIZE, LOCAL_RANK): the process group is initialised (nccl for CUDA
    tensors, gloo for CPU ones) and the CUDA device set from LOCAL_RANK. {} in one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return {}
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if not dist.is_initialized():
        if 0 < local_world_size <= torch.cuda.device_count():  # a GPU per rank (else all gloo, all alike)
            torch.cuda.set_device(local_rank)
            # gloo too, for CPU tensors (object broadcasts, a --device cpu run on a GPU machine)
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    if rank != 0:  # one copy of the log: rank 0's
        log.setLevel(logging.WARNING)
    return {"rank": rank, "world_size": world_size}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(global_batches: Sequence[Sequence[int]], rank: int, world_size: int, units: Sequence[int] | None = None,
          total: float | None = None) -> list[tuple[list[int], float]]:
    """(rows, share) for this rank of each global batch: rows rank, rank + W, ... (strided, so the
    length-sorted rows of a bucketed batch spread evenly) and this rank's share of the loss, counted
    in `units` per row (None: one per row), relative to the batch's own units or, with `total`, to
    `total` units (the global batches of one optimizer step: gradient accumulation). A rank without
    rows gets the batch's first row as a stand-in with share 0. One process, no `total`: every batch
    whole, share 1.0."""
    count = len if units is None else (lambda rows: sum(units[i] for i in rows))
    out = []
    for rows in global_batches:
        mine = list(rows) if world_size == 1 else list(rows[rank::world_size])
        denom = count(rows) if total is None else total
        if not mine:
            out.append((list(rows[:1]), 0.0))
        else:
            out.append((mine, count(mine) / denom if denom else 0.0))
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks (each rank's loss was already scaled by its share), as one
    flat buffer. A parameter without a gradient on this rank contributes zeros."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over ranks (each rank's loss and metrics are already weighted by its share of
    the step, so the sum is the global step's); `values` itself in one process."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable); `obj` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
