"""Preference pairs for the DPO stage from a file or dataset (`--pairs file:PATH`), in TRL's preference
formats:

  explicit prompt   {"prompt": "...", "chosen": "...", "rejected": "..."}
  implicit prompt   {"chosen": "...", "rejected": "..."}: the prompt is their longest common prefix
                    (TRL's extract_prompt: whole messages for conversations; for text, a space before
                    the point where they differ stays with the responses)
  conversational    prompt/chosen/rejected (or chosen/rejected alone) as message lists

and, for KTO (`--objective kto`), TRL's unpaired preference format: {"prompt": ..., "completion": ...,
"label": true|false} (text or message lists), or any of the pair formats above split as TRL's
unpair_preference_dataset splits them (each chosen desirable, each rejected undesirable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SftdpoError
from .generate import check_messages
from .records import FILE_FORMATS, Row, dataset_rows, read_rows


@dataclass(frozen=True)
class Preference:
    prompt: Any  # text or messages
    chosen: Any
    rejected: Any


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from an implicit-prompt pair, as TRL's extract_prompt."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx and chosen[idx - 1] == " ":  # the space before the responses stays with them
                idx -= 1
            break
    else:
        idx = min(len(chosen), len(rejected))
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _preference(r: Row) -> Preference:
    f = r.fields
    if "chosen" not in f or "rejected" not in f:
        raise SftdpoError(f"{r.where}: a preference row needs `chosen` and `rejected` (and `prompt`, unless it is "
                          f"their shared beginning); the row has: {', '.join(map(str, f)) or 'none'}")
    conversational = isinstance(f["chosen"], list)
    if conversational:
        chosen, rejected = check_messages(f["chosen"], r.where, "chosen"), check_messages(f["rejected"], r.where, "rejected")
        prompt = check_messages(f["prompt"], r.where, "prompt") if "prompt" in f else None
    else:
        chosen, rejected, prompt = f["chosen"], f["rejected"], f.get("prompt")
        if not all(isinstance(x, str) for x in (chosen, rejected)) or (prompt is not None and not isinstance(prompt, str)):
            raise SftdpoError(f"{r.where}: prompt, chosen and rejected must be text (or all message lists)")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if not chosen or (isinstance(chosen, str) and not chosen.strip()):
        raise SftdpoError(f"{r.where}: the chosen response is empty")
    if not rejected or (isinstance(rejected, str) and not rejected.strip()):
        raise SftdpoError(f"{r.where}: the rejected response is empty")
    if chosen == rejected:
        raise SftdpoError(f"{r.where}: chosen and rejected are the same response: a pair must prefer one over another")
    return Preference(prompt, chosen, rejected)


def _rows(source: str, split: str) -> list[Row]:
    """The rows of `--pairs file:SOURCE`. A SOURCE that can only be a path (a file extension, or starting
    with /, . or ~) and is not there is a missing file, not a hub id."""
    p = Path(source).expanduser()
    if not p.exists() and (p.suffix.lower() in FILE_FORMATS or source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise SftdpoError(f"--pairs file:{source}: no such file; check the path (or give a Hugging Face dataset id)")
    rows = read_rows(p, split) if p.exists() else dataset_rows(source, split)
    if not rows:
        raise SftdpoError(f"--pairs file:{source} holds no pairs")
    return rows


def load_preferences(source: str, split: str = "train") -> list[Preference]:
    """`--pairs file:SOURCE`: a preference file, a save_to_disk directory or a hub dataset (its `split`)."""
    return [_preference(r) for r in _rows(source, split)]


@dataclass(frozen=True)
class Unpaired:
    prompt: Any  # text or messages
    completion: Any
    label: bool  # desirable


def _unpaired(r: Row) -> Unpaired:
    f = r.fields
    label = f.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if "completion" not in f or not isinstance(label, bool):
        raise SftdpoError(f"{r.where}: an unpaired preference row needs `completion` and a true/false `label` (and "
                          f"`prompt`); the row has: {', '.join(map(str, f)) or 'none'}")
    completion, prompt = f["completion"], f.get("prompt", "")
    if isinstance(completion, list):
        completion = check_messages(completion, r.where, "completion")
        prompt = check_messages(prompt, r.where, "prompt") if prompt else []
    elif not isinstance(completion, str) or not isinstance(prompt, str):
        raise SftdpoError(f"{r.where}: prompt and completion must be text (or both message lists)")
    if not completion or (isinstance(completion, str) and not completion.strip()):
        raise SftdpoError(f"{r.where}: the completion is empty")
    return Unpaired(prompt, completion, label)


def load_unpaired(source: str, split: str = "train") -> list[Unpaired]:
    """KTO's `--pairs file:SOURCE`: unpaired rows (prompt, completion, label) as they are, or preference
    pairs split as TRL's unpair_preference_dataset (all chosen desirable, then all rejected undesirable)."""
    rows = _rows(source, split)
    if "completion" in rows[0].fields:
        return [_unpaired(r) for r in rows]
    prefs = [_preference(r) for r in rows]
    return [Unpaired(p.prompt, p.chosen, True) for p in prefs] + [Unpaired(p.prompt, p.rejected, False) for p in prefs]
