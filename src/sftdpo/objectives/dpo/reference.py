"""The reference model (DPO, KTO): which one a run uses, and its log-probs of every pair, computed once.

DPO-only: the pretrained backbone (FFT, BitFit, LN) or, with an adapter, the same network with the
adapter disabled (`model.disable_adapter()`; PiSSA/OLoRA, whose base holds a residual, use the model at
its start, the pretrained weights split in two). SFT@k->DPO: the model (FFT) or the SFT adapter
(training continues on the same adapter) at the hand-off. The reference log-probs of every pair are computed
ONCE before the DPO stage (eval mode, no grad, the run's autocast precision), summed over each
response's tokens (a mean divides by the response length), so training has no reference forward
pass. They are cached under `<cache>/reflogps/<key>.safetensors`; the key covers the model name, a
fingerprint of the reference weights, the pairs' token ids, the reduction (sums, or LD-DPO's
weighted sums with --ld-alpha), and the device (models.rounding_id) and precision they were computed with.
SimPO, CPO and ORPO have no reference (`reference_name` says so) and never compute one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...config import ADAPTER_PARAMS, DISABLED_ADAPTER_REFERENCE_PARAMS, RunConfig, cache_dir
from ...files import DamagedFile, atomic_path, hash_id_lists, stable_hash
from ...models import autocast, rounding_id, save_tensors
from ...ops.batching import bucketed_batches
from ...ops.logprobs import last_token_logits
from ...tasks import Task
from .pairs import CACHE_VERSION, PairSet, collate_sequence_pairs, one_token_responses
from .policy import response_logps

log = logging.getLogger("sftdpo")


def reference_name(cfg: RunConfig) -> str:
    if cfg.reference_free:
        return f"none ({cfg.objective} is reference-free)"
    k = cfg.sft_epochs
    if cfg.param in ADAPTER_PARAMS:
        if k:
            return f"SFT adapter at hand-off epoch {k}"
        return ("adapter-disabled base" if cfg.param in DISABLED_ADAPTER_REFERENCE_PARAMS
                else f"{cfg.param} adapter at its initialisation (the pretrained weights, split)")
    return (f"pretrained backbone ({'FFT' if cfg.param == 'fft' else cfg.param})" if k == 0
            else f"SFT model at hand-off epoch {k}")


@torch.no_grad()
def label_logps(model, task: Task, device: torch.device, precision: str, *, adapter_disabled: bool) -> torch.Tensor:
    """(n train examples, N labels): log p(label word | prompt) of every label (task.label_ids order) at
    every training prompt, one forward pass per prompt: eval mode, no grad, the run's autocast
    precision; the adapter disabled if asked."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(task.train_ids), len(task.label_ids))
    labels = torch.tensor(task.label_ids, device=device)
    try:
        with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
            for rows in bucketed_batches([len(p) for p in task.train_ids], task.cfg.eval_batch_size, 0, shuffle=False):
                b = task.collate(rows).to(device)
                with autocast(device, precision):
                    logp = torch.log_softmax(last_token_logits(model, b), dim=-1)
                out[torch.tensor(rows)] = logp[:, labels].float().cpu()
    finally:
        model.train(was_training)
    return out


def from_label_logps(task: Task, ps: PairSet, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (n,), rejected (n, R)) of one-token pair rows from the label log-prob matrix; the
    padding slots of rejected (rows with fewer pairs) hold the chosen value and are masked in the loss."""
    col = {t: j for j, t in enumerate(task.label_ids)}
    width = max(len(r) for r in ps.rejected)
    chosen = torch.tensor([m[i, col[c[0]]].item() for i, c in enumerate(ps.chosen)])
    rejected = torch.tensor([[m[i, col[t]].item() for t in r] + [chosen[i].item()] * (width - len(r))
                             for i, r in enumerate(ps.rejected)])
    return chosen, rejected


@torch.no_grad()
def compute_reference_logps(model, task: Task, ps: PairSet, cfg: RunConfig, device: torch.device, precision: str, *,
                            adapter_disabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (LD-weighted with --ld-alpha) of every pair's chosen and rejected response under
    the reference: eval mode (no dropout), no grad, the run's autocast precision; the adapter disabled if
    asked. One-token responses: chosen (n,) and rejected (n, R)."""
    if one_token_responses(task):
        return from_label_logps(task, ps, label_logps(model, task, device, precision, adapter_disabled=adapter_disabled))
    was_training = model.training
    model.eval()
    n = len(ps)
    chosen, rejected = torch.empty(n), torch.empty(n)
    try:
        with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
            for rows in bucketed_batches(ps.lengths(False), cfg.batch_size, 0, shuffle=False):
                idx = torch.tensor(rows)
                b = collate_sequence_pairs(ps, rows, task.pad_id).to(device)
                with autocast(device, precision):
                    lp = response_logps(model, b, len(rows), cfg.ld_alpha)
                chosen[idx], rejected[idx] = lp[: len(rows)].float().cpu(), lp[len(rows):].float().cpu()
    finally:
        model.train(was_training)
    return chosen, rejected


