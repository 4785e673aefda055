"""A run's directory: the files a run writes, which of them say what, and who may write them.

  config.json     resolved config, its hash, package versions, device, git commit
  metrics.jsonl   one record per log step and per epoch (`stage`, `epoch`, `step`, losses, dev metrics)
  summary.json    final and best dev metrics, wall-clock, throughput, memory, parameter counts
                  (written last: its presence means the run is complete)
  predictions.csv / generations.txt, dev_outputs.jsonl
  checkpoints/last, checkpoints/best   trainable weights (full model for FFT, the adapter for LoRA)
  dpo/            the DPO stage's pairs and reference log-probs (objectives/dpo)
  .lock           held by the process training the run (one writer per run directory)
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from ..config import RunConfig, SftdpoError
from ..files import DirectoryBusy, DirLock, ensure_dir, write_json_atomic, write_text_atomic
from ..tasks import Evaluation, Task
from .checkpoint import STATE_FILE, prune_checkpoints

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.summary_file = self.path / SUMMARY_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.checkpoints = self.path / "checkpoints"

    def ckpt(self, name: str) -> Path:
        return self.checkpoints / name

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Hold the directory's lock (one writer per run directory), or one line naming its holder."""
        ensure_dir(self.path)
        try:
            with DirLock(self.path, what):
                yield
        except DirectoryBusy as e:
            raise SftdpoError(f"{e.path} is being trained by {e.holder}: wait for it, or use another --out") from None

    def trained(self) -> bool:
        """Whether the directory holds a trained epoch (or a finished run)."""
        return self.summary_file.exists() or (self.ckpt("last") / STATE_FILE).exists()

    def check(self, cfg: RunConfig, world_size: int) -> None:
        """Refuse a directory that holds another trained run. A directory whose run failed before its
        first epoch (a bad path, a bad file) holds no result: it is taken over."""
        if not self.config_file.exists():
            return
        old = json.loads(self.config_file.read_text())
        if old.get("hash") != cfg.hash() and self.trained():
            raise SftdpoError(
                f"{self.path} holds another run (config hash {old.get('hash')} != {cfg.hash()}): use a new --out")
        if old.get("world_size", 1) != world_size and self.trained():
            raise SftdpoError(
                f"{self.path} was started on {old.get('world_size', 1)} process(es), this launch has {world_size}: "
                "resume with the same number of processes (the effective batch depends on it), or use a new --out")

    def write_config(self, record: dict) -> None:
        """config.json of this run, unless the directory already holds its trained epochs; an attempt
        that never trained an epoch starts clean."""
        if self.config_file.exists() and self.trained():
            return
        if self.config_file.exists():
            self.metrics_file.unlink(missing_ok=True)
            shutil.rmtree(self.path / "dpo", ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_file, record)

    def summary(self) -> dict | None:
        """The finished run's summary, or None while it is not finished."""
        return json.loads(self.summary_file.read_text()) if self.summary_file.exists() else None

    def finish(self, summary: dict, task: Task, ev: Evaluation, keep_checkpoints: str) -> None:
        """The dev outputs and the task's own files, then summary.json (last: it marks the run complete),
        then what --keep-checkpoints drops."""
        write_text_atomic(self.path / "dev_outputs.jsonl", "".join(
            json.dumps({"id": ex_id, "prediction": pred, "reference": ref}) + "\n" for ex_id, pred, ref in ev.outputs))
        task.write_outputs(self.path, ev)
        write_json_atomic(self.summary_file, summary)
        prune_checkpoints(self.checkpoints, keep_checkpoints)
