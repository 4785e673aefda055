"""Cloze classification with any number of classes (`--task classify`): the model reads the prompt
and the answer is the next token, one label word per class.

SFT: cross-entropy of the gold label word's token at the last prompt position, over the full
vocabulary. Prediction (`--predict`): `label-pair`, the label word with the highest logit (ties: the
first in --labels); `argmax`, the token with the highest logit over the whole vocabulary (the CS224N
starter's rule: a token that is no label word is a wrong answer of its own class, `token:<id>`, and
`dev/non_label_rate` reports their share). Metrics: accuracy, macro-F1 (over the classes seen in
predictions and references, scikit-learn's default) and each class's F1 (`f1_<word>`).
`--preprocess cs224n` passes every text field through the starter's preprocess_string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .. import stats
from ..config import RunConfig, SftdpoError
from ..data import ClassifyData, write_paraphrase_predictions
from ..data.classify import label_value, parse_labels, template_fields
from ..data.subsets import subsample
from ..models import autocast, single_token_id
from ..ops.batching import Batch, bucketed_batches, pad_batch
from ..ops.logprobs import last_token_logits
from ..system import progress
from .base import Evaluation, Task


class ClassifyTask(Task):
    name = "classify"
    primary_metric = "accuracy"
    kind = "classify"

    def __init__(self, cfg: RunConfig, tok, data: Any, labels: list[tuple[str, str]] | None = None, **shard) -> None:
        super().__init__(cfg, tok, **shard)
        # (value, word) per class; the order breaks ties
        self.labels = labels if labels is not None else parse_labels(cfg.labels or "")
        self.label_values = [v for v, _ in self.labels]
        flag = "--label-words" if cfg.task == "paraphrase" else "--labels"
        self.label_ids = [single_token_id(tok, w, flag=flag) for _, w in self.labels]
        if len(set(self.label_ids)) != len(self.label_ids):
            raise SftdpoError(f"two label words are the same token for this tokenizer: {self.labels}; choose others")
        self.token_of = dict(zip(self.label_values, self.label_ids))
        self.source = data.source
        self.dev_dropped_overlap = getattr(data, "dev_dropped_overlap", 0)
        self.check_prompt_room()
        self.train = subsample(data.train, cfg.max_train_examples, cfg.data_fraction, seed=0,
                               label=(lambda e: e.label) if cfg.balance_labels else None)
        self.dev = subsample(data.dev, cfg.max_dev_examples, 1.0, seed=0)
        if not self.train or not self.dev:
            raise SftdpoError(f"{cfg.task} data is empty after subsampling: check --train/--dev and --max-*-examples")
        self.train_ids = [self.encode(e) for e in self.train]
        self.dev_ids = [self.encode(e) for e in self.dev]
        self.train_labels = [self.label_id(e) for e in self.train]
        self.metrics = ("accuracy", "macro_f1", *(f"f1_{w}" for _, w in self.labels))

    def template_text(self) -> str:
        """The prompt with every field empty: what --max-length must hold besides the fields."""
        return (self.cfg.template or "").format_map({k: "" for k in template_fields(self.cfg.template or "")})

    def check_prompt_room(self) -> None:
        fixed = len(self.tok(self.template_text(), add_special_tokens=False).input_ids)
        if self.cfg.max_length < fixed + 2:  # prompts are cut from the left: the fields would vanish first
            raise SftdpoError(f"--max-length {self.cfg.max_length} is too short for the {self.cfg.task} prompt: its "
                              f"fixed text alone is {fixed} tokens; give at least {fixed + 2}")

    def prompt(self, e) -> str:
        return (self.cfg.template or "").format_map({k: self.text(v) for k, v in e.fields.items()})

    def text(self, value: Any) -> Any:
        """A text field as the prompt shows it (--preprocess)."""
        return cs224n_preprocess(value) if self.cfg.preprocess == "cs224n" and isinstance(value, str) else value

    def encode(self, e) -> list[int]:
        return self.encode_prompt(self.prompt(e))

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        return ids[-self.cfg.max_length :]  # keep the end: the fields' ends and the question

    def label_id(self, e) -> int:
        return self.token_of[label_value(e.label)]

    def wrong_label_ids(self, label_id: int) -> list[int]:
        """The other classes' tokens: the rejected responses of a DPO pair."""
        return [t for t in self.label_ids if t != label_id]

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
    def predict(self, model, device: torch.device, precision: str) -> list[str]:
        """The predicted label value of each dev example."""
        preds = [""] * len(self.dev)
        label_ids = torch.tensor(self.label_ids, device=device)
        bar = progress(len(self.dev_ids), "evaluating")
        for rows in bucketed_batches([len(s) for s in self.dev_ids], self.cfg.eval_batch_size, 0, shuffle=False):
            bar.update(len(rows))
            b = self.collate(rows, "dev").to(device)
            with autocast(device, precision):
                logits = last_token_logits(model, b)
            if self.cfg.predict == "argmax":  # over the whole vocabulary (CS224N): any token may win
                value_of = dict(zip(self.label_ids, self.label_values))
                for i, t in zip(rows, logits.argmax(-1).tolist()):
                    preds[i] = value_of.get(t, f"token:{t}")
                continue
            choice = logits[:, label_ids].argmax(-1)  # the first of equal logits: the earlier label
            for i, c in zip(rows, choice.tolist()):
                preds[i] = self.label_values[c]
        bar.close()
        return preds

    def scores(self, preds: list[str], refs: list[str]) -> dict[str, float]:
        per_class = stats.per_class_f1(preds, refs, self.label_values)
        return {"accuracy": stats.accuracy(preds, refs), "macro_f1": stats.macro_f1(preds, refs),
                **{f"f1_{w}": per_class[v] for v, w in self.labels}}

    def evaluate(self, model, device: torch.device, precision: str) -> Evaluation:
        model.eval()
        preds = self.predict(model, device, precision)
        refs = [label_value(e.label) for e in self.dev]
        outputs = [(e.id, p, r) for e, p, r in zip(self.dev, preds, refs)]
        metrics = self.scores(preds, refs)
        if self.cfg.predict == "argmax":
            metrics["non_label_rate"] = sum(p not in self.token_of for p in preds) / len(preds)
        return Evaluation(metrics, outputs)

    def write_outputs(self, out: Path, ev: Evaluation) -> None:
        """predictions.csv: id, predicted label value, gold label value."""
        write_paraphrase_predictions(out / "predictions.csv", [(i, p, r) for i, p, r in ev.outputs])


def cs224n_preprocess(s: str) -> str:
    """The CS224N starter's datasets.py::preprocess_string: lower-case, a space before every `.`, `?`,
    `,` and `'`, whitespace runs folded to one space."""
    return " ".join(s.lower().replace(".", " .").replace("?", " ?").replace(",", " ,").replace("'", " '").split())


__all__ = ["ClassifyData", "ClassifyTask", "cs224n_preprocess"]
