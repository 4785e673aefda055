"""Paraphrase detection (Quora Question Pairs) as a cloze: the model reads the CS224N prompt and the
answer is the next token, "yes" or "no"."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import stats
from ..config import RunConfig, SftdpoError
from ..data import ParaphraseData, ParaphraseExample, subsample
from ..models import autocast, single_token_id
from ..ops.batching import Batch, bucketed_batches, pad_batch
from ..ops.logprobs import last_token_logits
from .base import Evaluation, Task

# CS224N GPT-2 project's cloze prompt, verbatim (including its unclosed quote after question 2).
CS224N_PROMPT = 'Question 1: "{q1}"\nQuestion 2: "{q2}\nAre these questions asking the same thing?\n'


class ParaphraseTask(Task):
    name = "paraphrase"
    primary_metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "f1_positive")

    def __init__(self, cfg: RunConfig, tok, data: ParaphraseData, **shard) -> None:
        super().__init__(cfg, tok, **shard)
        words = [w.strip() for w in cfg.label_words.split(",")]
        if len(words) != 2 or words[0] == words[1]:
            raise SftdpoError(f"--label-words needs two different words, positive first (got {cfg.label_words!r})")
        self.yes_id, self.no_id = single_token_id(tok, words[0]), single_token_id(tok, words[1])
        fixed = len(tok(CS224N_PROMPT.format(q1="", q2=""), add_special_tokens=False).input_ids)
        if cfg.max_length < fixed + 2:  # prompts are cut from the left: the questions would vanish first
            raise SftdpoError(f"--max-length {cfg.max_length} is too short for the paraphrase prompt: its fixed text "
                              f"alone is {fixed} tokens; give at least {fixed + 2} (the paper's runs use 256)")
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

    def other_label_id(self, label_id: int) -> int:
        """The wrong answer's token: the rejected response of a DPO pair."""
        return self.no_id if label_id == self.yes_id else self.yes_id

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

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        model.eval()
        preds = self.predict(model, device, precision)
        refs = [e.label for e in self.dev]
        metrics = {
            "accuracy": stats.accuracy(preds, refs),
            "macro_f1": stats.macro_f1(preds, refs),
            "f1_positive": stats.f1_positive(preds, refs),
        }
        outputs = [(e.id, str(p), str(e.label)) for e, p in zip(self.dev, preds)]
        return Evaluation(metrics, outputs)
