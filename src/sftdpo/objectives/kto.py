"""KTO (`--objective kto`): TRL's KTOTrainer loss on unpaired examples, each a (prompt, completion) that is
desirable or undesirable, against the cached reference log-probs (Ethayarajh et al. 2024).

Examples (`--kto-examples`):
  desirable  the gold answers alone: a classification task's training prompts, each with its gold
             label word (the cloze is naturally unpaired: one prompt, one desirable label); a
             generation task's training prompts with their gold completions. No pairs are built.
  unpaired   the preference pairs split, as TRL's unpair_preference_dataset: classification, each
             prompt's gold label desirable (once) and its rejected labels (--pairs v1: every wrong
             label; hardest: the strongest) undesirable; generation, each pair's chosen desirable and
             its rejected undesirable (--pairs v1/v2/v3 sampled as for DPO).
  auto       desirable on classification tasks, unpaired on generation tasks.
  A `--pairs file:PATH` of TRL's unpaired rows (prompt, completion, label) is used as it is (pairs in a
  file are split); `desirable` keeps its desirable rows.

The KL term. KTO's reference point z0 is estimated per micro-batch from mismatched (prompt, completion)
pairs, as TRL builds them: the completions rotated by one within the micro-batch, (x_1, y_n), (x_2, y_1),
..., (x_n, y_{n-1}), so the mismatched completions are the batch's own. TRL fixes each example's KL
completion when it prepares the data, against its neighbours in a fixed-order batch (and so samples
sequentially). Here the micro-batches are drawn once, length-bucketed with the run's seed, and stay the
same all along (their order is shuffled each epoch), so an example's KL completion is fixed and its
reference log-prob is computed once with the others'. With r = log π(y|x) - log π_ref(y|x) (summed):

  z0       = max(0, mean over the micro-batch of log π(y'|x) - log π_ref(y'|x)), no gradient (TRL's `kl`)
  desirable    λ_D (1 - σ(β (r - z0)))       λ_D = --desirable-weight
  undesirable  λ_U (1 - σ(β (z0 - r)))       λ_U = --undesirable-weight
  loss     = the mean over the micro-batch's examples

Logged, TRL's names: kl; rewards/chosen, logps/chosen (β r and log π over the batch's desirable
examples, when it has any), rewards/rejected, logps/rejected (undesirable), rewards/margins (when it
has both). One-token answers need one forward pass per prompt for both the completion and its KL
completion; sequences a second, no-grad pass for the KL completions (as TRL).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config import RunConfig, SftdpoError
from ..data.preferences import Unpaired, load_unpaired
from ..files import write_json_atomic
from ..ops.batching import Batch, bucketed_batches, epoch_seed, to_device
from ..ops.logprobs import last_token_logits, sequence_logps
from ..tasks import Task
from . import StageContext
from .dpo import check_saved, generation_pairs, stage_inputs
from .dpo.pairs import (PairSet, collate_responses, hardest_rejections, label_pair_set, one_token_responses, read_pairs,
                        sequence_pair_set, write_pairs)
from .dpo.reference import cached_label_logps, cached_reference_logps, load_logps, reference_name, save_logps

log = logging.getLogger("sftdpo")

KTO_METRIC_NAMES = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins")


def kl_rotation(group: list[int]) -> list[int]:
    """Whose completion each row of a micro-batch gets as its KL completion: the previous row's, the
    first row the last's (TRL's `[completions[-1]] + completions[:-1]`)."""
    return group[-1:] + group[:-1]


def kto_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
               desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-example losses, rewards β r, z0) of a micro-batch (TRL's KTOTrainer._compute_loss, loss type kto):
    desirable rows first, then undesirable, as TRL concatenates them."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    chosen, rejected = logratios[desirable], logratios[~desirable]
    losses = torch.cat((desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))), 0)
    return losses, beta * logratios.detach(), kl


@dataclass
class KTOExamples:
    """The stage's examples, token ids: `ps.prompt[i]`, its completion `ps.chosen[i]` and its KL
    completion `ps.rejected[i]` (another row's completion in its micro-batch); `label[i]` desirable;
    `groups` the fixed micro-batches; `prompt_index[i]` a classification row's training prompt."""

    ps: PairSet
    label: list[bool]
    groups: list[list[int]]
    prompt_index: list[int] | None

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class KTOBatch:
    """A micro-batch of examples. One-token answers: `batch` holds the prompts, `completion` and `kl`
    (B,) the answer and KL answer tokens; sequences: `batch` the prompt + completion rows and `kl_batch`
    the prompt + KL completion rows (labels mark the responses)."""

    batch: Batch
    kl_batch: Batch | None
    completion: torch.Tensor | None
    kl: torch.Tensor | None
    label: torch.Tensor
    ref: torch.Tensor
    ref_kl: torch.Tensor

    def to(self, device: torch.device) -> "KTOBatch":
        mv = lambda t: to_device(t, device)  # noqa: E731
        return KTOBatch(self.batch.to(device), self.kl_batch.to(device) if self.kl_batch is not None else None,
                        mv(self.completion), mv(self.kl), mv(self.label), mv(self.ref), mv(self.ref_kl))

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def share(self) -> float:
        return self.batch.share


class KTOObjective:
    """KTO over fixed micro-batches of unpaired examples, against cached reference log-probs."""

    stage = "dpo"  # the preference stage
    train_mode = False  # dropout off (TRL's disable_dropout): policy == reference at the start

    def __init__(self, cfg: RunConfig, task: Task, ex: KTOExamples, ref: torch.Tensor, ref_kl: torch.Tensor,
                 info: dict) -> None:
        self.cfg, self.task, self.ex, self.ref, self.ref_kl, self.info = cfg, task, ex, ref, ref_kl, info
        self.ps = ex.ps  # the rows (len: examples), as the pair objectives'
        self.one_token = one_token_responses(task)

    def steps(self, epoch: int) -> Iterator[list[KTOBatch]]:
        """An epoch's optimizer steps: the fixed micro-batches in an order drawn for the epoch, grad_accum x
        world_size of them per step, each rank taking every world_size-th; a micro-batch's share is its
        examples over the step's."""
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch))
        order = torch.randperm(len(self.ex.groups), generator=g).tolist()
        world, rank = self.task.world_size, self.task.rank
        per_step = self.cfg.grad_accum * world
        for s in range(0, len(order), per_step):
            groups = [self.ex.groups[i] for i in order[s: s + per_step]]
            total = sum(map(len, groups))
            mine = groups[rank::world]
            if not mine:  # a short last step: this rank trains on nothing (a stand-in with share 0)
                yield [self.batch(groups[0], 0.0)]
            else:
                yield [self.batch(rows, len(rows) / total) for rows in mine]

    def n_steps(self) -> int:
        return -(-len(self.ex.groups) // (self.cfg.grad_accum * self.task.world_size))

    def batch(self, rows: list[int], share: float = 1.0) -> KTOBatch:
        ps, idx = self.ex.ps, torch.tensor(rows)
        label = torch.tensor([self.ex.label[i] for i in rows])
        if self.one_token:
            b = self.task.collate([self.ex.prompt_index[i] for i in rows])
            kb = KTOBatch(b, None, torch.tensor([ps.chosen[i][0] for i in rows]), torch.tensor([ps.rejected[i][0] for i in rows]),
                          label, self.ref[idx], self.ref_kl[idx])
        else:
            prompts = [ps.prompt[i] for i in rows]
            kb = KTOBatch(collate_responses(prompts, [ps.chosen[i] for i in rows], self.task.pad_id, rows),
                          collate_responses(prompts, [ps.rejected[i] for i in rows], self.task.pad_id, rows),
                          None, None, label, self.ref[idx], self.ref_kl[idx])
        kb.batch.share = share
        return kb

    def policy_logps(self, model, batch: KTOBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(y|x) per example, log π(y'|x) of its KL completion without gradient), summed over tokens."""
        if self.one_token:
            logp = torch.log_softmax(last_token_logits(model, batch.batch), dim=-1)
            return logp.gather(1, batch.completion[:, None]).squeeze(1), logp.gather(1, batch.kl[:, None]).squeeze(1).detach()
        with torch.no_grad():
            kl = sequence_logps(model, batch.kl_batch, "sum")
        return sequence_logps(model, batch.batch, "sum"), kl

    def loss(self, model, batch: KTOBatch) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        logps, kl_logps = self.policy_logps(model, batch)
        desirable = batch.label.to(torch.bool)
        losses, rewards, kl = kto_losses(logps, batch.ref, kl_logps, batch.ref_kl, desirable, cfg.beta,
                                         cfg.desirable_weight, cfg.undesirable_weight)
        metrics = {"kl": kl}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():
                metrics[f"rewards/{name}"] = rewards[rows].mean()
                metrics[f"logps/{name}"] = logps.detach()[rows].mean()
        if desirable.any() and not desirable.all():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return losses.nanmean(), metrics

    def n_tokens(self, batch: KTOBatch) -> int:
        return batch.n_tokens

    def describe(self) -> dict:
        cfg = self.cfg
        return {"objective": "kto", "beta": cfg.beta, "desirable_weight": cfg.desirable_weight,
                "undesirable_weight": cfg.undesirable_weight, **self.info}


# -- building the stage --------------------------------------------------------------------------

def kto_kind(cfg: RunConfig, task: Task) -> str:
    """desirable | unpaired: which examples --kto-examples asks for on this task."""
    if cfg.kto_examples != "auto":
        return cfg.kto_examples
    return "desirable" if one_token_responses(task) else "unpaired"


def kl_partners(groups: list[list[int]], n: int) -> list[int]:
    """Per row, the row whose completion is its KL completion: its micro-batch neighbour (kl_rotation)."""
    partner = list(range(n))
    for group in groups:
        for row, other in zip(group, kl_rotation(group)):
            partner[row] = other
    return partner


def classification_rows(ctx: StageContext, kind: str, label_logps: torch.Tensor | None) -> list[dict]:
    """Each training prompt with its gold label word, desirable; `unpaired`: and its rejected label words
    (--pairs v1: all wrong ones; hardest: the strongest under `label_logps`), undesirable."""
    task, cfg = ctx.task, ctx.cfg
    dec = task.tok.decode
    rows = [{"id": e.id, "prompt_index": i, "completion": dec([t]), "completion_id": t, "label": True}
            for i, (e, t) in enumerate(zip(task.train, task.train_labels))]
    if kind == "unpaired":
        ps = label_pair_set(task, hardest_rejections(task, label_logps) if cfg.pairs == "hardest" else None)
        rows += [{"id": e.id, "prompt_index": i, "completion": dec([t]), "completion_id": t, "label": False}
                 for i, (e, r) in enumerate(zip(task.train, ps.rejected)) for t in r]
    return rows


def generation_rows(ctx: StageContext, kind: str, fingerprint: str, adapter_disabled: bool, info: dict) -> list[dict]:
    """A generation task's examples as text rows (prompt, completion, label)."""
    cfg, task = ctx.cfg, ctx.task
    if cfg.pairs.startswith("file:"):
        found = load_unpaired(cfg.pairs.removeprefix("file:"), cfg.train_split)
        info.update({"examples_source": cfg.pairs})
        rows = [_render(task, u) for u in found]
    elif kind == "desirable":
        info.update({"examples_source": "the training prompts with their gold completions"})
        rows = [{"prompt": e.prompt, "completion": e.completion, "label": True, "id": e.id} for e in task.pair_examples]
    else:
        pairs, _ = generation_pairs(ctx, fingerprint, adapter_disabled, info)
        info.update({"examples_source": f"the {cfg.pairs} pairs split: chosen desirable, rejected undesirable"})
        rows = ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True, "id": p.get("id")} for p in pairs]
                + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False, "id": p.get("id")} for p in pairs])
    if kind == "desirable":
        rows = [r for r in rows if r["label"]]
    if not rows:
        raise SftdpoError(f"--objective kto found no {'desirable ' if kind == 'desirable' else ''}examples in {cfg.pairs}")
    return rows


