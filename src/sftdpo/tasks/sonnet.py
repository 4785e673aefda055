"""Sonnet continuation: causal LM training on whole sonnets and, at evaluation, sampling the rest of a
sonnet from its first three lines, scored with chrF."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import stats
from ..config import RunConfig, SftdpoError
from ..data import Sonnet, SonnetData, subsample
from ..ops.batching import Batch, pad_batch
from ..ops.generation import generate_ids
from ..ops.logprobs import target_logprobs
from .base import Evaluation, Task

SONNET_PROMPT_LINES = 3


class SonnetTask(Task):
    name = "sonnet"
    primary_metric = "chrf"
    metrics = ("chrf", "chrf_continuation")

    def __init__(self, cfg: RunConfig, tok, data: SonnetData, **shard) -> None:
        super().__init__(cfg, tok, **shard)
        self.source = data.source
        self.train = subsample(data.train, cfg.max_train_examples, cfg.data_fraction, seed=0)
        self.dev = subsample(data.dev, cfg.max_dev_examples, 1.0, seed=0)
        self.test_prompts = data.test_prompts
        if not self.train or not self.dev:
            raise SftdpoError("sonnet data is empty after subsampling: check --train/--dev and --max-*-examples")
        self.train_ids = [self.encode(s.text) for s in self.train]
        longest = max(len(tok(self.prompt_text(s), add_special_tokens=False).input_ids) for s in self.dev)
        if cfg.max_length <= longest:
            raise SftdpoError(f"--max-length {cfg.max_length} is too short for the sonnet prompts: the longest 3-line "
                              f"dev prompt is {longest} tokens; give more than that (e.g. 512)")

    def encode(self, text: str) -> list[int]:
        # The end-of-text token is trained so that generation learns where a sonnet stops.
        return (self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id])[: self.cfg.max_length]

    def collate(self, rows: Sequence[int], split: str = "train") -> Batch:
        b = pad_batch([self.train_ids[i] for i in rows], self.pad_id, rows)
        b.labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
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

    def generate_ids(self, model, prompts: Sequence[str], device: torch.device, precision: str, *, temperature: float,
                     top_p: float, max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                     batch_size: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (`num_samples` rows per prompt, prompt-major), end of text cut off."""
        ids = [self.tok(p, add_special_tokens=False).input_ids for p in prompts]
        return generate_ids(model, ids, device, precision, pad_id=self.pad_id, eos_id=self.tok.eos_token_id,
                            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            num_samples=num_samples, seed=seed, batch_size=batch_size or self.cfg.eval_batch_size)

    def generate(self, model, prompts: Sequence[str], device: torch.device, precision: str, *, temperature: float,
                 top_p: float, max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                 batch_size: int | None = None) -> list[list[str]]:
        """Continuations for each prompt (`num_samples` each) as text, batched with the KV cache."""
        ids = self.generate_ids(model, prompts, device, precision, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed, batch_size=batch_size)
        texts = [self.tok.decode(seq, skip_special_tokens=True).rstrip() for seq in ids]
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        """chrF (sacrebleu CHRF defaults, corpus level) on the full sonnet, prompt lines included (the CS224N
        convention), and on the continuation only. With several samples, the mean of the per-sample corpus scores."""
        cfg = self.cfg
        gens = self.generate(model, [self.prompt_text(s) for s in self.dev], device, precision, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, seed=cfg.seed)
        refs = [s.text for s in self.dev]
        ref_cont = [s.continuation(SONNET_PROMPT_LINES) for s in self.dev]
        full = [[(s.prompt(SONNET_PROMPT_LINES) + "\n" + g[k]).strip() for s, g in zip(self.dev, gens)]
                for k in range(cfg.num_samples)]
        cont = [[g[k].strip() for g in gens] for k in range(cfg.num_samples)]
        metrics = {
            "chrf": sum(stats.corpus_chrf(h, refs) for h in full) / cfg.num_samples,
            "chrf_continuation": sum(stats.corpus_chrf(h, ref_cont) for h in cont) / cfg.num_samples,
        }
        generations = [(s.number, [f[i] for f in full]) for i, s in enumerate(self.dev)]
        outputs = [(str(s.number), full[0][i], refs[i]) for i, s in enumerate(self.dev)]
        return Evaluation(metrics, outputs, generations)
