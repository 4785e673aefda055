"""The tasks: one module each (what an example is, its prompt, its SFT loss, its dev metrics)."""

from __future__ import annotations

from ..config import RunConfig
from ..data import TaskData, load_task_data
from .base import Evaluation, Task
from .classify import ClassifyTask
from .generate import GenerateTask, PromptExample
from .paraphrase import CS224N_PROMPT, ParaphraseTask
from .sonnet import SONNET_PROMPT_LINES, SonnetTask

__all__ = ["CS224N_PROMPT", "SONNET_PROMPT_LINES", "ClassifyTask", "Evaluation", "GenerateTask", "ParaphraseTask",
           "PromptExample", "SonnetTask", "Task", "make_task"]

TASK_CLASSES = {"paraphrase": ParaphraseTask, "sonnet": SonnetTask, "classify": ClassifyTask, "generate": GenerateTask}


def make_task(cfg: RunConfig, tok, data: TaskData | None = None, *, rank: int = 0, world_size: int = 1) -> Task:
    """The task of `cfg` on `data` (default: read from --train/--dev, --dataset or the data directory)."""
    data = data if data is not None else load_task_data(cfg)
    return TASK_CLASSES[cfg.task](cfg, tok, data, rank=rank, world_size=world_size)