def _render(task, u: Unpaired) -> dict:
    """An unpaired row as text: a conversation rendered with the chat template (the completion is what
    the whole conversation adds to the prompt with its generation prompt)."""
    if isinstance(u.completion, list):
        if not getattr(task.tok, "chat_template", None):
            raise SftdpoError(f"conversational KTO rows need a chat template, and the tokenizer of --model "
                              f"{task.cfg.model} has none")
        prompt = task.render(u.prompt, True) if u.prompt else ""
        return {"prompt": prompt, "completion": task.render(u.prompt + u.completion, False)[len(prompt):], "label": u.label}
    return {"prompt": u.prompt, "completion": u.completion, "label": u.label}


def examples_from_rows(task: Task, rows: list[dict], groups: list[list[int]]) -> KTOExamples:
    """Token ids of the rows and of their KL completions (`groups`: the micro-batches)."""
    partner = kl_partners(groups, len(rows))
    if one_token_responses(task):
        ps = PairSet([task.train_ids[r["prompt_index"]] for r in rows], [[r["completion_id"]] for r in rows],
                     [[rows[k]["completion_id"]] for k in partner])
        return KTOExamples(ps, [bool(r["label"]) for r in rows], groups, [r["prompt_index"] for r in rows])
    # the KL completion is cut to its own prompt's room, as any response (sequence_pair_set)
    ps = sequence_pair_set(task, [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[k]["completion"]}
                                  for r, k in zip(rows, partner)])
    return KTOExamples(ps, [bool(r["label"]) for r in rows], groups, None)


