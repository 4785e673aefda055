"""Prompt -> completion generation (`--task generate`), on TRL's dataset formats (data/generate.py).

SFT: the causal LM loss on the completion only (`--completion-only-loss`, TRL's default; off: on
every token), the prompt and the completion tokenized separately and concatenated, then end of
text. Conversations are rendered with the tokenizer's chat template. Evaluation: the dev prompts'
completions, sampled (`--temperature`, `--top-p`, `--max-new-tokens`; temperature 0: greedy), scored
against the references with sacrebleu's corpus chrF and BLEU (`--metric` picks the primary one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import stats
from ..config import RunConfig, SftdpoError
from ..data import GenerateData
from ..data.subsets import subsample
from ..files import write_text_atomic
from ..ops.batching import Batch, pad_batch
from ..ops.generation import generate_ids
from ..ops.logprobs import target_logprobs
from .base import Evaluation, Task


@dataclass(frozen=True)
class PromptExample:
    """A prompt to complete and its reference completion, as text."""

    id: str
    prompt: str
    completion: str


class GenerateTask(Task):
    name = "generate"
    kind = "generate"

    def __init__(self, cfg: RunConfig, tok, data: GenerateData, **shard) -> None:
        super().__init__(cfg, tok, **shard)
        self.primary_metric = cfg.metric
        self.metrics = ("chrf", "bleu")
        self.source = data.source
        self.conversational = data.format == "conversational"
        if self.conversational and not getattr(tok, "chat_template", None):
            raise SftdpoError(f"the {data.format} data needs a chat template, and the tokenizer of --model {cfg.model} "
                              "has none: use a chat model (e.g. smollm2-135m) or prompt-completion text")
        self.train = subsample(data.train, cfg.max_train_examples, cfg.data_fraction, seed=0)
        dev = subsample(data.dev, cfg.max_dev_examples, 1.0, seed=0)
        if not self.train or not dev:
            raise SftdpoError("generate data is empty after subsampling: check --train/--dev and --max-*-examples")
        self.dev = [self.as_text(e) for e in dev]
        self.train_texts = [self.as_text(e) for e in self.train]
        self.set_train(self.train_texts, cfg.completion_only_loss)
        # DPO pair construction: the training prompts and their gold completions
        self.pair_examples = self.train_texts if data.format != "language-modeling" else [
            PromptExample(e.id, *_split_lines(e.completion, cfg.prompt_lines)) for e in self.train_texts]
        self.check_prompt_room([e.prompt for e in self.dev])

    # -- text --------------------------------------------------------------------------------
    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def as_text(self, e) -> PromptExample:
        """A prompt and completion as text: conversations rendered with the chat template (the
        completion is what the full conversation adds to the prompt with its generation prompt)."""
        if not self.conversational:
            return PromptExample(e.id, e.prompt, e.completion)
        prompt = self.render(e.prompt, True)
        full = self.render(e.prompt + e.completion, False)
        if not full.startswith(prompt):
            raise SftdpoError(f"example {e.id}: the chat template renders the conversation so that it does not start "
                              "with its prompt; use prompt-completion text instead")
        return PromptExample(e.id, prompt, full[len(prompt):])

    def tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def response_tokens(self, text: str) -> list[int]:
        """A completion's tokens, then end of text, so that generation learns to stop; a completion
        rendered by a chat template ends its turn with the end token already."""
        eos = self.tok.eos_token
        return self.tokens(text) + ([] if eos and eos in text else [self.tok.eos_token_id])

    # -- training ----------------------------------------------------------------------------
    def set_train(self, examples: list[PromptExample], completion_only: bool) -> None:
        """Token ids of the training sequences (prompt + completion + end of text, cut at --max-length)
        and where each one's loss starts."""
        self.train_ids, self.loss_start = [], []
        for e in examples:
            prompt = self.tokens(e.prompt) if e.prompt else []
            seq = (prompt + self.response_tokens(e.completion))[: self.cfg.max_length]
            start = min(len(prompt), len(seq) - 1) if completion_only else 0
            self.train_ids.append(seq)
            self.loss_start.append(start)

    def check_prompt_room(self, prompts: list[str]) -> None:
        longest = max(len(self.tokens(p)) for p in prompts)
        if self.cfg.max_length <= longest:
            raise SftdpoError(f"--max-length {self.cfg.max_length} is too short for the {self.cfg.task} prompts: the "
                              f"longest dev prompt is {longest} tokens; give more than that (e.g. 512)")

    def collate(self, rows: Sequence[int], split: str = "train") -> Batch:
        b = pad_batch([self.train_ids[i] for i in rows], self.pad_id, rows)
        labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
        for j, i in enumerate(rows):
            labels[j, : self.loss_start[i]] = -100  # the prompt: no loss (the completion's first token is a target)
        b.labels = labels
        return b

    def sft_loss_units(self) -> list[int]:
        # target tokens: every position after the loss start (a sequence's first token is never a target)
        return [len(s) - max(1, start) for s, start in zip(self.train_ids, self.loss_start)]

    def sft_loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Causal LM loss, the mean over target tokens; padding (and the prompt) masked out (labels -100).
        The LM head runs on target positions only (target_logprobs)."""
        logp, _ = target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
        return -logp.mean(), {}

    # -- generation --------------------------------------------------------------------------
    def generate_ids(self, model, prompts: Sequence[str], device: torch.device, precision: str, *, temperature: float,
                     top_p: float, max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                     batch_size: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (`num_samples` rows per prompt, prompt-major), end of text cut off."""
        return generate_ids(model, [self.tokens(p) for p in prompts], device, precision, pad_id=self.pad_id,
                            eos_id=self.tok.eos_token_id, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed,
                            batch_size=batch_size or self.cfg.eval_batch_size)

    def generate(self, model, prompts: Sequence[str], device: torch.device, precision: str, *, temperature: float,
                 top_p: float, max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                 batch_size: int | None = None) -> list[list[str]]:
        """Continuations for each prompt (`num_samples` each) as text, batched with the KV cache."""
        ids = self.generate_ids(model, prompts, device, precision, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed, batch_size=batch_size)
        texts = [self.tok.decode(seq, skip_special_tokens=True).rstrip() for seq in ids]
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def dev_generations(self, model, device: torch.device, precision: str) -> list[list[str]]:
        cfg = self.cfg
        return self.generate(model, [e.prompt for e in self.dev], device, precision, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples,
                             seed=cfg.seed)

    def reference(self, e: PromptExample) -> str:
        """A dev completion as the generations are scored against it: without the tokenizer's special
        tokens (a chat template's end-of-turn marker), which the generated text never holds (decoded
        with skip_special_tokens)."""
        text = e.completion
        for t in self.tok.all_special_tokens:
            text = text.replace(t, "")
        return text.strip()

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        """chrF and BLEU (sacrebleu defaults, corpus level) of the generated completions against the
        references; with several samples, the mean of the per-sample corpus scores."""
        gens = self.dev_generations(model, device, precision)
        refs = [self.reference(e) for e in self.dev]
        k = self.cfg.num_samples
        hyps = [[g[s].strip() for g in gens] for s in range(k)]
        metrics = {"chrf": sum(stats.corpus_chrf(h, refs) for h in hyps) / k,
                   "bleu": sum(stats.corpus_bleu(h, refs) for h in hyps) / k}
        outputs = [(e.id, hyps[0][i], refs[i]) for i, e in enumerate(self.dev)]
        return Evaluation(metrics, outputs, [(i, [h[i] for h in hyps]) for i in range(len(self.dev))])

    def write_outputs(self, out: Path, ev: Evaluation) -> None:
        """generations.jsonl: per dev example its prompt, the generated completion(s) and the reference."""
        write_text_atomic(out / "generations.jsonl", "".join(
            json.dumps({"id": e.id, "prompt": e.prompt, "completion": samples[0], "samples": samples,
                        "reference": e.completion}, ensure_ascii=False) + "\n"
            for e, (_, samples) in zip(self.dev, ev.generations)))


def _split_lines(text: str, n: int) -> tuple[str, str]:
    lines = text.split("\n")
    return "\n".join(lines[:n]) + "\n", "\n".join(lines[n:])


__all__ = ["GenerateTask", "PromptExample"]
