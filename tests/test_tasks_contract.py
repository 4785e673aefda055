"""Task contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles: the tokenizer's own token counts and the rows as written, never the task's helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.models import load_model
from sftdpo.tasks import make_task

TINY = dict(model="tiny-llama", device="cpu", precision="fp32", eval_batch_size=8)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_classify_max_length_must_hold_the_template_and_two_tokens(cache, tmp_path):
    """--max-length is refused exactly when it cannot hold the template's own tokens (its fields empty,
    counted here with the tokenizer) plus two: the boundary moves if the fixed text is taken as empty
    (nothing is ever refused) or the fields are filled with anything but nothing."""
    template = "Topic of: {text}\nAnswer:"
    rows = [{"text": f"a dog {i}", "label": i % 2} for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": f"a cat {i}", "label": i % 2} for i in range(4)])
    _, tok = load_model("tiny-llama")
    fixed = len(tok("Topic of: \nAnswer:", add_special_tokens=False).input_ids)
    base = dict(task="classify", template=template, labels="0=animal,1=money", train=train, dev=dev, **TINY)
    make_task(RunConfig(**base, max_length=fixed + 2), tok)  # room for the fixed text and two tokens: accepted
    with pytest.raises(SftdpoError, match=f"too short for the classify prompt: its fixed text alone is {fixed} tokens"):
        make_task(RunConfig(**base, max_length=fixed + 1), tok)


def test_language_modelling_pairs_split_each_text_at_its_prompt_lines(cache, tmp_path):
    """A text row's DPO pair example (generate task, language-modelling data) is its first
    --prompt-lines lines as the prompt and every later line, in order and joined by newlines, as the
    gold completion: prompt + completion is the row again. Catches the rest joined another way, lines
    dropped or repeated at the split."""
    texts = [f"one {i}\ntwo {i}\nthree {i}\nfour {i}\nfive {i}" for i in range(6)]
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    dev = write_jsonl(tmp_path / "d.jsonl", [{"text": "d1\nd2\nd3\nd4"}])
    _, tok = load_model("tiny-llama")
    task = make_task(RunConfig(task="generate", train=train, dev=dev, prompt_lines=2, **TINY), tok)
    pairs = {e.prompt + e.completion: e for e in task.pair_examples}
    assert sorted(pairs) == sorted(texts)
    for text, e in pairs.items():
        lines = text.split("\n")
        assert e.prompt == lines[0] + "\n" + lines[1] + "\n"
        assert e.completion == f"{lines[2]}\n{lines[3]}\n{lines[4]}"
