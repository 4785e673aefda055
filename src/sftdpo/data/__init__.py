"""Task data. The paper's tasks have their own readers (qqp.py: every QQP file layout; sonnets.py:
the CS224N files or the Gutenberg text); your own tasks read rows from CSV, TSV, JSONL, Parquet or
a Hugging Face dataset (records.py) as classification (classify.py) or generation data in TRL's
formats (generate.py); DPO pairs can come from a file in TRL's preference formats (preferences.py).
A run's identity covers a fingerprint of the examples it loaded (resolve_data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import RunConfig
from ..files import stable_hash
from .classify import ClassifyData, ClassifyExample, load_classify_data
from .generate import GenerateData, GenerateExample, load_generate_data
from .preferences import load_preferences
from .qqp import (QQP_FORMATS, ParaphraseData, ParaphraseExample, dedupe_against, detect_qqp_format, load_glue_qqp,
                  load_paraphrase_data, normalise_pair, qqp_available, read_qqp, read_qqp_with_stats,
                  write_paraphrase_predictions)
from .sonnets import (GUTENBERG_SOURCE, Sonnet, SonnetData, gutenberg_sonnets, load_sonnet_data, parse_gutenberg_sonnets,
                      read_cs224n_sonnets, split_cs224n_way, write_cs224n_generations)
from .subsets import subsample

TaskData = ParaphraseData | SonnetData | ClassifyData | GenerateData

__all__ = ["GUTENBERG_SOURCE", "QQP_FORMATS", "ClassifyData", "ClassifyExample", "GenerateData", "GenerateExample",
           "ParaphraseData", "ParaphraseExample", "Sonnet", "SonnetData", "TaskData", "data_fingerprint", "data_key",
           "dedupe_against", "detect_qqp_format", "gutenberg_sonnets", "load_glue_qqp", "load_paraphrase_data",
           "load_sonnet_data", "load_task_data", "normalise_pair", "parse_gutenberg_sonnets", "qqp_available",
           "read_cs224n_sonnets", "read_qqp", "read_qqp_with_stats", "resolve_data", "split_cs224n_way", "subsample",
           "training_size", "write_cs224n_generations", "write_paraphrase_predictions"]


def load_task_data(cfg: RunConfig) -> TaskData:
    """A task's train/dev data from --train/--dev or --dataset, else the data directory (or the default source)."""
    if cfg.task == "paraphrase":
        return load_paraphrase_data(cfg.train, cfg.dev)
    if cfg.task == "sonnet":
        return load_sonnet_data(cfg.train, cfg.dev)
    if cfg.task == "classify":
        return load_classify_data(cfg)
    return load_generate_data(cfg)


def data_fingerprint(data: TaskData) -> str:
    """A fingerprint of the loaded examples (ids, texts, labels), whatever files or sources they came from."""
    if isinstance(data, ParaphraseData):
        rows = {split: [[e.id, e.q1, e.q2, e.label] for e in examples] for split, examples in
                (("train", data.train), ("dev", data.dev))}
    elif isinstance(data, SonnetData):
        rows = {split: [[s.number, s.text] for s in sonnets] for split, sonnets in
                (("train", data.train), ("dev", data.dev), ("test", data.test_prompts))}
    elif isinstance(data, ClassifyData):
        rows = {split: [[e.id, e.fields, e.label] for e in examples] for split, examples in
                (("train", data.train), ("dev", data.dev))}
    else:
        rows = {split: [[e.id, e.prompt, e.completion] for e in examples] for split, examples in
                (("train", data.train), ("dev", data.dev))}
    return stable_hash(rows, 16)


def training_size(cfg: RunConfig, data: TaskData) -> int:
    """The training examples a run of `cfg` takes its cuts from (--max-train-examples, --data-fraction):
    all of them, or with --balance-labels as many of each label as the rarest label has."""
    return len(subsample(data.train, label=lambda e: e.label)) if cfg.balance_labels else len(data.train)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    dataset = _absolute(cfg.dataset) if cfg.dataset and Path(cfg.dataset).expanduser().exists() else cfg.dataset
    return dataclasses.replace(cfg, train=_absolute(cfg.train), dev=_absolute(cfg.dev), dataset=dataset)


def resolve_data(cfg: RunConfig, memo: dict | None = None) -> RunConfig:
    """`cfg` with --train/--dev (and a local --dataset) made absolute, so `eval` and resume work from any
    directory, and `data_fingerprint` set from the examples they load. `memo` shares loads between configs."""
    cfg = _absolute_paths(cfg)
    key = data_key(cfg)
    memo = {} if memo is None else memo
    if key not in memo:
        memo[key] = data_fingerprint(load_task_data(cfg))
    pairs = ("pairs", cfg.pairs, cfg.train_split)
    if cfg.regime != "sft" and cfg.pairs.startswith("file:") and pairs not in memo:
        # a --pairs file is read at the DPO stage; its rows are checked now, before anything is written
        memo[pairs] = load_preferences(cfg.pairs.removeprefix("file:"), cfg.train_split)
    return dataclasses.replace(cfg, data_fingerprint=memo[key])


# the fields the loaded examples depend on
_DATA_KEYS = ("task", "train", "dev", "dataset", "train_split", "dev_split", "id_column", "template", "label_column",
              "labels", "prompt_lines")


def data_key(cfg: RunConfig) -> str:
    """Which examples `cfg` loads: configs with the same key read the same data (relative paths are
    taken from the working directory, so a config before and after resolve_data has one key)."""
    cfg = _absolute_paths(cfg)
    return stable_hash({k: getattr(cfg, k) for k in _DATA_KEYS})
