"""What a run keeps to resume exactly: trainable weights (safetensors, by name: the adapter, the biases
or norms, or every weight), the training state (epoch, best metric, history, optimizer, scheduler, RNG,
a method's own state: AdaLoRA's), and the append-only metrics log.

  checkpoints/last   weights + training_state.pt, rewritten after every epoch
  checkpoints/best   weights of the best epoch so far (hard-linked to `last` when they are the same)

A final checkpoint (nothing left to train) drops the optimizer state: 1 GB for an FFT run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import SftdpoError
from ..files import link_file, replace_dir
from ..peft_methods import load_method_state, method_state

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class RunState:
    """What survives an interruption: saved with each epoch checkpoint."""

    epoch: int = 0  # global epochs completed (0 = none)
    steps: int = 0  # optimizer steps completed (trackers' x axis)
    metric_lines: int = 0
    best_value: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # per-epoch records
    train_time_s: float = 0.0
    train_tokens: int = 0
    eval_time_s: float = 0.0

    def update_best(self, epoch: int, value: float) -> bool:
        """Record epoch `epoch`'s dev metric (higher is better); whether it is the best so far (a tie
        keeps the earlier epoch)."""
        if value > self.best_value:
            self.best_value, self.best_epoch = value, epoch
            return True
        return False


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model, path: Path) -> None:
    """The trainable weights (the full model for FFT, the adapter for LoRA) as `path/weights.safetensors`."""
    replace_dir(path, lambda tmp: save_file(trainable_state(model), str(tmp / WEIGHTS_FILE)))


def load_weights(model, path: Path) -> None:
    sd = load_file(str(Path(path) / WEIGHTS_FILE))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = expected - set(sd)
    if missing:
        raise SftdpoError(f"checkpoint {path} does not match the model ({len(missing)} weights missing, e.g. {sorted(missing)[0]})")
    model.load_state_dict(sd, strict=False)


def save_checkpoint(ckpt_dir: Path, model, state: RunState, opt, sched, *, final: bool) -> None:
    """Write checkpoints/last for `state`; the weights are linked from checkpoints/best when the
    best epoch is this one (written a moment ago), else saved."""
    best = ckpt_dir / "best" / WEIGHTS_FILE

    def build(tmp: Path) -> None:
        if state.best_epoch == state.epoch and best.exists():
            link_file(best, tmp / WEIGHTS_FILE)
        else:
            save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
        torch.save({
            "state": state.__dict__, "optimizer": opt.state_dict() if opt and not final else None,
            "scheduler": sched.state_dict() if sched else None, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "method": method_state(model),  # AdaLoRA's importance scores and rank pattern
        }, tmp / STATE_FILE)

    replace_dir(ckpt_dir / "last", build)


def prune_checkpoints(ckpt_dir: Path, keep: str) -> None:
    """What a finished run keeps (--keep-checkpoints all | best | last | none); idempotent."""
    for name in {"all": (), "best": ("last",), "last": ("best",), "none": ("best", "last")}[keep]:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def missing_checkpoint(run_dir: Path, checkpoint: str, keep: str) -> SftdpoError:
    """The one-line error for a checkpoint a run does not have."""
    why = (f"the run kept only --keep-checkpoints {keep}: train it again with --keep-checkpoints {checkpoint} "
           "(or all)") if keep != "all" and checkpoint not in (keep,) else "train the run first"
    return SftdpoError(f"no {checkpoint} checkpoint in {run_dir}/checkpoints: {why}")


def load_checkpoint(ckpt_dir: Path, model) -> tuple[RunState, dict] | None:
    """(state, the saved blob with optimizer/scheduler state) of checkpoints/last, with the weights
    and the RNG restored; None when there is no checkpoint."""
    last = ckpt_dir / "last"
    if not (last / STATE_FILE).exists():
        return None
    blob = torch.load(last / STATE_FILE, weights_only=False)
    load_weights(model, last)
    load_method_state(model, blob.get("method"))
    torch.set_rng_state(blob["rng"])
    if blob.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return RunState(**blob["state"]), blob


class MetricsLog:
    """Append-only metrics.jsonl; on resume it is cut back to what the checkpoint had seen."""

    def __init__(self, path: Path, enabled: bool = True, on_write: Callable[[dict], None] | None = None) -> None:
        self.path, self.enabled, self.on_write = path, enabled, on_write
        self.lines = sum(1 for _ in path.open()) if path.exists() else 0

    def truncate(self, n: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = self.path.read_text().splitlines(keepends=True)[:n]
        self.path.write_text("".join(keep))
        self.lines = len(keep)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1
        if self.on_write:  # experiment trackers (trackers.py)
            self.on_write(record)
