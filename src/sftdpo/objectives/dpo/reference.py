"""The DPO reference model: which one a run uses, and its log-probs of every pair, computed once.

DPO-only: the pretrained backbone (FFT) or, with LoRA, the same network with the adapter disabled
(`model.disable_adapter()`). SFT@k->DPO: the model (FFT) or the SFT adapter (LoRA; training
continues on the same adapter) at the hand-off. The reference log-probs of every pair are computed
ONCE before the DPO stage (eval mode, no grad, the run's autocast precision), summed over each
response's tokens (a mean divides by the response length), so training has no reference forward
pass. They are cached under `<cache>/reflogps/<key>.safetensors`; the key covers the model name, a
fingerprint of the reference weights, the pairs' token ids, and the device type and precision they
were computed with.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...config import RunConfig, cache_dir
from ...files import atomic_path, stable_hash
from ...models import autocast
from ...ops.batching import bucketed_batches
from ...ops.logprobs import next_token_logps, sequence_logps
from ...tasks import Task
from .pairs import CACHE_VERSION, PairSet, collate_sequence_pairs, prompt_batch

log = logging.getLogger("sftdpo")


def reference_name(cfg: RunConfig) -> str:
    k = cfg.sft_epochs
    if cfg.param == "lora":
        return "adapter-disabled base" if k == 0 else f"SFT adapter at hand-off epoch {k}"
    return "pretrained backbone (FFT)" if k == 0 else f"SFT model at hand-off epoch {k}"


def one_token_responses(task: Task) -> bool:
    """Whether the task's pairs are one-token answers read from the prompt's last position."""
    return task.name == "paraphrase"


@torch.no_grad()
def compute_reference_logps(model, task: Task, ps: PairSet, cfg: RunConfig, device: torch.device, precision: str, *,
                            adapter_disabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every pair's chosen and rejected response under the reference: eval mode
    (no dropout), no grad, the run's autocast precision; the adapter disabled if asked."""
    was_training = model.training
    model.eval()
    n = len(ps)
    chosen, rejected = torch.empty(n), torch.empty(n)
    one_token = one_token_responses(task)
    bs = cfg.eval_batch_size if one_token else cfg.batch_size
    try:
        with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
            for rows in bucketed_batches(ps.lengths(one_token), bs, 0, shuffle=False):
                idx = torch.tensor(rows)
                if one_token:
                    b, ch, rj = prompt_batch(task, ps, rows)
                    with autocast(device, precision):
                        c, r = next_token_logps(model, b.to(device), ch, rj)
                else:
                    b = collate_sequence_pairs(ps, rows, task.pad_id).to(device)
                    with autocast(device, precision):
                        lp = sequence_logps(model, b, "sum")
                    c, r = lp[: len(rows)], lp[len(rows):]
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    finally:
        model.train(was_training)
    return chosen, rejected


def save_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, meta: dict) -> None:
    with atomic_path(path) as tmp:
        save_file({"chosen": chosen.float().contiguous().cpu(), "rejected": rejected.float().contiguous().cpu()}, str(tmp),
                  metadata={"key": json.dumps(meta, sort_keys=True, default=str)})


def load_logps(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    sd = load_file(str(path))
    return sd["chosen"], sd["rejected"]


def reference_key(cfg: RunConfig, task: Task, fingerprint: str, ps: PairSet, device: torch.device,
                  precision: str) -> dict:
    """What the reference log-probs depend on. No adapter flag: a disabled LoRA layer runs its base
    layer alone, so the adapter-disabled base and the plain backbone (same fingerprint) share them."""
    return {"cache_version": CACHE_VERSION, "task": task.name, "model": cfg.model, "weights": fingerprint,
            "data": ps.data_hash(), "reduction": "sum", "precision": precision, "device": device.type}


def cached_reference_logps(model, task: Task, ps: PairSet, cfg: RunConfig, device: torch.device, precision: str, *,
                           fingerprint: str, adapter_disabled: bool,
                           write: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The reference log-probs from the cache, else computed (and cached); plus what the cache did."""
    key_fields = reference_key(cfg, task, fingerprint, ps, device, precision)
    key = stable_hash(key_fields, 24)
    path = cache_dir() / "reflogps" / f"{key}.safetensors"
    if path.exists():
        try:
            ref_c, ref_r = load_logps(path)
            if ref_c.numel() == len(ps) == ref_r.numel():
                log.info("DPO reference log-probs: reusing %s", path)
                return ref_c, ref_r, {"reference_key": key, "reference_cache": str(path), "reference_cache_hit": True,
                                      "key_fields": key_fields}
        except Exception as e:  # noqa: BLE001 - a broken cache file is recomputed
            log.warning("unreadable reference cache %s (%s); recomputing", path, e)
    ref_c, ref_r = compute_reference_logps(model, task, ps, cfg, device, precision, adapter_disabled=adapter_disabled)
    if write:
        save_logps(path, ref_c, ref_r, key_fields)
    return ref_c, ref_r, {"reference_key": key, "reference_cache": str(path), "reference_cache_hit": False,
                          "key_fields": key_fields}
