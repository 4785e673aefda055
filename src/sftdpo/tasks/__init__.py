"""The tasks: one module each (what an example is, its prompt, its SFT loss, its dev metrics)."""

from __future__ import annotations

from ..config import RunConfig
from ..data import load_paraphrase_data, load_sonnet_data
from .base import Evaluation, Task
from .paraphrase import CS224N_PROMPT, ParaphraseTask
from .sonnet import SONNET_PROMPT_LINES, SonnetTask

__all__ = ["CS224N_PROMPT", "SONNET_PROMPT_LINES", "Evaluation", "ParaphraseTask", "SonnetTask", "Task", "make_task"]


def make_task(cfg: RunConfig, tok, *, rank: int = 0, world_size: int = 1) -> Task:
    """The task of `cfg`, its data read from --train/--dev or the data directory."""
    if cfg.task == "paraphrase":
        return ParaphraseTask(cfg, tok, load_paraphrase_data(cfg.train, cfg.dev), rank=rank, world_size=world_size)
    return SonnetTask(cfg, tok, load_sonnet_data(cfg.train, cfg.dev), rank=rank, world_size=world_size)