def save_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, meta: dict) -> None:
    with atomic_path(path) as tmp:
        save_tensors({"chosen": chosen.float().contiguous().cpu(), "rejected": rejected.float().contiguous().cpu()}, tmp,
                     metadata={"key": json.dumps(meta, sort_keys=True, default=str)})


def load_logps(path: Path, fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs saved by save_logps; DamagedFile (with `fix`, what to do) when the
    file cannot be read back."""
    try:
        sd = load_file(str(path))
        return sd["chosen"], sd["rejected"]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a truncated file
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise DamagedFile(path, f"{type(e).__name__}: {first[:120]}", fix) from None


def _cached(key_fields: dict, n: int, compute, write: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(chosen, rejected, what the cache did) from <cache>/reflogps/<key>.safetensors, else computed and kept."""
    key = stable_hash(key_fields, 24)
    path = cache_dir() / "reflogps" / f"{key}.safetensors"
    if path.exists():
        try:
            a, b = load_logps(path, "computing them again")
            if a.size(0) == n == b.size(0):
                log.info("DPO reference log-probs: reusing %s", path)
                return a, b, {"reference_key": key, "reference_cache": str(path), "reference_cache_hit": True,
                              "key_fields": key_fields}
            log.warning("%s holds %d rows for %d pairs: computing them again", path, a.size(0), n)
        except DamagedFile as e:  # a cache entry: computed again
            log.warning("%s", e)
    a, b = compute()
    if write:
        save_logps(path, a, b, key_fields)
    return a, b, {"reference_key": key, "reference_cache": str(path), "reference_cache_hit": False,
                  "key_fields": key_fields}


def reference_key(cfg: RunConfig, task: Task, fingerprint: str, ps: PairSet, device: torch.device,
                  precision: str) -> dict:
    """What the reference log-probs of sequence pairs depend on. No adapter flag: a disabled LoRA layer
    runs its base layer alone, so the adapter-disabled base and the plain backbone (same fingerprint)
    share them."""
    reduction = "sum" if cfg.ld_alpha is None else f"ld_alpha={cfg.ld_alpha!r}"
    return {"cache_version": CACHE_VERSION, "task": task.name, "model": cfg.model, "weights": fingerprint,
            "data": ps.data_hash(), "reduction": reduction, "precision": precision, "device": rounding_id(device)}


def cached_label_logps(model, task: Task, cfg: RunConfig, device: torch.device, precision: str, *, fingerprint: str,
                       adapter_disabled: bool, write: bool = True) -> tuple[torch.Tensor, dict]:
    """The label log-prob matrix of a classification task's training prompts, from the cache or computed."""
    key_fields = {"cache_version": CACHE_VERSION, "kind": "label-logps", "model": cfg.model, "weights": fingerprint,
                  "prompts": hash_id_lists(task.train_ids), "labels": list(task.label_ids), "reduction": "sum",
                  "precision": precision, "device": rounding_id(device)}

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        m = label_logps(model, task, device, precision, adapter_disabled=adapter_disabled)
        return m, torch.zeros(m.size(0))

    m, _, info = _cached(key_fields, len(task.train_ids), compute, write)
    return m, info


def cached_reference_logps(model, task: Task, ps: PairSet, cfg: RunConfig, device: torch.device, precision: str, *,
                           fingerprint: str, adapter_disabled: bool,
                           write: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The reference log-probs of `ps` from the cache, else computed (and cached); plus what the cache did."""
    if one_token_responses(task):
        m, info = cached_label_logps(model, task, cfg, device, precision, fingerprint=fingerprint,
                                     adapter_disabled=adapter_disabled, write=write)
        return (*from_label_logps(task, ps, m), info)
    key_fields = reference_key(cfg, task, fingerprint, ps, device, precision)
    return _cached(key_fields, len(ps), lambda: compute_reference_logps(
        model, task, ps, cfg, device, precision, adapter_disabled=adapter_disabled), write)
