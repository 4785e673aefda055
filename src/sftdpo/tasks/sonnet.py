"""Sonnet continuation, the paper's generation task: a preset of `--task generate` with the sonnet
readers, causal LM training on whole sonnets (the CS224N convention: the loss on every token), and at
evaluation the rest of a sonnet sampled from its first three lines, scored with chrF on the full
sonnet (prompt lines included, as CS224N) and on the continuation alone."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import stats
from ..config import RunConfig, SftdpoError
from ..data import Sonnet, SonnetData, write_cs224n_generations
from ..data.subsets import subsample
from .base import Evaluation, Task
from .generate import GenerateTask, PromptExample

SONNET_PROMPT_LINES = 3


class SonnetTask(GenerateTask):
    name = "sonnet"
    primary_metric = "chrf"
    metrics = ("chrf", "chrf_continuation")

    def __init__(self, cfg: RunConfig, tok, data: SonnetData, **shard) -> None:
        Task.__init__(self, cfg, tok, **shard)
        self.conversational = False
        self.source = data.source
        self.train = subsample(data.train, cfg.max_train_examples, cfg.data_fraction, seed=0)
        self.dev = subsample(data.dev, cfg.max_dev_examples, 1.0, seed=0)
        self.test_prompts = data.test_prompts
        if not self.train or not self.dev:
            raise SftdpoError("sonnet data is empty after subsampling: check --train/--dev and --max-*-examples")
        # the whole sonnet is trained, then end of text, so that generation learns where a sonnet stops
        self.set_train([PromptExample(str(s.number), "", s.text) for s in self.train], completion_only=False)
        # the gold completion continues the prompt: after its newline, or starting with one (--prompt-newline false)
        lead = "" if cfg.prompt_newline else "\n"
        self.pair_examples = [PromptExample(str(s.number), self.prompt_text(s), lead + s.continuation(SONNET_PROMPT_LINES))
                              for s in self.train]
        self.check_prompt_room([self.prompt_text(s) for s in self.dev])

    def prompt_text(self, s: Sonnet) -> str:
        """The first 3 lines, and their newline unless --prompt-newline false (the CS224N starter's
        prompt has none: the model writes the line break itself)."""
        return s.prompt(SONNET_PROMPT_LINES) + ("\n" if self.cfg.prompt_newline else "")

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        """chrF (sacrebleu CHRF defaults, corpus level) on the full sonnet, prompt lines included (the CS224N
        convention), and on the continuation only. With several samples, the mean of the per-sample corpus scores."""
        cfg = self.cfg
        gens = self.generate(model, [self.prompt_text(s) for s in self.dev], device, precision, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, seed=cfg.seed)
        refs = [s.text for s in self.dev]
        ref_cont = [s.continuation(SONNET_PROMPT_LINES) for s in self.dev]
        full = [[(self.prompt_text(s) + g[k]).strip() for s, g in zip(self.dev, gens)] for k in range(cfg.num_samples)]
        cont = [[g[k].strip() for g in gens] for k in range(cfg.num_samples)]
        metrics = {
            "chrf": sum(stats.corpus_chrf(h, refs) for h in full) / cfg.num_samples,
            "chrf_continuation": sum(stats.corpus_chrf(h, ref_cont) for h in cont) / cfg.num_samples,
        }
        generations = [(s.number, [f[i] for f in full]) for i, s in enumerate(self.dev)]
        outputs = [(str(s.number), full[0][i], refs[i]) for i, s in enumerate(self.dev)]
        return Evaluation(metrics, outputs, generations)

    def write_outputs(self, out: Path, ev: Evaluation) -> None:
        """The sampled sonnets in the CS224N output format (generations_sampleK.txt for more samples)."""
        for k in range(self.cfg.num_samples):
            name = "generations.txt" if k == 0 else f"generations_sample{k}.txt"
            write_cs224n_generations(out / name, [(num, samples[k]) for num, samples in ev.generations])
