"""Direct Preference Optimization (DPO): the loss, the preference pairs, the reference model, and
the `Objective` that the training loop runs for the DPO stage.

Loss (`--loss-type`, TRL's formulas; Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))):

  sigmoid  -log σ(βΔ)                                            (Rafailov et al. 2023; the default)
  ipo      (Δ - 1/(2β))²                                         (Azar et al. 2023)
  hinge    max(0, 1 - βΔ)                                        (SLiC)
  robust   [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε)          (Chowdhury et al. 2024; ε = --label-smoothing)

A sequence log-probability is the sum of its response tokens' log-probs (`--logp-reduction sum`) or
their mean (`mean`). TRL's IPO divides the summed log-ratios by the response length; that is exactly
`--loss-type ipo --logp-reduction mean` here. With policy == reference every loss above is at its
starting value (ln 2 for sigmoid and robust) and all rewards are 0: dropout is off during DPO
(`train_mode = False`) so that holds exactly, and is tested.

Logged metrics (TRL's names): rewards/chosen, rewards/rejected (β times the log-ratio, batch mean),
rewards/margins, rewards/accuracies (share of pairs with chosen reward > rejected reward),
logps/chosen, logps/rejected (policy log-probs, batch mean).

Reference model. DPO-only: the pretrained backbone (FFT) or, with LoRA, the same network with the
adapter disabled (`model.disable_adapter()`). SFT@k->DPO: the model (FFT) or the SFT adapter (LoRA;
training continues on the same adapter) at the hand-off. The reference log-probs of every pair are
computed ONCE before the DPO stage (eval mode, no grad, the run's autocast precision), so training
has no reference forward pass. They are cached under `<cache>/reflogps/<key>.safetensors`; the key
covers the model name, a fingerprint of the reference weights, whether the adapter was disabled,
the pairs' token ids, the reduction and the precision. The run directory keeps its own copy
(`<run>/dpo/reference.safetensors`, `<run>/dpo/pairs.jsonl`, `<run>/dpo/state.json`, written before
the first DPO step): a run resumed mid-DPO, whose model is no longer the reference, reuses them.

Preference pairs.

  Paraphrase: prompt = the cloze prompt of a training example; chosen = the correct label token,
  rejected = the other label token. The two responses are one token each after the same prompt, so
  one forward pass of the prompt gives both log-probs (log-softmax over the full vocabulary at the
  last prompt position): a paraphrase DPO step costs one SFT step.

  Sonnets: prompt = the first 3 lines of a training sonnet; chosen = its true remaining lines;
  rejected = a continuation sampled from the policy at the hand-off (the pretrained backbone for
  DPO-only; with LoRA DPO-only, sampled with the adapter disabled, which is the same function at
  initialisation). The paper does not publish its pair-construction variants in full; these are
  the toolkit's own definitions (`--pairs`):

    v1  one sampled rejection per training sonnet (the sonnets SFT trains on), at --temperature
        (and --top-p, --max-new-tokens).
    v2  --pairs-n rejections per prompt, sample j at temperature --pairs-temperatures[j mod len];
        all pairs kept (n pairs per sonnet).
    v3  v2's generations, then the top-K pairs by chrF gap, K = --pairs-top-k (default: the number
        of training sonnets). gap = chrF(chosen, true) - chrF(rejected, true) = 100 - sentence
        chrF of the rejected continuation against the true one. Biggest gap first; ties broken by
        prompt order, then sample order (deterministic). A small K can collapse onto few prompts:
        the number of unique prompts kept is reported (describe(), the pair file's header).

  A pair set is a JSONL file under `<cache>/pairs/<key>.jsonl` whose first line is a provenance
  header (generating-weights fingerprint, temperature(s), seeds, version, n, top_k, ...) and whose
  other lines are pairs (prompt, chosen, rejected, sonnet number, temperature, gap, ...). The key
  covers the generating weights' fingerprint, the construction parameters and the training data, so
  asking for the same construction again reuses the file (v3 also reuses v2's generations). The file
  used is copied to `<run>/dpo/pairs.jsonl`. Prompt and response are tokenized separately and their
  ids concatenated (the response ends with end-of-text, as in SFT), so the response boundary is exact.

  Sonnet batches put chosen and rejected sequences in ONE forward pass (2B right-padded rows,
  chosen rows first), in length-bucketed batches over max(len chosen, len rejected).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import stats
from .config import RunConfig, SftdpoError, cache_dir
from .models import autocast
from .tasks import Batch, bucketed_batches, last_token_logits, pad_batch, target_logprobs

log = logging.getLogger("sftdpo")

CACHE_VERSION = 1  # bump when the way pairs or reference log-probs are computed changes
PAIR_SEED_STRIDE = 1000  # sample group g (one temperature) is drawn with seed cfg.seed + 1000 * g
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


# ================================================================================================
# The loss
# ================================================================================================


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean per-pair DPO loss and TRL's metrics (detached batch means). Inputs are per-pair sequence
    log-probs of shape (B,)."""
    if label_smoothing and loss_type != "robust":
        raise ValueError("label_smoothing only applies to loss_type='robust'")
    chosen_lr = policy_chosen - ref_chosen
    rejected_lr = policy_rejected - ref_rejected
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    chosen_rewards = beta * chosen_lr.detach()
    rejected_rewards = beta * rejected_lr.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics


# ================================================================================================
# Log-probabilities
# ================================================================================================


def paraphrase_pair_logps(model, batch: Batch, yes_id: int, no_id: int,
                          chosen_is_yes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of the label tokens after each prompt, from ONE forward pass:
    log-softmax over the full vocabulary at the last prompt position."""
    logp = torch.log_softmax(last_token_logits(model, batch), dim=-1)
    yes, no = logp[:, yes_id], logp[:, no_id]
    chosen_is_yes = chosen_is_yes.to(device=logp.device, dtype=torch.bool)
    return torch.where(chosen_is_yes, yes, no), torch.where(chosen_is_yes, no, yes)


def sequence_logps(model, batch: Batch, reduction: str = "sum") -> torch.Tensor:
    """Per-row log-prob of the response tokens. `batch.labels` is the response mask: the token id at
    response positions, -100 at prompt and padding positions (as SFT's labels)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean' (got {reduction!r})")
    # the LM head runs on response positions only (not on prompt or padding positions)
    logp, rows = target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
    n = batch.input_ids.size(0)
    total = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    if reduction == "mean":
        return total / torch.bincount(rows, minlength=n).clamp(min=1).to(total.dtype)
    return total


# ================================================================================================
# Fingerprints and hashes
# ================================================================================================


def _is_adapter(name: str) -> bool:
    return "lora_" in name


def _base_name(name: str) -> str:
    """A PEFT-wrapped base weight's name as in the plain model, so FFT and LoRA runs of the same
    backbone share a fingerprint."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _hash_tensors(items: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda x: x[0]):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def weights_fingerprint(model, cfg: RunConfig, *, adapter_disabled: bool = False) -> str:
    """Fingerprint of the weights that determine the model's function: the backbone's weights (names
    normalised), plus, where an adapter is active, the adapter weights and its scaling config."""
    params = list(model.named_parameters())
    base = _hash_tensors([(_base_name(n), p) for n, p in params if not _is_adapter(n)])
    adapters = [(n, p) for n, p in params if _is_adapter(n)]
    if adapter_disabled or not adapters:
        return base
    lora = {k: getattr(cfg, k) for k in ("lora_rank", "lora_alpha", "lora_targets", "use_rslora", "use_dora")}
    return _hash_json({"base": base, "adapter": _hash_tensors(adapters), "lora": lora})[:20]


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _hash_id_lists(*lists: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for seqs in lists:
        h.update(array("q", map(len, seqs)).tobytes())
        h.update(array("q", itertools.chain.from_iterable(seqs)).tobytes())
    return h.hexdigest()[:20]


# ================================================================================================
# Small file helpers (atomic writes)
# ================================================================================================


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _save_logps_atomic(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file({"chosen": chosen.float().contiguous().cpu(), "rejected": rejected.float().contiguous().cpu()}, str(tmp),
              metadata={"key": json.dumps(meta, sort_keys=True, default=str)})
    os.replace(tmp, path)


def _load_logps(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    sd = load_file(str(path))
    return sd["chosen"], sd["rejected"]


def write_pairs(path: Path, header: dict, pairs: list[dict]) -> None:
    lines = [json.dumps({"header": header}, ensure_ascii=False)] + [json.dumps(p, ensure_ascii=False) for p in pairs]
    _write_text_atomic(path, "\n".join(lines) + "\n")


def read_pairs(path: Path) -> tuple[dict, list[dict]]:
    """(header, pairs) of a pair file."""
    header: dict = {}
    pairs: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if "header" in rec and len(rec) == 1:
                header = rec["header"]
            else:
                pairs.append(rec)
    return header, pairs


# ================================================================================================
# Sonnet preference pairs
# ================================================================================================


def select_top_k(pairs: list[dict], k: int) -> list[dict]:
    """v3 selection: the k pairs with the biggest chrF gap, biggest first; ties broken by prompt order
    then sample order (`prompt_index`, `sample_index`; list position where absent). Deterministic."""
    order = sorted(range(len(pairs)), key=lambda i: (-float(pairs[i]["gap"]), pairs[i].get("prompt_index", i),
                                                      pairs[i].get("sample_index", 0), i))
    return [pairs[i] for i in order[: max(0, k)]]


def unique_prompts(pairs: list[dict]) -> int:
    return len({(p.get("number"), p["prompt"]) for p in pairs})


def _train_hash(task) -> str:
    return _hash_json([[s.number, s.text] for s in task.train])[:20]


def _pairs_key(version: str, fingerprint: str, cfg: RunConfig, task, device: torch.device, precision: str,
               top_k: int | None) -> tuple[str, dict]:
    fields: dict[str, Any] = {
        "cache_version": CACHE_VERSION, "version": version, "model": cfg.model, "fingerprint": fingerprint,
        "train": _train_hash(task), "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
        "precision": precision, "device": device.type, "generation_batch_size": cfg.eval_batch_size,
    }
    if version == "v1":
        fields["temperature"] = cfg.temperature
    else:
        fields["n"] = cfg.pairs_n
        fields["temperatures"] = list(cfg.pairs_temperatures)
    if version == "v3":
        fields["top_k"] = top_k
    return f"{version}-{_hash_json(fields)[:16]}", fields


def _generate_pairs(task, model, cfg: RunConfig, device: torch.device, precision: str, temps: list[float],
                    n: int) -> tuple[list[dict], list[int]]:
    """n samples per training sonnet; sample j at temps[j % len(temps)], one generate call per temperature."""
    prompts = [task.prompt_text(s) for s in task.train]
    samples: list[list[tuple[float, str] | None]] = [[None] * n for _ in prompts]
    seeds = []
    for g, t in enumerate(temps):
        js = list(range(g, n, len(temps)))
        if not js:
            continue
        seed = cfg.seed + PAIR_SEED_STRIDE * g
        seeds.append(seed)
        gens = task.generate(model, prompts, device, precision, temperature=t, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, num_samples=len(js), seed=seed,
                             batch_size=cfg.eval_batch_size)
        for i, gs in enumerate(gens):
            for j, text in zip(js, gs):
                samples[i][j] = (t, text)
    pairs = []
    for i, s in enumerate(task.train):
        chosen = s.continuation(3)
        for j in range(n):
            t, rejected = samples[i][j]
            chrf = stats.corpus_chrf([rejected], [chosen]) if chosen else 0.0
            pairs.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "number": s.number,
                          "temperature": t, "prompt_index": i, "sample_index": j, "gap": 100.0 - chrf})
    return pairs, seeds


def build_sonnet_pairs(task, model, cfg: RunConfig, device: torch.device, precision: str, *,
                       adapter_disabled: bool = False, fingerprint: str | None = None,
                       write: bool = True) -> tuple[list[dict], Path]:
    """The sonnet pair set for `cfg.pairs`, generated by `model` (with its adapter disabled if asked),
    cached as JSONL under <cache>/pairs/<key>.jsonl and reused when the same construction is asked again."""
    if fingerprint is None:
        fingerprint = weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled)
    version = cfg.pairs
    top_k = (cfg.pairs_top_k if cfg.pairs_top_k is not None else len(task.train)) if version == "v3" else None
    key, fields = _pairs_key(version, fingerprint, cfg, task, device, precision, top_k)
    path = cache_dir() / "pairs" / f"{key}.jsonl"
    if path.exists():
        header, pairs = read_pairs(path)
        log.info("DPO pairs: reusing %s (%d pairs)", path, len(pairs))
        return pairs, path

    if version == "v3":
        gen_cfg = RunConfig.from_dict({**cfg.to_dict(), "pairs": "v2"})
        gen_pairs, gen_path = build_sonnet_pairs(task, model, gen_cfg, device, precision, adapter_disabled=adapter_disabled,
                                                 fingerprint=fingerprint, write=write)
        gen_header, _ = read_pairs(gen_path) if gen_path.exists() else ({}, None)
        pairs = select_top_k(gen_pairs, top_k)
        seeds = gen_header.get("seeds")
        extra = {"generated_from": str(gen_path), "generated_pairs": len(gen_pairs)}
    else:
        temps = [cfg.temperature] if version == "v1" else [float(t) for t in cfg.pairs_temperatures]
        n = 1 if version == "v1" else cfg.pairs_n
        was_training = model.training
        t0 = time.perf_counter()
        ctx = model.disable_adapter() if adapter_disabled else contextlib.nullcontext()
        with ctx:
            pairs, seeds = _generate_pairs(task, model, cfg, device, precision, temps, n)
        model.train(was_training)
        log.info("DPO pairs: generated %d rejections in %.1f s", len(pairs), time.perf_counter() - t0)
        extra = {}
    header = {**fields, "key": key, "pairs": len(pairs), "unique_prompts": unique_prompts(pairs),
              "train_sonnets": len(task.train), "seeds": seeds,
              "generator": "adapter-disabled base" if adapter_disabled else "policy at hand-off",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    if write:
        write_pairs(path, header, pairs)
    return pairs, path


# ================================================================================================
# Pair sets as token ids, batches
# ================================================================================================


@dataclass
class PairSet:
    """Token ids of the preference pairs: responses follow the prompt directly."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt)

    def data_hash(self) -> str:
        return _hash_id_lists(self.prompt, self.chosen, self.rejected)


def sonnet_pair_set(task, pairs: list[dict]) -> PairSet:
    """Tokenize prompt and response separately (response + end-of-text, as SFT) and keep at most
    --max-length tokens per sequence (the response is cut from the right)."""
    tok, max_len, eos = task.tok, task.cfg.max_length, task.tok.eos_token_id
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    out = PairSet([], [], [])
    for p in pairs:
        prompt = enc(p["prompt"])[-(max_len - 1):]
        room = max_len - len(prompt)
        out.prompt.append(prompt)
        out.chosen.append((enc(p["chosen"]) + [eos])[:room])
        out.rejected.append((enc(p["rejected"]) + [eos])[:room])
    return out


def paraphrase_pair_set(task) -> PairSet:
    other = {task.yes_id: task.no_id, task.no_id: task.yes_id}
    return PairSet(list(task.train_ids), [[lab] for lab in task.train_labels],
                   [[other[lab]] for lab in task.train_labels])


def collate_sequence_pairs(ps: PairSet, rows: Sequence[int], pad_id: int) -> Batch:
    """2B right-padded rows: prompt+chosen for each row, then prompt+rejected; labels mark the
    response tokens (-100 elsewhere)."""
    rows = list(rows)
    resp = [ps.chosen[i] for i in rows] + [ps.rejected[i] for i in rows]
    prompts = [ps.prompt[i] for i in rows] * 2
    b = pad_batch([p + r for p, r in zip(prompts, resp)], pad_id, rows + rows)
    labels = torch.full_like(b.input_ids, -100)
    for j, (p, r) in enumerate(zip(prompts, resp)):
        labels[j, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    b.labels = labels
    return b


@dataclass
class PairBatch:
    """A DPO batch: the token batch plus the cached reference log-probs of its pairs."""

    batch: Batch
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_is_yes: torch.Tensor | None = None  # paraphrase only

    def to(self, device: torch.device) -> "PairBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PairBatch(self.batch.to(device), mv(self.ref_chosen), mv(self.ref_rejected), mv(self.chosen_is_yes))

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def share(self) -> float:
        return self.batch.share


def _paraphrase_batch(task, ps: PairSet, rows: Sequence[int]) -> tuple[Batch, torch.Tensor]:
    b = task.collate(list(rows))
    chosen = torch.tensor([ps.chosen[i][0] for i in rows])
    b.labels = chosen
    return b, chosen == task.yes_id


# ================================================================================================
# Reference log-probs
# ================================================================================================


@torch.no_grad()
def compute_reference_logps(model, task, ps: PairSet, cfg: RunConfig, device: torch.device, precision: str, *,
                            adapter_disabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every pair's chosen and rejected response under the reference: eval mode (no
    dropout), no grad, the run's autocast precision; the adapter disabled if asked."""
    was_training = model.training
    model.eval()
    n = len(ps)
    chosen, rejected = torch.empty(n), torch.empty(n)
    paraphrase = task.name == "paraphrase"
    if paraphrase:
        lengths, bs = [len(p) for p in ps.prompt], cfg.eval_batch_size
    else:
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ps.prompt, ps.chosen, ps.rejected)]
        bs = cfg.batch_size
    ctx = model.disable_adapter() if adapter_disabled else contextlib.nullcontext()
    try:
        with ctx:
            for rows in bucketed_batches(lengths, bs, 0, shuffle=False):
                idx = torch.tensor(rows)
                if paraphrase:
                    b, chosen_is_yes = _paraphrase_batch(task, ps, rows)
                    with autocast(device, precision):
                        c, r = paraphrase_pair_logps(model, b.to(device), task.yes_id, task.no_id, chosen_is_yes)
                else:
                    b = collate_sequence_pairs(ps, rows, task.pad_id).to(device)
                    with autocast(device, precision):
                        lp = sequence_logps(model, b, cfg.logp_reduction)
                    c, r = lp[: len(rows)], lp[len(rows):]
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    finally:
        model.train(was_training)
    return chosen, rejected


# ================================================================================================
# The objective
# ================================================================================================


class DPOObjective:
    stage = "dpo"
    train_mode = False  # dropout off: policy == reference exactly at the start

    def __init__(self, run, ps: PairSet, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, info: dict) -> None:
        self.cfg, self.task = run.cfg, run.task
        self.ps, self.ref_chosen, self.ref_rejected, self.info = ps, ref_chosen, ref_rejected, info
        self.paraphrase = self.task.name == "paraphrase"
        if self.paraphrase:
            self.lengths = [len(p) for p in ps.prompt]
        else:
            self.lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ps.prompt, ps.chosen, ps.rejected)]

    def batches(self, epoch: int) -> Iterator[PairBatch]:
        for rows, share in self.task.train_shards(self.lengths, epoch):  # this rank's part of each batch (distributed.py)
            idx = torch.tensor(rows)
            if self.paraphrase:
                b, chosen_is_yes = _paraphrase_batch(self.task, self.ps, rows)
                pb = PairBatch(b, self.ref_chosen[idx], self.ref_rejected[idx], chosen_is_yes)
            else:
                pb = PairBatch(collate_sequence_pairs(self.ps, rows, self.task.pad_id),
                               self.ref_chosen[idx], self.ref_rejected[idx])
            pb.batch.share = share
            yield pb

    def n_batches(self) -> int:
        return self.task.n_train_batches(len(self.ps))

    def policy_logps(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.paraphrase:
            return paraphrase_pair_logps(model, batch.batch, self.task.yes_id, self.task.no_id, batch.chosen_is_yes)
        lp = sequence_logps(model, batch.batch, self.cfg.logp_reduction)
        b = batch.ref_chosen.size(0)
        return lp[:b], lp[b:]

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        pc, pr = self.policy_logps(model, batch)
        return dpo_loss(pc, pr, batch.ref_chosen, batch.ref_rejected, self.cfg.beta, self.cfg.loss_type,
                        self.cfg.label_smoothing)

    def n_tokens(self, batch: PairBatch) -> int:
        return batch.n_tokens

    def describe(self) -> dict:
        return {"objective": "dpo", "loss_type": self.cfg.loss_type, "beta": self.cfg.beta,
                "label_smoothing": self.cfg.label_smoothing, "logp_reduction": self.cfg.logp_reduction, **self.info}


def _reference_name(cfg: RunConfig) -> str:
    k = cfg.sft_epochs
    if cfg.param == "lora":
        return "adapter-disabled base" if k == 0 else f"SFT adapter at hand-off epoch {k}"
    return "pretrained backbone (FFT)" if k == 0 else f"SFT model at hand-off epoch {k}"


def _paraphrase_pairs_rows(task) -> list[dict]:
    dec = task.tok.decode
    other = {task.yes_id: task.no_id, task.no_id: task.yes_id}
    return [{"id": e.id, "prompt_index": i, "chosen": dec([lab]), "rejected": dec([other[lab]]),
             "chosen_id": lab, "rejected_id": other[lab]} for i, (e, lab) in enumerate(zip(task.train, task.train_labels))]


def make_dpo_objective(run) -> DPOObjective:
    """The DPO stage's objective for `run` (built: run.model, run.task): pairs and reference log-probs,
    persisted in <run>/dpo/ before the first DPO step and reused from there when the run resumes."""
    cfg, task, model = run.cfg, run.task, run.model
    k = cfg.sft_epochs
    first_dpo_epoch = k + 1
    lora = cfg.param == "lora"
    if lora and not hasattr(model, "disable_adapter"):
        raise SftdpoError("--param lora but the model has no PEFT adapter: cannot build the DPO reference")
    adapter_disabled = lora and k == 0
    reference = _reference_name(cfg)
    dpo_dir = Path(run.out) / "dpo"
    state_file = dpo_dir / "state.json"
    resumed_epoch = getattr(run, "resumed_epoch", None)  # set by Run.train; None when called outside the loop
    mid_dpo = resumed_epoch is not None and resumed_epoch >= first_dpo_epoch

    persisted = json.loads(state_file.read_text()) if state_file.exists() else None
    if mid_dpo and persisted is None:
        raise SftdpoError(
            f"{run.out} resumes after epoch {resumed_epoch}, inside the DPO stage, but {dpo_dir} holds no saved pairs and "
            "reference log-probs; the reference (the model at hand-off) cannot be rebuilt from the current weights. "
            "Start the run again with a new --out")

    fingerprint = None
    if persisted is not None and not mid_dpo and resumed_epoch is not None:
        # at the hand-off the current weights ARE the reference: the saved state must be theirs
        fingerprint = weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled)
        if persisted.get("fingerprint") != fingerprint:
            log.warning("%s was written for other reference weights (a restarted run?); rebuilding it", dpo_dir)
            persisted = None
    if persisted is not None:
        return _objective_from_run_dir(run, dpo_dir, persisted, reference)

    # -- fresh: pairs, reference log-probs, persist ------------------------------------------------
    if fingerprint is None:
        fingerprint = weights_fingerprint(model, cfg, adapter_disabled=adapter_disabled)
    info: dict[str, Any] = {"reference": reference, "reference_fingerprint": fingerprint,
                            "adapter_disabled": adapter_disabled, "pairs_file": str(dpo_dir / "pairs.jsonl")}
    if task.name == "paraphrase":
        ps = paraphrase_pair_set(task)
        pair_rows = None
        info.update({"pairs": len(ps), "pairs_source": "paraphrase train examples (chosen = correct label token)"})
    else:
        pairs, pairs_path = build_sonnet_pairs(task, model, cfg, run.device, run.precision,
                                               adapter_disabled=adapter_disabled, fingerprint=fingerprint,
                                               write=run.is_main)
        ps = sonnet_pair_set(task, pairs)
        pair_rows = pairs
        header = read_pairs(pairs_path)[0] if pairs_path.exists() else {}
        info.update({"pairs": len(ps), "pairs_version": cfg.pairs, "pairs_cache": str(pairs_path),
                     "unique_prompts": unique_prompts(pairs), "train_sonnets": len(task.train),
                     "pairs_top_k": header.get("top_k"), "pairs_generated": header.get("generated_pairs", len(pairs))})
    data_hash = ps.data_hash()
    # no adapter_disabled here: a disabled LoRA layer runs its base layer alone, so the adapter-disabled
    # base and the plain backbone (same fingerprint) share their reference log-probs
    key_fields = {"cache_version": CACHE_VERSION, "task": task.name, "model": cfg.model, "weights": fingerprint,
                  "data": data_hash, "reduction": cfg.logp_reduction, "precision": run.precision}
    ref_key = _hash_json(key_fields)[:24]
    cache_file = cache_dir() / "reflogps" / f"{ref_key}.safetensors"
    hit = False
    if cache_file.exists():
        try:
            ref_c, ref_r = _load_logps(cache_file)
            hit = ref_c.numel() == len(ps) == ref_r.numel()
        except Exception as e:  # noqa: BLE001 - a broken cache file is recomputed
            log.warning("unreadable reference cache %s (%s); recomputing", cache_file, e)
    if not hit:
        t0 = time.perf_counter()
        ref_c, ref_r = compute_reference_logps(model, task, ps, cfg, run.device, run.precision,
                                               adapter_disabled=adapter_disabled)
        log.info("DPO reference log-probs (%s) for %d pairs in %.1f s", reference, len(ps), time.perf_counter() - t0)
        if run.is_main:
            _save_logps_atomic(cache_file, ref_c, ref_r, key_fields)
    else:
        log.info("DPO reference log-probs: reusing %s", cache_file)
    info.update({"reference_key": ref_key, "reference_cache": str(cache_file), "reference_cache_hit": hit,
                 "data_hash": data_hash})

    if run.is_main:  # persist before the first DPO step; state.json last (its presence = complete)
        if pair_rows is None:
            write_pairs(dpo_dir / "pairs.jsonl", {"task": "paraphrase", "pairs": len(ps), "data_hash": data_hash,
                                                  "note": "prompt = CS224N cloze prompt of train example prompt_index"},
                        _paraphrase_pairs_rows(task))
        else:
            _copy_atomic(Path(info["pairs_cache"]), dpo_dir / "pairs.jsonl")
        _save_logps_atomic(dpo_dir / "reference.safetensors", ref_c, ref_r, key_fields)
        _write_text_atomic(state_file, json.dumps({**info, "fingerprint": fingerprint, "key_fields": key_fields},
                                                  indent=2, default=str))
    return DPOObjective(run, ps, ref_c, ref_r, info)


