"""Direct Preference Optimization, and what every preference objective's stage shares.

  loss.py       the DPO losses (TRL's 15 loss types, multi-loss, f-divergences, LD-DPO, WPO) and TRL's metrics
  pairs.py      preference pairs for each task kind (label words; sampled v1/v2/v3; files), batches
  policy.py     the policy's log-probs of a batch of pairs; PairObjective, the pair objectives' batching
  reference.py  the reference model and its cached log-probs

`build_pair_stage` builds the stage's inputs for any pair objective (DPO here; CPO/SimPO and ORPO,
objectives/cpo.py and orpo.py, without a reference): the pairs and, where the objective has one, the
reference log-probs, persisted in the run directory (`<run>/dpo/pairs.jsonl`,
`<run>/dpo/reference.safetensors`, `<run>/dpo/state.json`, written before the first step) so a run
resumed mid-stage, whose model is no longer the one at the hand-off, reuses them (`stage_inputs`
decides between fresh and saved inputs; KTO, objectives/kto.py, uses it too).

In DPO's loss a response's log-probability is the sum of its tokens' log-probs; TRL's ipo and
sigmoid_norm divide each response's score by its length (`--logp-reduction auto`); `sum` and `mean`
override (mean: every log-prob divided by its length first). The logged rewards/* and logps/* are
always in TRL's units (sums), so they compare with TRL's. Dropout is off (`train_mode = False`), so
with policy == reference at the start the loss is at its starting value and all rewards are 0.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ...config import ADAPTER_PARAMS, DISABLED_ADAPTER_REFERENCE_PARAMS, SftdpoError
from ...data.preferences import load_preferences
from ...files import RUN_RESTARTS, DamagedFile, copy_atomic, read_json, write_json_atomic
from ...models import rounding_id, rounding_kind, weights_fingerprint
from .. import StageContext
from .loss import METRIC_NAMES, combined_loss, dpo_loss, dpo_metrics
from .pairs import (PairBatch, PairSet, build_generation_pairs, file_pairs, hardest_rejections, label_pair_rows,
                    label_pair_set, one_token_responses, read_pairs, sequence_pair_set, unique_prompts, write_pairs)
from .policy import PairObjective, PolicyLogps
from .reference import (cached_label_logps, cached_reference_logps, from_label_logps, label_logps, load_logps,
                        reference_name, save_logps)

__all__ = ["DPOObjective", "METRIC_NAMES", "build_dpo_objective", "build_pair_stage", "dpo_loss", "stage_inputs"]

log = logging.getLogger("sftdpo")


class DPOObjective(PairObjective):
    """DPO against the cached reference log-probs: TRL's DPOTrainer loss (loss.py) on the policy's
    log-probs of each batch."""

    def __init__(self, cfg, task, ps: PairSet, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, info: dict) -> None:
        super().__init__(cfg, task, ps, ref_chosen, ref_rejected, info)

    def policy_logps(self, model, batch: PairBatch, **kw) -> PolicyLogps:
        cfg = self.cfg
        return super().policy_logps(model, batch, ld_alpha=cfg.ld_alpha, wpo=cfg.use_weighting, **kw)

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        lp = self.policy_logps(model, batch)
        rc, rr = self.pair_refs(batch)
        metrics = dpo_metrics(lp.chosen, lp.rejected, rc, rr, cfg.beta)  # TRL's units: sums
        pc, pr, nc, nr = lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len
        if cfg.logp_reduction == "mean":
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        lengths = {"chosen_len": nc, "rejected_len": nr} if cfg.logp_reduction == "auto" else {}
        loss = combined_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_types, cfg.label_smoothing, loss_weights=cfg.loss_weights,
                             weights=lp.wpo_weights(), sft_logps=lp.chosen_plain, sft_tokens=lp.chosen_len,
                             f_divergence_type=cfg.f_divergence_type,
                             f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, discopop_tau=cfg.discopop_tau, **lengths)
        return loss, metrics

    def describe(self) -> dict:
        cfg = self.cfg
        return {"objective": "dpo", "loss_type": cfg.loss_type, "loss_weights": cfg.loss_weights, "beta": cfg.beta,
                "label_smoothing": cfg.label_smoothing, "logp_reduction": cfg.loss_logp_reduction,
                "ld_alpha": cfg.ld_alpha, "f_divergence_type": cfg.f_divergence_type, "use_weighting": cfg.use_weighting,
                **self.info}


# -- building the stage --------------------------------------------------------------------------

# make(ps, ref_chosen, ref_rejected, info): the objective over a pair set (refs None without a reference)
MakePairObjective = Callable[[PairSet, "torch.Tensor | None", "torch.Tensor | None", dict], Any]


def build_dpo_objective(ctx: StageContext) -> DPOObjective:
    """The DPO stage's objective: pairs and reference log-probs (build_pair_stage)."""
    return build_pair_stage(ctx, lambda ps, rc, rr, info: DPOObjective(ctx.cfg, ctx.task, ps, rc, rr, info))


