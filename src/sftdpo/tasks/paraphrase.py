"""Paraphrase detection (Quora Question Pairs), the paper's classification task: a preset of
`--task classify` with QQP's readers, the CS224N cloze prompt and the label words "yes"/"no"."""

from __future__ import annotations

from .. import stats
from ..config import RunConfig, SftdpoError
from ..data import ParaphraseData, ParaphraseExample
from .classify import ClassifyTask

# CS224N GPT-2 project's cloze prompt, verbatim (including its unclosed quote after question 2).
CS224N_PROMPT = 'Question 1: "{q1}"\nQuestion 2: "{q2}\nAre these questions asking the same thing?\n'


class ParaphraseTask(ClassifyTask):
    name = "paraphrase"
    primary_metric = "accuracy"

    def __init__(self, cfg: RunConfig, tok, data: ParaphraseData, **shard) -> None:
        words = [w.strip() for w in cfg.label_words.split(",")]
        if len(words) != 2 or words[0] == words[1]:
            raise SftdpoError(f"--label-words needs two different words, positive first (got {cfg.label_words!r})")
        # "no" first: a tie between the two logits predicts "not a paraphrase", as the yes > no rule does
        super().__init__(cfg, tok, data, labels=[("0", words[1]), ("1", words[0])], **shard)
        self.no_id, self.yes_id = self.label_ids
        self.metrics = ("accuracy", "macro_f1", "f1_positive")

    def template_text(self) -> str:
        return CS224N_PROMPT.format(q1="", q2="")

    def prompt(self, e: ParaphraseExample) -> str:
        return CS224N_PROMPT.format(q1=self.text(e.q1), q2=self.text(e.q2))

    def scores(self, preds: list[str], refs: list[str]) -> dict[str, float]:
        return {"accuracy": stats.accuracy(preds, refs), "macro_f1": stats.macro_f1(preds, refs),
                "f1_positive": stats.f1_positive(preds, refs)}
