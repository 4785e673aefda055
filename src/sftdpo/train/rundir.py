"""A run's directory: the files a run writes, which of them say what, and who may write them.

  config.json     resolved config, its hash, package versions, device, git commit
  metrics.jsonl   one record per log step and per epoch (`stage`, `epoch`, `step`, losses, dev metrics)
  summary.json    final and best dev metrics, wall-clock, throughput, memory, parameter counts
                  (written last: its presence means the run is complete)
  predictions.csv / generations.txt, dev_outputs.jsonl
  checkpoints/last, checkpoints/best   trainable weights (full model for FFT, the adapter for LoRA)
  dpo/            the preference stage's inputs: pairs (KTO: examples.jsonl) and reference log-probs (objectives/)
  .lock           held by the process training the run (one writer per run directory)

Read back (`config`, `summary`, `results`): a damaged file is DamagedFile, one line naming it. A
finished run vouches for its summary, dev outputs, config and metrics: if one of them is damaged the
run is not finished (`train` and the next `study run` redo it: its end from the final checkpoint
where one is kept, else the whole run); a damaged config.json of an unfinished run is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

from ..config import RunConfig, SftdpoError
from ..files import (DamagedFile, DirectoryBusy, DirLock, ensure_dir, read_json, read_jsonl, write_json_atomic,
                     write_text_atomic)
from ..tasks import Evaluation, Task
from .checkpoint import STATE_FILE, prune_checkpoints

log = logging.getLogger("sftdpo")

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
OUTPUTS_FILE = "dev_outputs.jsonl"
# what to do about a damaged file of a finished run
REDO = "the next `study run` (or the same `train` command) redoes the run, from its last checkpoint where one is kept"

Results = tuple[dict, dict, list[tuple[str, int, dict, "float | None"]], list[tuple[str, str, str]]]


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

    def config(self, fix: str = "rewritten from this run's config") -> dict | None:
        """config.json, None when there is none; DamagedFile (with `fix`) when it cannot be read back."""
        if not self.config_file.exists():
            return None
        conf = read_json(self.config_file, fix)
        if not isinstance(conf, dict) or not isinstance(conf.get("config"), dict):
            raise DamagedFile(self.config_file, "not a run's config", fix)
        return conf

    def check(self, cfg: RunConfig, world_size: int) -> None:
        """Refuse a directory that holds another trained run. A directory whose run failed before its
        first epoch (a bad path, a bad file) holds no result: it is taken over."""
        try:
            old = self.config()
        except DamagedFile:  # written again by write_config (no run can be told from it)
            return
        if old is None:
            return
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
        try:
            intact = self.config() is not None
        except DamagedFile as e:
            log.warning("%s", e)
            intact = False
        if intact and self.trained():
            return
        if self.config_file.exists() and not self.trained():
            self.metrics_file.unlink(missing_ok=True)
            shutil.rmtree(self.path / "dpo", ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_file, record)

    def summary(self) -> dict | None:
        """The finished run's summary, or None while it is not finished. A finished run whose results
        cannot be read back (`results`) is not finished: said in one line, its summary.json goes, and
        the run is redone (its end from the final checkpoint where one is kept, else all of it)."""
        if not self.summary_file.exists():
            return None
        try:
            return self.results()[0]
        except DamagedFile as e:
            log.warning("%s", e)
        self.summary_file.unlink(missing_ok=True)
        return None

    def epoch_records(self) -> list[dict]:
        """The per-epoch records of metrics.jsonl (a torn last line dropped: the writer appends whole
        lines, and a crash or a full disk can cut the last one short); DamagedFile if another line is
        unreadable."""
        if not self.metrics_file.exists():
            return []
        recs = [r for r in read_jsonl(self.metrics_file, REDO) if r.get("kind") == "epoch"]
        for r in recs:
            if not isinstance(r.get("stage"), str) or not isinstance(r.get("epoch"), int):
                raise DamagedFile(self.metrics_file, "an epoch record without its stage and epoch", REDO)
        return recs

    def results(self) -> Results:
        """(summary, environment, epochs as (stage, epoch, metrics, train seconds), dev outputs) of a
        finished run; DamagedFile if a file they come from is damaged (written before summary.json, each
        must be whole)."""
        summary = read_json(self.summary_file, REDO)
        if not isinstance(summary, dict):
            raise DamagedFile(self.summary_file, "not a JSON object", REDO)
        conf: Any = read_json(self.config_file, REDO) if self.config_file.exists() else {}
        if not isinstance(conf, dict):
            raise DamagedFile(self.config_file, "not a JSON object", REDO)
        env = {"versions": conf.get("versions", {}), "device": summary.get("device"),
               "precision": summary.get("precision"), "git_commit": conf.get("git_commit")}
        records = self.epoch_records()
        if summary.get("epochs") and not any(r["epoch"] == summary["epochs"] for r in records):
            raise DamagedFile(self.metrics_file, f"no record of the last epoch, {summary['epochs']}", REDO)
        epochs = [(r["stage"], r["epoch"], {k: v for k, v in r.items() if k not in ("kind", "stage", "epoch")},
                   r.get("train_s")) for r in records]
        path = self.path / OUTPUTS_FILE
        if not path.exists():
            raise DamagedFile(path, "missing", REDO)
        try:
            outputs = [(o["id"], o["prediction"], o["reference"]) for o in read_jsonl(path, REDO, torn_ok=False)]
        except KeyError as e:
            raise DamagedFile(path, f"a record without {e}", REDO) from None
        if isinstance(summary.get("dev_examples"), int) and len(outputs) != summary["dev_examples"]:
            raise DamagedFile(path, f"{len(outputs)} outputs for {summary['dev_examples']} dev examples", REDO)
        return summary, env, epochs, outputs

    def clear(self) -> None:
        """Everything a run has trained (checkpoints, metrics, DPO inputs, results): it starts again."""
        for name in ("checkpoints", "dpo"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (SUMMARY_FILE, METRICS_FILE, OUTPUTS_FILE):
            (self.path / name).unlink(missing_ok=True)

    def finish(self, summary: dict, task: Task, ev: Evaluation, keep_checkpoints: str) -> None:
        """The dev outputs and the task's own files, then summary.json (last: it marks the run complete),
        then what --keep-checkpoints drops."""
        write_text_atomic(self.path / OUTPUTS_FILE, "".join(
            json.dumps({"id": ex_id, "prediction": pred, "reference": ref}) + "\n" for ex_id, pred, ref in ev.outputs))
        task.write_outputs(self.path, ev)
        write_json_atomic(self.summary_file, summary)
        prune_checkpoints(self.checkpoints, keep_checkpoints)
