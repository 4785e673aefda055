"""Direct Preference Optimization: the objective the training loop runs for a run's DPO stage.

  loss.py       the DPO losses and TRL's metrics
  pairs.py      preference pairs for each task kind (label words; sampled v1/v2/v3; files), batches
  reference.py  the reference model and its cached log-probs

In the loss a response's log-probability is the sum of its tokens' log-probs or their mean
(`--logp-reduction`, default `auto`: TRL's choice, the mean for ipo, whose log-ratios TRL divides by
the response length, the sum for the other losses); the logged rewards/* and logps/* are always in
TRL's units (sums), so they compare with TRL's. Dropout is off during DPO (`train_mode = False`), so
with policy == reference at the start the loss is at its starting value and all rewards are 0.

The run directory keeps its own copy of the stage's inputs (`<run>/dpo/pairs.jsonl`,
`<run>/dpo/reference.safetensors`, `<run>/dpo/state.json`, written before the first DPO step): a run
resumed mid-DPO, whose model is no longer the reference, reuses them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ...config import RunConfig, SftdpoError
from ...data.preferences import load_preferences
from ...files import RUN_RESTARTS, DamagedFile, copy_atomic, read_json, write_json_atomic
from ...models import weights_fingerprint
from ...ops.logprobs import last_token_logits, sequence_logps
from ...tasks import Task
from .. import StageContext
from .loss import METRIC_NAMES, dpo_loss, dpo_losses, dpo_metrics
from .pairs import (PairBatch, PairSet, build_generation_pairs, collate_sequence_pairs, file_pairs, hardest_rejections,
                    label_pair_rows, label_pair_set, prompt_batch, read_pairs, sequence_pair_set, unique_prompts,
                    write_pairs)
from .reference import (cached_label_logps, cached_reference_logps, from_label_logps, load_logps, one_token_responses,
                        reference_name, save_logps)

__all__ = ["DPOObjective", "METRIC_NAMES", "build_dpo_objective", "dpo_loss"]

log = logging.getLogger("sftdpo")


class DPOObjective:
    stage = "dpo"
    train_mode = False  # dropout off: policy == reference exactly at the start

    def __init__(self, cfg: RunConfig, task: Task, ps: PairSet, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                 info: dict) -> None:
        self.cfg, self.task = cfg, task
        self.ps, self.ref_chosen, self.ref_rejected, self.info = ps, ref_chosen, ref_rejected, info
        self.one_token = one_token_responses(task)
        self.lengths = ps.lengths(self.one_token)
        self.units = ps.pairs_per_row(self.one_token)  # a pair is the loss unit
        self.chosen_len, self.rejected_len = ps.response_lengths()

    def steps(self, epoch: int) -> Iterator[list[PairBatch]]:
        """An epoch's optimizer steps over the pair rows (Task.train_steps)."""
        for step in self.task.train_steps(self.lengths, epoch, self.units):
            yield [self.batch(rows, share) for rows, share in step]

    def batch(self, rows: list[int], share: float = 1.0) -> PairBatch:
        idx = torch.tensor(rows)
        refs = (self.ref_chosen[idx], self.ref_rejected[idx], self.chosen_len[idx], self.rejected_len[idx])
        if self.one_token:
            b, chosen, rejected, mask = prompt_batch(self.task, self.ps, rows)
            pb = PairBatch(b, refs[0], refs[1][:, : rejected.size(1)], *refs[2:], chosen, rejected, mask)
        else:
            pb = PairBatch(collate_sequence_pairs(self.ps, rows, self.task.pad_id), *refs)
        pb.batch.share = share
        return pb

    def n_steps(self) -> int:
        return self.task.n_train_steps(len(self.ps))

    def policy_logps(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's summed log-probs of each pair row's chosen and rejected responses: (B,), and
        (B, R) for one-token responses (one forward pass per prompt), else (B,)."""
        if self.one_token:
            logp = torch.log_softmax(last_token_logits(model, batch.batch), dim=-1)
            return logp.gather(1, batch.chosen[:, None]).squeeze(1), logp.gather(1, batch.rejected)
        lp = sequence_logps(model, batch.batch, "sum")
        b = batch.ref_chosen.size(0)
        return lp[:b], lp[b:]

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        pc, pr = self.policy_logps(model, batch)
        rc, rr = batch.ref_chosen, batch.ref_rejected
        if self.one_token:  # every (prompt, rejected label) slot that is a pair, flattened
            keep = batch.mask
            pc, rc = pc[:, None].expand_as(pr)[keep], rc[:, None].expand_as(rr)[keep]
            pr, rr = pr[keep], rr[keep]
        metrics = dpo_metrics(pc, pr, rc, rr, self.cfg.beta)  # TRL's units: sums
        if self.cfg.loss_logp_reduction == "mean" and not self.one_token:
            pc, rc = pc / batch.chosen_len, rc / batch.chosen_len
            pr, rr = pr / batch.rejected_len, rr / batch.rejected_len
        losses = dpo_losses(pc, pr, rc, rr, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing)
        return losses.mean(), metrics

    def n_tokens(self, batch: PairBatch) -> int:
        return batch.n_tokens

    def describe(self) -> dict:
        return {"objective": "dpo", "loss_type": self.cfg.loss_type, "beta": self.cfg.beta,
                "label_smoothing": self.cfg.label_smoothing, "logp_reduction": self.cfg.loss_logp_reduction, **self.info}


# -- building the stage --------------------------------------------------------------------------

def build_dpo_objective(ctx: StageContext) -> DPOObjective:
    """The DPO stage's objective: pairs and reference log-probs, persisted in <run>/dpo/ before the
    first DPO step, and taken from there when the run resumes."""
    cfg, model = ctx.cfg, ctx.model
    if cfg.param == "lora" and not hasattr(model, "disable_adapter"):
        raise SftdpoError("--param lora but the model has no PEFT adapter: cannot build the DPO reference")
    adapter_disabled = cfg.param == "lora" and cfg.sft_epochs == 0
    dpo_dir = Path(ctx.out) / "dpo"
    resumed, mid_dpo = ctx.resumed_epoch, ctx.resumed_epoch is not None and ctx.resumed_epoch > cfg.sft_epochs
    # a damaged file of <run>/dpo/: at the hand-off the model is the reference, and they are rebuilt from it;
    # inside the stage the model has trained on since, and the run starts again (files.RUN_RESTARTS)
    fix = RUN_RESTARTS if mid_dpo else REBUILT
    saved = _read_state(dpo_dir, fix)
    if mid_dpo and saved is None:  # the reference (the model at the hand-off) cannot be rebuilt from the weights now
        raise DamagedFile(dpo_dir / "state.json", f"missing, and the run resumes after epoch {resumed}, inside the "
                                                  "DPO stage", RUN_RESTARTS)
    fingerprint = None
    if saved is not None and resumed is not None and not mid_dpo:
        # at the hand-off the current weights ARE the reference: the saved state must be theirs
        fingerprint = weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled)
        if saved.get("fingerprint") != fingerprint:
            log.warning("%s was written for other reference weights (a restarted run?); rebuilding it", dpo_dir)
            saved = None
    if saved is not None:
        try:
            return _from_run_dir(ctx, dpo_dir, saved, fix)
        except DamagedFile as e:
            if fix == RUN_RESTARTS:
                raise
            log.warning("%s", e)
    return _fresh(ctx, dpo_dir, fingerprint or weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled),
                  adapter_disabled)


def _fresh(ctx: StageContext, dpo_dir: Path, fingerprint: str, adapter_disabled: bool) -> DPOObjective:
    """Build the pairs, get the reference log-probs (cache or computed), persist both in the run dir."""
    cfg, task, model = ctx.cfg, ctx.task, ctx.model
    info: dict[str, Any] = {"reference": reference_name(cfg), "reference_fingerprint": fingerprint,
                            "adapter_disabled": adapter_disabled, "pairs_file": str(dpo_dir / "pairs.jsonl")}
    t0 = time.perf_counter()
    pairs_cache = None
    reference = model  # the model at the hand-off (for LoRA DPO-only: with its adapter disabled, below)
    if one_token_responses(task):  # one pass over the prompts gives every label's log-prob: pairs and reference
        m, cache = cached_label_logps(reference, task, cfg, ctx.device, ctx.precision, fingerprint=fingerprint,
                                      adapter_disabled=adapter_disabled, write=ctx.is_main)
        ps = label_pair_set(task, hardest_rejections(task, m) if cfg.pairs == "hardest" else None)
        ref_c, ref_r = from_label_logps(task, ps, m)
        rows = label_pair_rows(task, ps)
        info.update({"pairs": len(rows), "prompts": len(ps), "pairs_version": cfg.pairs if task.name != "paraphrase" else "v1",
                     "pairs_source": "train examples: chosen = the gold label word, rejected = "
                                     + ("the strongest wrong one" if cfg.pairs == "hardest" else "each other label word")})
    else:
        if cfg.pairs.startswith("file:"):
            rows = file_pairs(task, load_preferences(cfg.pairs.removeprefix("file:"), cfg.train_split))
            info.update({"pairs_version": "file", "pairs_source": cfg.pairs})
        else:
            rows, pairs_cache = build_generation_pairs(task, model, cfg, ctx.device, ctx.precision,
                                                       fingerprint=fingerprint, adapter_disabled=adapter_disabled,
                                                       write=ctx.is_main)
            try:
                header = read_pairs(pairs_cache, "generating them again")[0]
            except (OSError, DamagedFile):  # another rank's copy, being rewritten
                header = {}
            info.update({"pairs_version": cfg.pairs, "pairs_cache": str(pairs_cache), "pairs_top_k": header.get("top_k"),
                         "pairs_generated": header.get("generated_pairs", len(rows))})
        ps = sequence_pair_set(task, rows)
        info.update({"pairs": len(ps), "unique_prompts": unique_prompts(rows), "train_prompts": len(task.pair_examples)})
        ref_c, ref_r, cache = cached_reference_logps(reference, task, ps, cfg, ctx.device, ctx.precision,
                                                     fingerprint=fingerprint, adapter_disabled=adapter_disabled,
                                                     write=ctx.is_main)
    if not cache["reference_cache_hit"]:
        log.info("DPO reference log-probs (%s) for %d pairs in %.1f s", info["reference"], info["pairs"],
                 time.perf_counter() - t0)
    key_fields = cache.pop("key_fields")
    info.update({**cache, "data_hash": ps.data_hash()})
    if ctx.is_main:  # persist before the first DPO step; state.json last (its presence = complete)
        if pairs_cache is None:
            write_pairs(dpo_dir / "pairs.jsonl", {"task": task.name, "pairs": info["pairs"], "data_hash": ps.data_hash()},
                        rows)
        else:
            copy_atomic(pairs_cache, dpo_dir / "pairs.jsonl")
        save_logps(dpo_dir / "reference.safetensors", ref_c, ref_r, key_fields)
        write_json_atomic(dpo_dir / "state.json", {**info, "fingerprint": fingerprint, "key_fields": key_fields})
    return DPOObjective(cfg, task, ps, ref_c, ref_r, info)


REBUILT = "rebuilt from the model at the hand-off"


def _read_state(dpo_dir: Path, fix: str) -> dict | None:
    """<run>/dpo/state.json, or None when there is none (or, where it can be rebuilt, a damaged one:
    said in one line)."""
    state = dpo_dir / "state.json"
    if not state.exists():
        return None
    try:
        saved = read_json(state, fix)
        if not isinstance(saved, dict):
            raise DamagedFile(state, "not a JSON object", fix)
    except DamagedFile as e:
        if fix == RUN_RESTARTS:
            raise
        log.warning("%s", e)
        return None
    return saved


def _from_run_dir(ctx: StageContext, dpo_dir: Path, saved: dict, fix: str) -> DPOObjective:
    """The pairs and reference log-probs saved in the run directory (a resumed run)."""
    cfg, task = ctx.cfg, ctx.task
    reference = reference_name(cfg)
    if saved.get("reference") != reference:
        raise SftdpoError(f"{dpo_dir}/state.json names reference {saved.get('reference')!r}, this run needs {reference!r}")
    rows = read_pairs(dpo_dir / "pairs.jsonl", fix)[1]
    if one_token_responses(task):  # the rejected labels chosen at the hand-off (hardest), row by row
        rejected: list[list[int]] = [[] for _ in task.train]
        for r in rows:
            rejected[r["prompt_index"]].append(r["rejected_id"])
        ps = label_pair_set(task, rejected)
    else:
        ps = sequence_pair_set(task, rows)
    if ps.data_hash() != saved.get("data_hash"):
        raise SftdpoError(f"the DPO pairs of this run no longer match {dpo_dir} (data or tokenizer changed); use a new --out")
    kf = saved.get("key_fields", {})
    if kf.get("precision") != ctx.precision or kf.get("device") != ctx.device.type:
        raise SftdpoError(f"{dpo_dir} holds reference log-probs computed as {kf.get('reduction')} on "
                          f"{kf.get('device')} in {kf.get('precision')}; this run needs sums on {ctx.device.type} in "
                          f"{ctx.precision}: resume it where it started, or use a new --out")
    ref_c, ref_r = load_logps(dpo_dir / "reference.safetensors", fix)
    if ref_c.size(0) != len(ps) or ref_r.size(0) != len(ps):
        raise SftdpoError(f"{dpo_dir}/reference.safetensors has {ref_c.size(0)} rows for {len(ps)} pair rows")
    log.info("DPO: reusing the pairs and reference log-probs saved in %s", dpo_dir)
    info = {k: v for k, v in saved.items() if k not in ("fingerprint", "key_fields")}
    info["reused_from_run_dir"] = True
    return DPOObjective(cfg, task, ps, ref_c, ref_r, info)
