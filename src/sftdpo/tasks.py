"""The two tasks: how examples become token batches, the SFT loss, and dev evaluation.

Paraphrase detection is a cloze: the model reads the CS224N prompt and the answer is the next
token, "yes" or "no". Sonnet continuation is causal LM training on whole sonnets and, at
evaluation, sampling the rest of a sonnet from its first three lines, scored with chrF.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import stats
from .config import RunConfig, SftdpoError
from .data import ParaphraseData, ParaphraseExample, SonnetData, Sonnet, subsample
from .distributed import shard
from .models import autocast, single_token_id

# CS224N GPT-2 project's cloze prompt, verbatim (including its unclosed quote after question 2).
CS224N_PROMPT = 'Question 1: "{q1}"\nQuestion 2: "{q2}\nAre these questions asking the same thing?\n'
SONNET_PROMPT_LINES = 3


@dataclass
class Batch:
    """Right-padded token batch. `last` is each row's last real position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    index: torch.Tensor  # rows of the dataset this batch holds
    n_tokens: int  # non-padding tokens
    labels: torch.Tensor | None = None  # paraphrase: label token ids; sonnet: per-position targets (-100 = ignore)
    share: float = 1.0  # data parallel: this rank's share of the global batch's loss (distributed.shard)

    def to(self, device: torch.device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.last), self.index, self.n_tokens, mv(self.labels),
                     self.share)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, index: Sequence[int]) -> Batch:
    n = len(seqs)
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return Batch(ids, mask, last, torch.tensor(list(index)), int(mask.sum()))


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within windows of 50 batches, shuffle the batches.
    Rows in a batch have similar lengths, so padding waste stays small while the order stays random.
    Deterministic in `seed`, which is what makes an interrupted run resume exactly."""
    idx = list(range(len(lengths)))
    if not shuffle:
        order = sorted(idx, key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(idx), generator=g).tolist()
    window = batch_size * 50
    batches: list[list[int]] = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def last_token_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at each row's last real position only. Running the decoder and projecting just
    those rows skips the (seq_len x vocab) LM-head product that a plain forward computes."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
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
    plain = type(head) is not torch.nn.Linear or any(getattr(config, k, None) is not None for k in _LOGIT_TRANSFORMS)
    if plain:  # an adapted or transformed output layer: the model's own forward
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask].float()
        return torch.log_softmax(logits, dim=-1).gather(1, target[mask][:, None]).squeeze(1), rows
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h = hidden[:, :-1][mask]
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return _TargetLogProb.apply(h, head.weight, head.bias, target[mask], dtype), rows


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class Task:
    name: str
    primary_metric: str
    metrics: tuple[str, ...]
    rank, world_size = 0, 1  # data parallelism (set by training.Run; see distributed.py)

    def __init__(self, cfg: RunConfig, tok) -> None:
        self.cfg, self.tok = cfg, tok
        self.pad_id = tok.pad_token_id

    def train_lengths(self) -> list[int]:
        return [len(s) for s in self.train_ids]

    def sft_batches(self, epoch: int) -> Iterator[Batch]:
        for rows, share in self.train_shards(self.train_lengths(), epoch, self.sft_loss_units()):
            b = self.collate(rows)
            b.share = share
            yield b

    def n_sft_batches(self) -> int:
        return self.n_train_batches(len(self.train_ids))

    def sft_loss_units(self) -> list[int] | None:
        """What sft_loss averages over, per training row (None: the rows themselves)."""
        return None

    def train_shards(self, lengths: Sequence[int], epoch: int, units: Sequence[int] | None = None) -> list[tuple[list[int], float]]:
        """An epoch's training batches as (rows, loss share) for this rank: its part of each global batch
        of batch_size x world_size rows (the batches themselves, share 1, in one process)."""
        global_batches = bucketed_batches(lengths, self.cfg.batch_size * self.world_size, epoch_seed(self.cfg.seed, epoch))
        return shard(global_batches, self.rank, self.world_size, units)

    def n_train_batches(self, n_rows: int) -> int:
        return math.ceil(n_rows / (self.cfg.batch_size * self.world_size))


class ParaphraseTask(Task):
    name = "paraphrase"
    primary_metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "f1_positive")

    def __init__(self, cfg: RunConfig, tok, data: ParaphraseData) -> None:
        super().__init__(cfg, tok)
        words = [w.strip() for w in cfg.label_words.split(",")]
        if len(words) != 2 or words[0] == words[1]:
            raise SftdpoError(f"--label-words needs two different words, positive first (got {cfg.label_words!r})")
        self.yes_id, self.no_id = single_token_id(tok, words[0]), single_token_id(tok, words[1])
        self.source = data.source
        self.dev_dropped_overlap = data.dev_dropped_overlap
        self.train = subsample(data.train, cfg.max_train_examples, cfg.data_fraction, seed=0,
                               label=(lambda e: e.label) if cfg.balance_labels else None)
        self.dev = subsample(data.dev, cfg.max_dev_examples, 1.0, seed=0)
        if not self.train or not self.dev:
            raise SftdpoError("paraphrase data is empty after subsampling: check --train/--dev and --max-*-examples")
        self.train_ids = [self.encode(e) for e in self.train]
        self.dev_ids = [self.encode(e) for e in self.dev]
        self.train_labels = [self.label_id(e) for e in self.train]

    def prompt(self, e: ParaphraseExample) -> str:
        return CS224N_PROMPT.format(q1=e.q1, q2=e.q2)

    def encode(self, e: ParaphraseExample) -> list[int]:
        ids = self.tok(self.prompt(e), add_special_tokens=False).input_ids
        return ids[-self.cfg.max_length :]  # keep the question's end and the instruction

    def label_id(self, e: ParaphraseExample) -> int:
        return self.yes_id if e.label == 1 else self.no_id

    def collate(self, rows: Sequence[int], split: str = "train") -> Batch:
        ids = self.train_ids if split == "train" else self.dev_ids
        b = pad_batch([ids[i] for i in rows], self.pad_id, rows)
        if split == "train":
            b.labels = torch.tensor([self.train_labels[i] for i in rows])
        return b

    def sft_loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the label token at the last prompt position, over the full vocabulary (as CS224N)."""
        logits = last_token_logits(model, batch)
        return F.cross_entropy(logits, batch.labels), {}

    @torch.no_grad()
    def predict(self, model, device: torch.device, precision: str) -> list[int]:
        preds = [0] * len(self.dev)
        for rows in bucketed_batches([len(s) for s in self.dev_ids], self.cfg.eval_batch_size, 0, shuffle=False):
            b = self.collate(rows, "dev").to(device)
            with autocast(device, precision):
                logits = last_token_logits(model, b)
            yes = logits[:, self.yes_id] > logits[:, self.no_id]
            for i, y in zip(rows, yes.tolist()):
                preds[i] = int(y)
        return preds

    def evaluate(self, model, device: torch.device, precision: str) -> tuple[dict, list[tuple[str, str, str]]]:
        model.eval()
        preds = self.predict(model, device, precision)
        refs = [e.label for e in self.dev]
        metrics = {
            "accuracy": stats.accuracy(preds, refs),
            "macro_f1": stats.macro_f1(preds, refs),
            "f1_positive": stats.f1_positive(preds, refs),
        }
        outputs = [(e.id, str(p), str(e.label)) for e, p in zip(self.dev, preds)]
        return metrics, outputs


