"""Dev evaluation inside a run: after every epoch, and of the untrained model (cached across runs)."""

from __future__ import annotations

import logging
import time

import torch

from ..config import RunConfig, cache_dir
from ..distributed import broadcast_from_main
from ..files import DamagedFile, read_json, stable_hash, write_json_atomic
from ..models import rounding_id
from ..system import format_duration
from ..tasks import Evaluation, Task

log = logging.getLogger("sftdpo")


def evaluate(task: Task, model, device: torch.device, precision: str,
             is_main: bool = True) -> tuple[dict, Evaluation | None, float]:
    """Dev metrics (`dev/...`), the evaluation itself (rank 0) and the seconds it took. Data parallel:
    rank 0 evaluates (every rank holds the same weights) and sends the metrics."""
    t0 = time.perf_counter()
    ev = task.evaluate(model, device, precision) if is_main else None
    metrics = broadcast_from_main(ev.metrics if ev else None)
    dt = time.perf_counter() - t0
    if is_main:
        log.info("evaluated %d dev examples in %s", len(task.dev), format_duration(dt))
    return {f"dev/{k}": v for k, v in metrics.items()}, ev, dt


def untrained_metrics(cfg: RunConfig, task: Task, model, device: torch.device, precision: str,
                      is_main: bool = True) -> tuple[dict, float]:
    """Dev metrics of the untrained model and the seconds spent. Every run of a study with the same
    backbone, data and decoding starts from the same function (a fresh LoRA adapter is the identity),
    so the measurement is cached instead of repeated per run."""
    key = stable_hash({"config": cfg.init_eval_key(), "source": task.source, "dev": len(task.dev),
                       "device": rounding_id(device), "eval_batch_size": cfg.eval_batch_size})
    path = cache_dir() / "init_eval" / f"{key}.json"
    cached = None
    if is_main and path.exists():
        try:
            cached = read_json(path, "computed again")
            if not isinstance(cached, dict):
                raise DamagedFile(path, "not a JSON object", "computed again")
        except DamagedFile as e:  # a cache entry: computed again
            log.warning("%s", e)
            cached = None
    cached = broadcast_from_main(cached)  # rank 0 decides: evaluate() is collective
    if cached is not None:
        return cached, 0.0
    metrics, _, dt = evaluate(task, model, device, precision, is_main)
    if is_main:
        write_json_atomic(path, metrics)
    return metrics, dt