def in_micro_batches(task: Task, rows: list[dict], cfg: RunConfig) -> tuple[list[dict], list[list[int]]]:
    """The rows reordered micro-batch by micro-batch, and the micro-batches (consecutive rows): drawn once,
    length-bucketed as Task.train_steps' batches, seeded by the run."""
    ex = examples_from_rows(task, rows, [[i] for i in range(len(rows))])
    drawn = bucketed_batches(ex.ps.lengths(one_token_responses(task)), cfg.batch_size, cfg.seed)
    ordered = [rows[i] for group in drawn for i in group]
    starts = [0]
    for group in drawn:
        starts.append(starts[-1] + len(group))
    return ordered, [list(range(a, b)) for a, b in zip(starts, starts[1:])]


def build_kto_objective(ctx: StageContext) -> KTOObjective:
    """KTO's stage: its examples, micro-batches and reference log-probs (of every completion and KL
    completion), persisted in <run>/dpo/ before the first step and taken from there on resuming."""
    return stage_inputs(ctx, lambda dpo_dir, ref_model, fp, ad: _fresh(ctx, dpo_dir, ref_model, fp, ad),
                        lambda dpo_dir, saved, fix: _from_run_dir(ctx, dpo_dir, saved, fix))


def _fresh(ctx: StageContext, dpo_dir: Path, reference, fingerprint: str, adapter_disabled: bool) -> KTOObjective:
    cfg, task = ctx.cfg, ctx.task
    kind = kto_kind(cfg, task)
    info: dict = {"reference": reference_name(cfg), "reference_fingerprint": fingerprint,
                  "adapter_disabled": adapter_disabled, "kto_examples": kind, "examples_file": str(dpo_dir / "examples.jsonl")}
    t0 = time.perf_counter()
    if one_token_responses(task):
        m, cache = cached_label_logps(reference, task, cfg, ctx.device, ctx.precision, fingerprint=fingerprint,
                                      adapter_disabled=adapter_disabled, write=ctx.is_main)
        rows, groups = in_micro_batches(task, classification_rows(ctx, kind, m), cfg)
        ex = examples_from_rows(task, rows, groups)
        col = {t: j for j, t in enumerate(task.label_ids)}
        prompts = torch.tensor(ex.prompt_index)
        ref = m[prompts, torch.tensor([col[c[0]] for c in ex.ps.chosen])]
        ref_kl = m[prompts, torch.tensor([col[c[0]] for c in ex.ps.rejected])]
        info["examples_source"] = "train examples: each prompt's gold label word" + (
            ", and its rejected label words, undesirable" if kind == "unpaired" else "")
    else:
        rows, groups = in_micro_batches(task, generation_rows(ctx, kind, fingerprint, adapter_disabled, info), cfg)
        ex = examples_from_rows(task, rows, groups)
        ref, ref_kl, cache = cached_reference_logps(reference, task, ex.ps, cfg, ctx.device, ctx.precision,
                                                    fingerprint=fingerprint, adapter_disabled=adapter_disabled,
                                                    write=ctx.is_main)
    if not cache["reference_cache_hit"]:
        log.info("KTO reference log-probs (%s) for %d examples in %.1f s", info["reference"], len(ex),
                 time.perf_counter() - t0)
    n_desirable = sum(ex.label)
    info.update({"examples": len(ex), "desirable": n_desirable, "undesirable": len(ex) - n_desirable,
                 "micro_batches": len(ex.groups), "data_hash": ex.ps.data_hash()})
    _check_balance(cfg, n_desirable, len(ex) - n_desirable)
    key_fields = cache.pop("key_fields")
    info.update(cache)
    if ctx.is_main:  # persist before the first step; state.json last (its presence = complete)
        out = [{**rows[i], "group": g} for g, group in enumerate(ex.groups) for i in group]
        write_pairs(dpo_dir / "examples.jsonl", {"task": task.name, "examples": len(ex), "data_hash": info["data_hash"]},
                    out)
        save_logps(dpo_dir / "reference.safetensors", ref, ref_kl, key_fields)
        write_json_atomic(dpo_dir / "state.json", {**info, "fingerprint": fingerprint, "key_fields": key_fields})
    return KTOObjective(cfg, task, ex, ref, ref_kl, info)