class SonnetTask(Task):
    name = "sonnet"
    primary_metric = "chrf"
    metrics = ("chrf", "chrf_continuation")

    def __init__(self, cfg: RunConfig, tok, data: SonnetData) -> None:
        super().__init__(cfg, tok)
        self.source = data.source
        self.train = subsample(data.train, cfg.max_train_examples, cfg.data_fraction, seed=0)
        self.dev = subsample(data.dev, cfg.max_dev_examples, 1.0, seed=0)
        self.test_prompts = data.test_prompts
        if not self.train or not self.dev:
            raise SftdpoError("sonnet data is empty after subsampling: check --train/--dev and --max-*-examples")
        self.train_ids = [self.encode(s.text) for s in self.train]

    def encode(self, text: str) -> list[int]:
        # The end-of-text token is trained so that generation learns where a sonnet stops.
        return (self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id])[: self.cfg.max_length]

    def collate(self, rows: Sequence[int], split: str = "train") -> Batch:
        b = pad_batch([self.train_ids[i] for i in rows], self.pad_id, rows)
        labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
        b.labels = labels
        return b

    def sft_loss_units(self) -> list[int]:
        return [len(s) - 1 for s in self.train_ids]  # target tokens: every position but the first

    def sft_loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Causal LM loss over the sonnet's tokens (mean over target tokens); padding masked out (labels
        -100). The LM head runs on target positions only (target_logprobs)."""
        logp, _ = target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
        return -logp.mean(), {}

    def prompt_text(self, s: Sonnet) -> str:
        return s.prompt(SONNET_PROMPT_LINES) + "\n"

    @torch.no_grad()
    def generate_ids(self, model, prompts: Sequence[str], device: torch.device, precision: str, *, temperature: float,
                     top_p: float, max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                     batch_size: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (`num_samples` rows per prompt, prompt-major), end of text cut off."""
        model.eval()
        model = merged_for_decoding(model)
        batch_size = batch_size or self.cfg.eval_batch_size
        out: list[list[int]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = [self.tok(p, add_special_tokens=False).input_ids for p in prompts[start : start + batch_size]]
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, c in enumerate(chunk):  # left padding: every row's next token lands in the same column
                    ids[i, width - len(c) :] = torch.tensor(c)
                    mask[i, width - len(c) :] = 1
                with autocast(device, precision):
                    out += decode(model, ids.repeat_interleave(num_samples, 0).to(device),
                                  mask.repeat_interleave(num_samples, 0).to(device), max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, eos_id=self.tok.eos_token_id)
        return out

    def generate(self, model, prompts: Sequence[str], device: torch.device, precision: str, *, temperature: float,
                 top_p: float, max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                 batch_size: int | None = None) -> list[list[str]]:
        """Continuations for each prompt (`num_samples` each) as text, batched with the KV cache."""
        ids = self.generate_ids(model, prompts, device, precision, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed, batch_size=batch_size)
        texts = [self.tok.decode(seq, skip_special_tokens=True).rstrip() for seq in ids]
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def evaluate(self, model, device: torch.device, precision: str) -> tuple[dict, list[tuple[str, str, str]]]:
        """chrF (sacrebleu CHRF defaults, corpus level) on the full sonnet, prompt lines included (the CS224N
        convention), and on the continuation only. With several samples, the mean of the per-sample corpus scores."""
        cfg = self.cfg
        gens = self.generate(model, [self.prompt_text(s) for s in self.dev], device, precision, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, seed=cfg.seed)
        refs = [s.text for s in self.dev]
        ref_cont = [s.continuation(SONNET_PROMPT_LINES) for s in self.dev]
        full = [[(s.prompt(SONNET_PROMPT_LINES) + "\n" + g[k]).strip() for s, g in zip(self.dev, gens)] for k in range(cfg.num_samples)]
        cont = [[g[k].strip() for g in gens] for k in range(cfg.num_samples)]
        metrics = {
            "chrf": sum(stats.corpus_chrf(h, refs) for h in full) / cfg.num_samples,
            "chrf_continuation": sum(stats.corpus_chrf(h, ref_cont) for h in cont) / cfg.num_samples,
        }
        self.last_generations = [(s.number, [f[i] for f in full]) for i, s in enumerate(self.dev)]
        outputs = [(str(s.number), full[0][i], refs[i]) for i, s in enumerate(self.dev)]
        return metrics, outputs


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
    """A LoRA model with its (enabled) adapter merged into a copy of its weights, else the model itself.
    A decode step is launch-bound on CPU, and unmerged LoRA adds two small matmuls per adapted layer
    to every step. The trained model is left untouched (no merge/unmerge drift)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or any(m.disable_adapters for m in layers):  # disabled: the base model runs as is
        return model
    return copy.deepcopy(model).merge_and_unload()


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_p: float,
           eos_id: int) -> list[list[int]]:
    """KV-cache decoding of left-padded prompts; each row stops at end of text (not included)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    pos = pos[:, -1:]
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        nxt = sample_next(step.logits[:, -1], temperature, top_p).masked_fill(done, eos_id)
        new.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        # transformers >= 5.2x names the KV cache `cache` (`past_key_values` before, deprecated since)
        kv = {"cache": step.cache} if hasattr(step, "cache") else {"past_key_values": step.past_key_values}
        step = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kv)
    rows = torch.stack(new, 1).tolist() if new else [[] for _ in range(ids.size(0))]
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def make_task(cfg: RunConfig, tok) -> Task:
    from .data import load_paraphrase_data, load_sonnet_data

    if cfg.task == "paraphrase":
        return ParaphraseTask(cfg, tok, load_paraphrase_data(cfg.train, cfg.dev))
    return SonnetTask(cfg, tok, load_sonnet_data(cfg.train, cfg.dev))
