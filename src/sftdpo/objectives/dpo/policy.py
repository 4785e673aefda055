"""What every pair objective (DPO, CPO/SimPO, ORPO) shares: its batches of pairs and the policy's
log-probs of them (PairObjective).

One-token responses (classification): one forward pass per prompt, the log-softmax at its last position
gives the chosen and every rejected label's log-prob; the pairs of a row are flattened to one entry per
(prompt, rejected label), as TRL would see them (one row per pair). Sequences (generation): 2B rows
(prompt + chosen, then prompt + rejected) in one forward pass, the LM head on the response positions
only (ops.logprobs.target_logprobs), per-row sums of the response tokens' log-probs; with `ld_alpha`
(LD-DPO) the tokens past the shorter response's length count ld_alpha times; with `whole_chosen`
(ORPO's NLL) the chosen rows' prompt tokens are scored too, in the same pass. WPO's weights need each
response position's whole next-token distribution (log Σ_v p(v)²): for sequences a second, no-grad
forward pass computes them in chunks of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ...config import RunConfig
from ...ops.batching import Batch
from ...ops.logprobs import last_token_logits, target_logprobs
from ...tasks import Task
from .loss import ld_weights
from .pairs import PairBatch, PairSet, collate_sequence_pairs, one_token_responses, prompt_batch

WPO_CHUNK_ROWS = 4  # rows per no-grad forward of the WPO weights: bounds the (rows x length x vocabulary) logits


@dataclass
class PolicyLogps:
    """Per pair (P,): the policy's log-probs of the chosen and rejected responses (their tokens' summed,
    LD-weighted with ld_alpha), the chosen's plain sum (what an SFT or NLL term averages), the response
    token counts; WPO's per-response mean of log p(y_t) - log Σ_v p(v)² (no gradient) when asked; and
    with whole_chosen, the chosen sequences' (prompt and response) summed token log-probs and count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_plain: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    wpo_chosen: torch.Tensor | None = None
    wpo_rejected: torch.Tensor | None = None
    whole_chosen_sum: torch.Tensor | None = None
    whole_chosen_tokens: torch.Tensor | None = None

    def wpo_weights(self) -> torch.Tensor | None:
        """WPO's pair weight w_w · w_l, w = exp(the response's mean aligned log-prob) (TRL's product)."""
        if self.wpo_chosen is None:
            return None
        return torch.exp(self.wpo_chosen) * torch.exp(self.wpo_rejected)


def _log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_v p(v)² of each row's softmax, from fp32 logits."""
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def wpo_means(model, batch: Batch) -> torch.Tensor:
    """Per row: the mean over its response tokens (labels != -100) of log p(y_t) - log Σ_v p(v)², from
    the model's full next-token distributions (a no-grad forward, WPO_CHUNK_ROWS rows at a time)."""
    out = []
    for s in range(0, batch.input_ids.size(0), WPO_CHUNK_ROWS):
        e = s + WPO_CHUNK_ROWS
        logits = model(input_ids=batch.input_ids[s:e], attention_mask=batch.attention_mask[s:e]).logits[:, :-1].float()
        target = batch.labels[s:e, 1:]
        mask = target != -100
        logp = logits.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        aligned = (logp - _log_sum_sq_probs(logits)) * mask
        out.append(aligned.sum(-1) / mask.sum(-1).clamp(min=1))
    return torch.cat(out)


def one_token_pair_logps(model, pb: PairBatch, *, wpo: bool = False, whole_chosen: bool = False) -> PolicyLogps:
    """PolicyLogps of one-token responses: one forward pass of the prompts (a second for whole_chosen:
    the prompts' own tokens need the LM head at every position)."""
    logits = last_token_logits(model, pb.batch)
    logp = torch.log_softmax(logits, dim=-1)
    keep = pb.mask
    pc = logp.gather(1, pb.chosen[:, None]).expand_as(pb.rejected)[keep]
    pr = logp.gather(1, pb.rejected)[keep]
    ones = torch.ones_like(pc)
    out = PolicyLogps(pc, pr, pc, ones, ones)
    if wpo:
        with torch.no_grad():
            lss = _log_sum_sq_probs(logits.float())[:, None].expand_as(pb.rejected)[keep]
            out.wpo_chosen, out.wpo_rejected = pc.detach() - lss, pr.detach() - lss
    if whole_chosen:  # each pair's chosen sequence: the prompt's tokens (after its first), then the answer
        b = pb.batch
        lp, rows = target_logprobs(model, b.input_ids, b.attention_mask, b.input_ids.masked_fill(b.attention_mask == 0, -100))
        n = b.input_ids.size(0)
        prompt_sum = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
        prompt_tokens = torch.bincount(rows, minlength=n).to(lp.dtype)
        pairs = keep.sum(1).to(lp.dtype)  # a prompt's chosen sequence counts once per pair, as TRL's pair rows
        out.whole_chosen_sum = (prompt_sum * pairs).sum() + pc.sum()
        out.whole_chosen_tokens = (prompt_tokens * pairs).sum() + pc.numel()
    return out


