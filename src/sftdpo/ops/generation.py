"""Sampling from a causal LM: a batched KV-cache decode loop over left-padded prompts, exact
top-p (nucleus) sampling, and adapters decoded from merged weights (those that merge: not virtual
tokens, whose prefix or prompt the first step puts before the prompts). Works on token ids; the tasks
turn text into prompts and continuations."""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..models import autocast
from ..peft_methods import is_prefix, merges, virtual_tokens
from ..system import progress
from .batching import left_pad


# Decoding by hand rather than with HF `generate`: on a 2-core CPU its top-p warper sorts the whole
# vocabulary and multinomial draws over all of it at every step, a fifth of a 135M model's decode step.
# Top-p over the top-k logits is exact whenever they hold top_p of the mass; k grows through
# TOP_P_CANDIDATES until they do (then the full sort). Same tokens as HF's TopPLogitsWarper.
TOP_P_CANDIDATES = (256, 4096)


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of the top-p nucleus of each row, most likely first; probabilities
    outside the nucleus are zeroed, not renormalised (multinomial does not need it)."""
    logz = logits.logsumexp(-1, keepdim=True)
    for k in (*TOP_P_CANDIDATES, logits.size(-1)):
        vals, idx = logits.topk(min(k, logits.size(-1)), dim=-1)
        p = (vals - logz).exp()
        cum = p.cumsum(-1)
        if k >= logits.size(-1) or bool((cum[:, -1] >= top_p).all()):
            break
    return p.masked_fill(cum - p >= top_p, 0.0), idx  # drop a token once the more likely ones hold top_p


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling at `temperature`."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p >= 1:
        return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
    p, idx = nucleus(logits, top_p)
    return idx.gather(-1, torch.multinomial(p, 1)).squeeze(-1)


def merged_for_decoding(model):
    """A model with its (enabled) adapter merged into a copy of its weights, else the model itself.
    A decode step is launch-bound on CPU, and an unmerged adapter adds small matmuls per adapted layer
    to every step. The trained model is left untouched (no merge/unmerge drift). Virtual tokens do not
    merge: decode() puts them first."""
    if not merges(model):
        return model
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or any(m.disable_adapters for m in layers):  # disabled: the base model runs as is
        return model
    return copy.deepcopy(model).merge_and_unload()


def prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The first decode step over the left-padded prompts: (the model to continue with, its output, the
    attention mask so far, the position ids). Virtual tokens go first, as the PeftModel's forward puts
    them in training (positions 0..V-1, the prompt's from V): prompt tuning's as input embeddings,
    prefix tuning's as the cache; the steps that follow run the base model on that cache."""
    v = virtual_tokens(model)
    if not v:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return model, model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1), mask, pos
    base = model.get_base_model()
    n = ids.size(0)
    full = torch.cat([mask.new_ones(n, v), mask], dim=1)
    if is_prefix(model):
        pos = v + (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = model.get_prompt(n, max_cache_len=v + ids.size(1))
        # transformers >= 5.2x names the KV cache `cache` (`past_key_values` before, deprecated since)
        kv = {"cache": cache} if "cache" in inspect.signature(base.forward).parameters else {"past_key_values": cache}
        step = base(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True, logits_to_keep=1, **kv)
    else:
        pos = (full.long().cumsum(-1) - 1).clamp(min=0)
        embeds = model.word_embeddings(ids)
        embeds = torch.cat([model.get_prompt(batch_size=n).to(embeds.dtype), embeds], dim=1)
        step = base(inputs_embeds=embeds, attention_mask=full, position_ids=pos, use_cache=True, logits_to_keep=1)
    return base, step, full, pos


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_p: float,
           eos_id: int) -> list[list[int]]:
    """KV-cache decoding of left-padded prompts; each row stops at end of text (not included)."""
    model, step, mask, pos = prefill(model, ids, mask)
    pos = pos[:, -1:]
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    bar = progress(max_new_tokens, f"generating {ids.size(0)} rows")
    for t in range(max_new_tokens):
        nxt = sample_next(step.logits[:, -1], temperature, top_p).masked_fill(done, eos_id)
        new.append(nxt)
        done |= nxt == eos_id
        bar.update(1)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        # transformers >= 5.2x names the KV cache `cache` (`past_key_values` before, deprecated since)
        kv = {"cache": step.cache} if hasattr(step, "cache") else {"past_key_values": step.past_key_values}
        step = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kv)
    bar.close()
    rows = torch.stack(new, 1).tolist() if new else [[] for _ in range(ids.size(0))]
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], device: torch.device, precision: str, *, pad_id: int,
                 eos_id: int, temperature: float, top_p: float, max_new_tokens: int, num_samples: int = 1,
                 seed: int = 0, batch_size: int = 32) -> list[list[int]]:
    """New token ids for each prompt (`num_samples` rows per prompt, prompt-major), end of text cut
    off. Seeded (the global RNG is restored afterwards); batches of `batch_size` prompts."""
    model.eval()
    model = merged_for_decoding(model)
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_pad(prompts[start : start + batch_size], pad_id)  # every row's next token in one column
            with autocast(device, precision):
                out += decode(model, ids.repeat_interleave(num_samples, 0).to(device),
                              mask.repeat_interleave(num_samples, 0).to(device), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, eos_id=eos_id)
    return out