def _check_balance(cfg: RunConfig, n_desirable: int, n_undesirable: int) -> None:
    """TRL's warning when the weights do not offset unequal desirable and undesirable counts (KTO's Eq. 8)."""
    if not n_desirable or not n_undesirable or n_desirable == n_undesirable:
        return
    d_lo, d_hi = (round(n_undesirable * cfg.undesirable_weight / n_desirable * f, 2) for f in (1, 1.33))
    u_lo, u_hi = (round(n_desirable * cfg.desirable_weight / n_undesirable / f, 2) for f in (1.33, 1))
    if not (d_lo <= cfg.desirable_weight <= d_hi or u_lo <= cfg.undesirable_weight <= u_hi):
        log.warning("KTO: %d desirable and %d undesirable examples; TRL recommends --desirable-weight in [%s, %s] or "
                    "--undesirable-weight in [%s, %s]", n_desirable, n_undesirable, d_lo, d_hi, u_lo, u_hi)


def _from_run_dir(ctx: StageContext, dpo_dir: Path, saved: dict, fix: str) -> KTOObjective:
    """The examples, micro-batches and reference log-probs saved in the run directory (a resumed run)."""
    cfg, task = ctx.cfg, ctx.task
    check_saved(ctx, dpo_dir, saved)
    stored = read_pairs(dpo_dir / "examples.jsonl", fix)[1]
    groups: list[list[int]] = []
    for i, r in enumerate(stored):
        if not groups or r["group"] != stored[i - 1]["group"]:
            groups.append([])
        groups[-1].append(i)
    ex = examples_from_rows(task, stored, groups)
    if ex.ps.data_hash() != saved.get("data_hash"):
        raise SftdpoError(f"the KTO examples of this run no longer match {dpo_dir} (data or tokenizer changed); "
                          "use a new --out")
    ref, ref_kl = load_logps(dpo_dir / "reference.safetensors", fix)
    if ref.size(0) != len(ex):
        raise SftdpoError(f"{dpo_dir}/reference.safetensors has {ref.size(0)} rows for {len(ex)} KTO examples")
    log.info("KTO: reusing the examples and reference log-probs saved in %s", dpo_dir)
    info = {k: v for k, v in saved.items() if k not in ("fingerprint", "key_fields")}
    info["reused_from_run_dir"] = True
    return KTOObjective(cfg, task, ex, ref, ref_kl, info)


__all__ = ["KTOObjective", "build_kto_objective", "kl_rotation", "kto_losses"]