def build_pair_stage(ctx: StageContext, make: MakePairObjective, *, reference: bool = True):
    """A pair objective's stage: its pairs and, with `reference`, the reference log-probs, persisted in
    <run>/dpo/ before the first step and taken from there when the run resumes."""
    return stage_inputs(
        ctx, lambda dpo_dir, ref_model, fingerprint, adapter_disabled: _fresh(
            ctx, dpo_dir, ref_model, fingerprint, adapter_disabled, make, reference),
        lambda dpo_dir, saved, fix: _from_run_dir(ctx, dpo_dir, saved, fix, make, reference))


def stage_inputs(ctx: StageContext, fresh: Callable[[Path, Any, str, bool], Any], saved_inputs: Callable[[Path, dict, str], Any]):
    """The preference stage's objective from fresh inputs (`fresh(dpo_dir, reference model, weights
    fingerprint, adapter_disabled)`: built from the model at the hand-off) or from those saved in
    <run>/dpo/ (`saved_inputs(dpo_dir, state, fix)`; DamagedFile with `fix` for a damaged file): saved
    ones when the run resumes inside the stage, or at the hand-off with the saved state written for
    these very weights."""
    cfg, model = ctx.cfg, ctx.model
    if cfg.param in ADAPTER_PARAMS and not hasattr(model, "disable_adapter"):
        raise SftdpoError(f"--param {cfg.param} but the model has no PEFT adapter: cannot build the preference stage's "
                          "reference or pairs")
    adapter_disabled = cfg.param in DISABLED_ADAPTER_REFERENCE_PARAMS and cfg.sft_epochs == 0
    dpo_dir = Path(ctx.out) / "dpo"
    resumed, mid_dpo = ctx.resumed_epoch, ctx.resumed_epoch is not None and ctx.resumed_epoch > cfg.sft_epochs
    # a damaged file of <run>/dpo/: at the hand-off the model is the reference, and they are rebuilt from it;
    # inside the stage the model has trained on since, and the run starts again (files.RUN_RESTARTS)
    fix = RUN_RESTARTS if mid_dpo else REBUILT
    saved = _read_state(dpo_dir, fix)
    if mid_dpo and saved is None:  # the reference (the model at the hand-off) cannot be rebuilt from the weights now
        raise DamagedFile(dpo_dir / "state.json", f"missing, and the run resumes after epoch {resumed}, inside the "
                                                  f"preference stage (--objective {cfg.objective})", RUN_RESTARTS)
    fingerprint = None
    if saved is not None and resumed is not None and not mid_dpo:
        # at the hand-off the current weights ARE the reference: the saved state must be theirs
        fingerprint = weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled)
        if saved.get("fingerprint") != fingerprint:
            log.warning("%s was written for other reference weights (a restarted run?); rebuilding it", dpo_dir)
            saved = None
    if saved is not None:
        try:
            return saved_inputs(dpo_dir, saved, fix)
        except DamagedFile as e:
            if fix == RUN_RESTARTS:
                raise
            log.warning("%s", e)
    reference = model  # the model at the hand-off (for an adapter's DPO-only: with it disabled, below)
    return fresh(dpo_dir, reference, fingerprint or weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled),
                 adapter_disabled)


