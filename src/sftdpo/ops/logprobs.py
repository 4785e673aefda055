"""Log-probabilities from a causal LM without the (sequence x vocabulary) logits a plain forward
builds: the decoder runs once and the LM head only where a log-prob is needed (the last prompt
position of a cloze, the target tokens of a sequence). Equal to log-softmax of the plain forward's
logits up to float rounding (tests/test_ops.py). A virtual-token adapter (prefix or prompt tuning)
lives in its PeftModel's own forward, which the decoder alone would bypass: such models take the
plain forward, with every position shifted by the virtual tokens the forward puts first."""

from __future__ import annotations

import weakref

import torch

from ..peft_methods import virtual_tokens
from .batching import Batch

# --compile: each model's compiled decoder (the models themselves stay as they are: checkpoints,
# LoRA merging and generation see the plain modules)
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def compile_decoder(model) -> None:
    """Send the decoder calls of the losses and of classification evaluation (the two functions
    below) through torch.compile with dynamic shapes: one graph serves every sequence length and
    batch size of the length-bucketed batches, where static shapes would compile one per length.
    Generation stays eager: its KV-cache loop meets a new cache length at every token."""
    _COMPILED[model] = torch.compile(model.get_decoder(), dynamic=True)


def decoder(model) -> torch.nn.Module:
    """The model's decoder, compiled if compile_decoder was called for it."""
    compiled = _COMPILED.get(model)
    return model.get_decoder() if compiled is None else compiled


def last_token_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at each row's last real position only. Running the decoder and projecting just
    those rows skips the (seq_len x vocab) LM-head product that a plain forward computes."""
    if virtual_tokens(model):  # the PeftModel's forward puts its virtual tokens first (prompt tuning: in the logits)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        shift = logits.size(1) - batch.input_ids.size(1)
        return logits[torch.arange(logits.size(0), device=logits.device), batch.last + shift].float()
    hidden = decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    h = hidden[torch.arange(hidden.size(0), device=hidden.device), batch.last]
    return model.get_output_embeddings()(h).float()


# Output-layer settings under which logits are not just `hidden @ W.T (+ b)`: such models take the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
# rows per chunk of the fp32 softmax statistics: on CPU few enough to stay in cache (~30% faster than
# big chunks), on GPUs many (each chunk costs kernel launches)
_HEAD_CHUNK_ROWS = {"cpu": 32}
_HEAD_CHUNK_ROWS_DEFAULT = 4096


def _head_chunk(device: torch.device) -> int:
    return _HEAD_CHUNK_ROWS.get(device.type, _HEAD_CHUNK_ROWS_DEFAULT)


class _TargetLogProb(torch.autograd.Function):
    """log p(target) for each row of `hidden @ weight.T (+ bias)`, with the (N, vocab) logits held once,
    in the compute dtype (bf16 under autocast), and turned into their own gradient in place in the
    backward. The plain path (`cross_entropy` on `logits.float()`) also keeps an fp32 copy of the
    logits, an fp32 log-softmax and several (N, vocab) gradient buffers. Same math: the matrix
    products run in the compute dtype as autocast runs a Linear, the softmax statistics in fp32.
    Single backward only (the saved logits are overwritten)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, compute_dtype):  # noqa: D102
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            logits = h @ w.t()
            if bias is not None:
                logits += bias.to(compute_dtype)
            lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
            chunk = _head_chunk(logits.device)
            for s in range(0, logits.size(0), chunk):
                lse[s : s + chunk] = torch.logsumexp(logits[s : s + chunk].float(), dim=-1)
            out = logits.gather(1, target[:, None]).squeeze(1).float() - lse
        ctx.save_for_backward(h, w, lse, target)
        ctx.logits = logits
        ctx.has_bias, ctx.hidden_dtype, ctx.weight_dtype = bias is not None, hidden.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        h, w, lse, target = ctx.saved_tensors
        logits, ctx.logits = ctx.logits, None
        grad = grad.float()
        with torch.autocast(h.device.type, enabled=False):
            chunk = _head_chunk(logits.device)
            for s in range(0, logits.size(0), chunk):
                e = s + chunk
                g = grad[s:e, None]
                d = logits[s:e].float().sub_(lse[s:e, None]).exp_().mul_(-g)  # -g * softmax
                d.scatter_add_(1, target[s:e, None], g)  # + g at the target
                logits[s:e] = d
            grad_h = (logits @ w).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
            grad_w = (logits.t() @ h).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
            grad_b = logits.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None


def target_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, row) of every target token: position t predicts labels[:, t + 1] where that is not -100.
    Runs the decoder, then the LM head on the target positions only (not on padding or prompt
    positions), without materialising fp32 logits (see _TargetLogProb). Equal to log-softmax of the
    plain forward's logits up to float rounding."""
    target = labels[:, 1:]
    mask = target != -100
    rows = mask.nonzero()[:, 0]
    head = model.get_output_embeddings()
    config = model.config
    plain = (type(head) is not torch.nn.Linear or any(getattr(config, k, None) is not None for k in _LOGIT_TRANSFORMS)
             or virtual_tokens(model))
    if plain:  # an adapted or transformed output layer, or virtual tokens: the model's own forward
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, logits.size(1) - input_ids.size(1):][:, :-1][mask].float()
        return torch.log_softmax(logits, dim=-1).gather(1, target[mask][:, None]).squeeze(1), rows
    hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h = hidden[:, :-1][mask]
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return _TargetLogProb.apply(h, head.weight, head.bias, target[mask], dtype), rows


def next_token_logps(model, batch: Batch, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(chosen[i]), log p(rejected[i])) of one-token answers after each prompt, from ONE forward
    pass: log-softmax over the full vocabulary at the last prompt position."""
    logp = torch.log_softmax(last_token_logits(model, batch), dim=-1)
    return (logp.gather(1, chosen.to(logp.device)[:, None]).squeeze(1),
            logp.gather(1, rejected.to(logp.device)[:, None]).squeeze(1))


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
