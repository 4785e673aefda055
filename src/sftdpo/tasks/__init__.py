"""The tasks: one module each (what an example is, its prompt, its SFT loss, its dev metrics)."""

from __future__ import annotations

from ..config import RunConfig
from ..data import ParaphraseData, SonnetData, load_task_data
from .base import Evaluation, Task
from .paraphrase import CS224N_PROMPT, ParaphraseTask
from .sonnet import SONNET_PROMPT_LINES, SonnetTask

__all__ = ["CS224N_PROMPT", "SONNET_PROMPT_LINES", "Evaluation", "ParaphraseTask", "SonnetTask", "Task", "make_task"]


def make_task(cfg: RunConfig, tok, data: ParaphraseData | SonnetData | None = None, *, rank: int = 0,
              world_size: int = 1) -> Task:
    """The task of `cfg` on `data` (default: read from --train/--dev or the data directory)."""
    data = data if data is not None else load_task_data(cfg.task, cfg.train, cfg.dev)
    cls = ParaphraseTask if cfg.task == "paraphrase" else SonnetTask
    return cls(cfg, tok, data, rank=rank, world_size=world_size)