def _fresh(ctx: StageContext, dpo_dir: Path, reference, fingerprint: str, adapter_disabled: bool,
           make: MakePairObjective, with_reference: bool):
    """Build the pairs, get the reference log-probs (cache or computed; none for a reference-free
    objective), persist both in the run dir."""
    cfg, task, model = ctx.cfg, ctx.task, ctx.model
    info: dict[str, Any] = {"reference": reference_name(cfg), "reference_fingerprint": fingerprint if with_reference else None,
                            "adapter_disabled": adapter_disabled, "pairs_file": str(dpo_dir / "pairs.jsonl")}
    t0 = time.perf_counter()
    pairs_cache = None
    ref_c = ref_r = None
    cache: dict[str, Any] = {"key_fields": {"precision": ctx.precision, "device": rounding_id(ctx.device)}}
    if one_token_responses(task):  # one pass over the prompts gives every label's log-prob: pairs and reference
        m = None
        if with_reference:
            m, cache = cached_label_logps(reference, task, cfg, ctx.device, ctx.precision, fingerprint=fingerprint,
                                          adapter_disabled=adapter_disabled, write=ctx.is_main)
        elif cfg.pairs == "hardest":  # the model's label log-probs pick the pairs (no reference: nothing cached)
            m = label_logps(model, task, ctx.device, ctx.precision, adapter_disabled=adapter_disabled)
        ps = label_pair_set(task, hardest_rejections(task, m) if cfg.pairs == "hardest" else None)
        if with_reference:
            ref_c, ref_r = from_label_logps(task, ps, m)
        rows = label_pair_rows(task, ps)
        info.update({"pairs": len(rows), "prompts": len(ps), "pairs_version": cfg.pairs if task.name != "paraphrase" else "v1",
                     "pairs_source": "train examples: chosen = the gold label word, rejected = "
                                     + ("the strongest wrong one" if cfg.pairs == "hardest" else "each other label word")})
    else:
        rows, pairs_cache = generation_pairs(ctx, fingerprint, adapter_disabled, info)
        ps = sequence_pair_set(task, rows)
        info.update({"pairs": len(ps), "unique_prompts": unique_prompts(rows), "train_prompts": len(task.pair_examples)})
        if with_reference:
            ref_c, ref_r, cache = cached_reference_logps(reference, task, ps, cfg, ctx.device, ctx.precision,
                                                         fingerprint=fingerprint, adapter_disabled=adapter_disabled,
                                                         write=ctx.is_main)
    if with_reference and not cache["reference_cache_hit"]:
        log.info("reference log-probs (%s) for %d pairs in %.1f s", info["reference"], info["pairs"],
                 time.perf_counter() - t0)
    key_fields = cache.pop("key_fields")
    info.update({**cache, "data_hash": ps.data_hash()})
    if ctx.is_main:  # persist before the first step; state.json last (its presence = complete)
        if pairs_cache is None:
            write_pairs(dpo_dir / "pairs.jsonl", {"task": task.name, "pairs": info["pairs"], "data_hash": ps.data_hash()},
                        rows)
        else:
            copy_atomic(pairs_cache, dpo_dir / "pairs.jsonl")
        if with_reference:
            save_logps(dpo_dir / "reference.safetensors", ref_c, ref_r, key_fields)
        write_json_atomic(dpo_dir / "state.json", {**info, "fingerprint": fingerprint, "key_fields": key_fields})
    return make(ps, ref_c, ref_r, info)


