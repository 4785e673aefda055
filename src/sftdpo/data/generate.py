"""Your own generation data (`--task generate`) in TRL's dataset formats:

  prompt-completion   {"prompt": "...", "completion": "..."}
  language modelling  {"text": "..."}; a dev prompt is the text's first --prompt-lines lines
  conversational      {"messages": [{"role": ..., "content": ...}, ...]} (the last message, the
                      assistant's, is the completion), or prompt/completion as message lists;
                      rendered with the tokenizer's chat template by the task
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig, SftdpoError
from .records import Row, dataset_rows, read_rows

ROLES = ("system", "user", "assistant", "tool")
Text = str | list  # a string, or chat messages [{"role", "content"}]


@dataclass(frozen=True)
class GenerateExample:
    id: str
    prompt: Any  # text or messages; "" for a language-modelling row in training (the loss covers it all)
    completion: Any  # text or messages


@dataclass
class GenerateData:
    train: list[GenerateExample]
    dev: list[GenerateExample]
    source: str
    format: str  # prompt-completion | language-modeling | conversational


def check_messages(messages: Any, where: str, what: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SftdpoError(f"{where}: {what} must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SftdpoError(f"{where}: {what} holds {m!r}, not a message {{role, content}}")
        if m["role"] not in ROLES:
            raise SftdpoError(f"{where}: {what} has a message with role {m['role']!r}; roles are {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def row_format(row: Row) -> str:
    f = row.fields
    if "prompt" in f and "completion" in f:
        return "conversational" if isinstance(f["prompt"], list) else "prompt-completion"
    if "messages" in f:
        return "conversational"
    if "text" in f:
        return "language-modeling"
    raise SftdpoError(f"{row.where}: no prompt/completion, text or messages column (TRL's dataset formats); "
                      f"the row has: {', '.join(map(str, f)) or 'none'}")


def _example(row: Row, fmt: str, cfg: RunConfig, split: str, i: int) -> GenerateExample:
    f = row.fields
    rid = str(f[cfg.id_column]) if f.get(cfg.id_column) is not None else f"{split}-{i}"
    if row_format(row) != fmt:
        raise SftdpoError(f"{row.where}: a {row_format(row)} row in {fmt} data; use one format per file")
    if fmt == "prompt-completion":
        if not isinstance(f["prompt"], str) or not isinstance(f["completion"], str) or not f["completion"].strip():
            raise SftdpoError(f"{row.where}: prompt and completion must be text, the completion not empty")
        return GenerateExample(rid, f["prompt"], f["completion"])
    if fmt == "language-modeling":
        text = f["text"]
        if not isinstance(text, str) or not text.strip():
            raise SftdpoError(f"{row.where}: `text` must be non-empty text")
        if split == "train":
            return GenerateExample(rid, "", text)
        lines = text.split("\n")
        if len(lines) <= cfg.prompt_lines:
            raise SftdpoError(f"{row.where}: a dev text needs more than --prompt-lines {cfg.prompt_lines} lines (the "
                              "prompt) to have a continuation to score")
        return GenerateExample(rid, "\n".join(lines[: cfg.prompt_lines]) + "\n", "\n".join(lines[cfg.prompt_lines:]))
    if "messages" in f:
        msgs = check_messages(f["messages"], row.where, "messages")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise SftdpoError(f"{row.where}: the last message must be the assistant's (the completion), after the prompt")
        return GenerateExample(rid, msgs[:-1], msgs[-1:])
    return GenerateExample(rid, check_messages(f["prompt"], row.where, "prompt"),
                           check_messages(f["completion"], row.where, "completion"))


def load_generate_data(cfg: RunConfig) -> GenerateData:
    if cfg.dataset:
        tr_rows, dv_rows = dataset_rows(cfg.dataset, cfg.train_split), dataset_rows(cfg.dataset, cfg.dev_split)
        source = f"dataset {cfg.dataset} (splits {cfg.train_split}, {cfg.dev_split})"
    else:
        tr_rows, dv_rows = read_rows(cfg.train, cfg.train_split), read_rows(cfg.dev, cfg.dev_split)
        source = f"files: train={cfg.train}, dev={cfg.dev}"
    if not tr_rows or not dv_rows:
        raise SftdpoError(f"the {'train' if not tr_rows else 'dev'} data has no rows ({source})")
    fmt = row_format(tr_rows[0])
    train = [_example(r, fmt, cfg, "train", i) for i, r in enumerate(tr_rows)]
    dev = [_example(r, fmt, cfg, "dev", i) for i, r in enumerate(dv_rows)]
    seen = {_text(e) for e in train}
    if all(_text(e) in seen for e in dev):
        raise SftdpoError(f"every dev example also occurs in train ({source}): is the dev data the train data?")
    return GenerateData(train, dev, f"{source}: {len(train):,} train, {len(dev):,} dev rows ({fmt})", fmt)


def _text(e: GenerateExample) -> str:
    """An example's whole text (prompt and completion, case and whitespace folded): a language-modelling
    dev row split into prompt and continuation is the training row it came from."""
    if isinstance(e.prompt, list) or isinstance(e.completion, list):
        return json.dumps([*(e.prompt or []), *e.completion], sort_keys=True)
    return " ".join((e.prompt + e.completion).lower().split())