def sequence_pair_logps(model, pb: PairBatch, *, ld_alpha: float | None = None, wpo: bool = False,
                        whole_chosen: bool = False) -> PolicyLogps:
    """PolicyLogps of sequence pairs: one forward pass over the 2B rows (and a no-grad one for WPO)."""
    b, n = pb.batch, pb.chosen_len.size(0)
    labels = b.labels
    scored = labels
    if whole_chosen:  # ORPO's NLL: the chosen rows' every real token after the first
        scored = labels.clone()
        scored[:n] = b.input_ids[:n].masked_fill(b.attention_mask[:n] == 0, -100)
    logp, rows = target_logprobs(model, b.input_ids, b.attention_mask, scored)
    response = labels[:, 1:][scored[:, 1:] != -100] != -100  # which scored tokens are response tokens
    r_logp, r_rows = logp[response], rows[response]
    plain = torch.zeros(2 * n, dtype=logp.dtype, device=logp.device).index_add(0, r_rows, r_logp)
    summed = plain
    if ld_alpha is not None:
        counts = torch.bincount(r_rows, minlength=2 * n)
        shared = torch.minimum(counts[:n], counts[n:])
        summed = torch.zeros_like(plain).index_add(0, r_rows, r_logp * ld_weights(r_rows, 2 * n, torch.cat([shared, shared]),
                                                                                ld_alpha))
    out = PolicyLogps(summed[:n], summed[n:], plain[:n], pb.chosen_len.to(logp.device), pb.rejected_len.to(logp.device))
    if wpo:
        w = wpo_means(model, b)
        out.wpo_chosen, out.wpo_rejected = w[:n], w[n:]
    if whole_chosen:
        chosen_rows = rows < n
        out.whole_chosen_sum = logp[chosen_rows].sum()
        out.whole_chosen_tokens = chosen_rows.sum().to(logp.dtype)
    return out


@torch.no_grad()
def response_logps(model, batch: Batch, n_pairs: int, ld_alpha: float | None = None) -> torch.Tensor:
    """Per row of a sequence-pair batch (2 x n_pairs rows): the response's summed token log-probs,
    LD-weighted with ld_alpha (what the reference log-probs are)."""
    pb = PairBatch(batch, None, None, torch.zeros(n_pairs), torch.zeros(n_pairs))
    lp = sequence_pair_logps(model, pb, ld_alpha=ld_alpha)
    return torch.cat([lp.chosen, lp.rejected])


class PairObjective:
    """A preference objective over the pairs of a PairSet: the pair objectives' shared batching (each
    epoch's steps over the pair rows, as Task.train_steps draws them) and the policy's log-probs.
    `ref_chosen`/`ref_rejected`: the cached reference log-probs (None: a reference-free objective)."""

    stage = "dpo"  # the preference stage, whatever its objective
    train_mode = False  # dropout off (TRL's disable_dropout; DPO: policy == reference exactly at the start)

    def __init__(self, cfg: RunConfig, task: Task, ps: PairSet, ref_chosen: torch.Tensor | None,
                 ref_rejected: torch.Tensor | None, info: dict) -> None:
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
        ref_c = None if self.ref_chosen is None else self.ref_chosen[idx]
        ref_r = None if self.ref_rejected is None else self.ref_rejected[idx]
        lens = (self.chosen_len[idx], self.rejected_len[idx])
        if self.one_token:
            b, chosen, rejected, mask = prompt_batch(self.task, self.ps, rows)
            pb = PairBatch(b, ref_c, None if ref_r is None else ref_r[:, : rejected.size(1)], *lens, chosen, rejected, mask)
        else:
            pb = PairBatch(collate_sequence_pairs(self.ps, rows, self.task.pad_id), ref_c, ref_r, *lens)
        pb.batch.share = share
        return pb

    def n_steps(self) -> int:
        return self.task.n_train_steps(len(self.ps))

    def n_tokens(self, batch: PairBatch) -> int:
        return batch.n_tokens

    def policy_logps(self, model, batch: PairBatch, *, ld_alpha: float | None = None, wpo: bool = False,
                     whole_chosen: bool = False) -> PolicyLogps:
        """The policy's log-probs of the batch's pairs, one entry per pair."""
        if self.one_token:
            return one_token_pair_logps(model, batch, wpo=wpo, whole_chosen=whole_chosen)
        return sequence_pair_logps(model, batch, ld_alpha=ld_alpha, wpo=wpo, whole_chosen=whole_chosen)

    def pair_refs(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's reference log-probs, one entry per pair (as policy_logps)."""
        rc, rr = batch.ref_chosen, batch.ref_rejected
        if self.one_token:  # every (prompt, rejected label) slot that is a pair, flattened
            return rc[:, None].expand_as(rr)[batch.mask], rr[batch.mask]
        return rc, rr