def _objective_from_run_dir(run, dpo_dir: Path, persisted: dict, reference: str) -> DPOObjective:
    """The pairs and reference log-probs saved in the run directory (a resumed run)."""
    cfg, task = run.cfg, run.task
    if persisted.get("reference") != reference:
        raise SftdpoError(f"{dpo_dir}/state.json names reference {persisted.get('reference')!r}, this run needs {reference!r}")
    if task.name == "paraphrase":
        ps = paraphrase_pair_set(task)
    else:
        ps = sonnet_pair_set(task, read_pairs(dpo_dir / "pairs.jsonl")[1])
    if ps.data_hash() != persisted.get("data_hash"):
        raise SftdpoError(f"the DPO pairs of this run no longer match {dpo_dir} (data or tokenizer changed); use a new --out")
    kf = persisted.get("key_fields", {})
    if kf.get("reduction") != cfg.logp_reduction or kf.get("precision") != run.precision:
        raise SftdpoError(f"{dpo_dir} holds reference log-probs for reduction={kf.get('reduction')}, "
                          f"precision={kf.get('precision')}; this run uses {cfg.logp_reduction}, {run.precision}")
    ref_c, ref_r = _load_logps(dpo_dir / "reference.safetensors")
    if ref_c.numel() != len(ps) or ref_r.numel() != len(ps):
        raise SftdpoError(f"{dpo_dir}/reference.safetensors has {ref_c.numel()} entries for {len(ps)} pairs")
    log.info("DPO: reusing the pairs and reference log-probs saved in %s", dpo_dir)
    info = {k: v for k, v in persisted.items() if k not in ("fingerprint", "key_fields")}
    info["reused_from_run_dir"] = True
    return DPOObjective(run, ps, ref_c, ref_r, info)