def generation_pairs(ctx: StageContext, fingerprint: str, adapter_disabled: bool, info: dict) -> tuple[list[dict], Path | None]:
    """A generation task's pairs (rows of text) for --pairs: a file's, or sampled from the model at the
    hand-off (v1/v2/v3, cached; the path of the cache file); `info` gets their provenance."""
    cfg, task = ctx.cfg, ctx.task
    if cfg.pairs.startswith("file:"):
        info.update({"pairs_version": "file", "pairs_source": cfg.pairs})
        return file_pairs(task, load_preferences(cfg.pairs.removeprefix("file:"), cfg.train_split)), None
    rows, pairs_cache = build_generation_pairs(task, ctx.model, cfg, ctx.device, ctx.precision, fingerprint=fingerprint,
                                               adapter_disabled=adapter_disabled, write=ctx.is_main)
    try:
        header = read_pairs(pairs_cache, "generating them again")[0]
    except (OSError, DamagedFile):  # another rank's copy, being rewritten
        header = {}
    info.update({"pairs_version": cfg.pairs, "pairs_cache": str(pairs_cache), "pairs_top_k": header.get("top_k"),
                 "pairs_generated": header.get("generated_pairs", len(rows))})
    return rows, pairs_cache


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


def check_saved(ctx: StageContext, dpo_dir: Path, saved: dict) -> None:
    """Saved stage inputs must be this run's: the same reference, computed on this device in this precision."""
    reference = reference_name(ctx.cfg)
    if saved.get("reference") != reference:
        raise SftdpoError(f"{dpo_dir}/state.json names reference {saved.get('reference')!r}, this run needs {reference!r}")
    kf = saved.get("key_fields", {})
    # they name the device with what decides its rounding (models.rounding_id: a CPU's thread count, a GPU's
    # model); resuming needs the same kind of device, as any resumed run may use another thread count
    if kf.get("precision") != ctx.precision or rounding_kind(str(kf.get("device", ""))) != ctx.device.type:
        raise SftdpoError(f"{dpo_dir} holds inputs computed on {kf.get('device')} in {kf.get('precision')}; this run "
                          f"needs {ctx.device.type} in {ctx.precision}: resume it where it started, or use a new --out")


def _from_run_dir(ctx: StageContext, dpo_dir: Path, saved: dict, fix: str, make: MakePairObjective,
                  with_reference: bool):
    """The pairs and reference log-probs saved in the run directory (a resumed run); a damaged file is
    DamagedFile with `fix`."""
    task = ctx.task
    check_saved(ctx, dpo_dir, saved)
    rows = read_pairs(dpo_dir / "pairs.jsonl", fix)[1]
    if one_token_responses(task):  # the rejected labels chosen at the hand-off (hardest), row by row
        rejected: list[list[int]] = [[] for _ in task.train]
        for r in rows:
            rejected[r["prompt_index"]].append(r["rejected_id"])
        ps = label_pair_set(task, rejected)
    else:
        ps = sequence_pair_set(task, rows)
    if ps.data_hash() != saved.get("data_hash"):
        raise SftdpoError(f"the pairs of this run no longer match {dpo_dir} (data or tokenizer changed); use a new --out")
    ref_c = ref_r = None
    if with_reference:
        ref_c, ref_r = load_logps(dpo_dir / "reference.safetensors", fix)
        if ref_c.size(0) != len(ps) or ref_r.size(0) != len(ps):
            raise SftdpoError(f"{dpo_dir}/reference.safetensors has {ref_c.size(0)} rows for {len(ps)} pair rows")
    log.info("preference stage: reusing the pairs%s saved in %s", " and reference log-probs" if with_reference else "",
             dpo_dir)
    info = {k: v for k, v in saved.items() if k not in ("fingerprint", "key_fields")}
    info["reused_from_run_dir"] = True
    return make(ps, ref_c, ref_r, info)
