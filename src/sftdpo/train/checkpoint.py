"""What a run keeps to resume exactly: trainable weights (safetensors, by name: the adapter, the biases
or norms, or every weight), the training state (epoch, best metric, history, optimizer, scheduler, RNG,
a method's own state: AdaLoRA's), and the append-only metrics log.

  checkpoints/last   weights + training_state.pt, rewritten after every epoch
  checkpoints/best   weights of the best epoch so far (hard-linked to `last` when they are the same)

A final checkpoint (nothing left to train) drops the optimizer state: 1 GB for an FFT run.

Each checkpoint is replaced in one step (files.replace_dir): a crash, a signal or a full disk while
one is written leaves the previous one. A checkpoint damaged afterwards (a truncated copy, a disk
error) reads back as DamagedFile; a resumed run then starts again rather than train on from it.
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
from safetensors.torch import load_file

from ..config import SftdpoError
from ..files import RUN_RESTARTS, DamagedFile, atomic_path, is_write_failure, link_file, replace_dir, write_failure
from ..models import save_tensors
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
    try:
        replace_dir(path, lambda tmp: save_tensors(trainable_state(model), tmp / WEIGHTS_FILE))
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise write_failure(e, f"the checkpoint {path}", "the checkpoints written before are intact; the same "
                                                          "command resumes from the last one") from None


# what to do about a damaged checkpoint where nothing repairs it (eval, export, predict)
DAMAGED_CHECKPOINT = "use the run's other checkpoint (--checkpoint best|last), or train the run again"


def _damaged(path: Path, e: BaseException, fix: str) -> DamagedFile:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return DamagedFile(path, f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__, fix)


def load_weights(model, path: Path, fix: str = DAMAGED_CHECKPOINT) -> None:
    """Load `path/weights.safetensors` into the model's trainable weights; DamagedFile (with `fix`, what
    to do) when the file is missing or unreadable."""
    file = Path(path) / WEIGHTS_FILE
    try:
        sd = load_file(str(file))
    except FileNotFoundError:
        raise DamagedFile(file, "missing", fix) from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a truncated file
        raise _damaged(file, e, fix) from None
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
            save_tensors(trainable_state(model), tmp / WEIGHTS_FILE)
        save_state({
            "state": state.__dict__, "optimizer": opt.state_dict() if opt and not final else None,
            "scheduler": sched.state_dict() if sched else None, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "method": method_state(model),  # AdaLoRA's importance scores and rank pattern
        }, tmp / STATE_FILE)

    try:
        replace_dir(ckpt_dir / "last", build)
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise write_failure(e, f"the checkpoint of epoch {state.epoch} ({ckpt_dir / 'last'})",
                            "the checkpoint before it is intact; the same command resumes from there") from None


class _Writes:
    """A file whose write errors are kept: torch.save reports a failed write (a full disk) as a
    RuntimeError without its errno."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_state(obj: dict, path: Path) -> None:
    """torch.save(obj, path), a failed write raised as the OSError it is."""
    with open(path, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise OSError(out.error.errno, out.error.strerror, str(path)) from None
            raise


def prune_checkpoints(ckpt_dir: Path, keep: str) -> None:
    """What a finished run keeps (--keep-checkpoints all | best | last | none); idempotent."""
    for name in {"all": (), "best": ("last",), "last": ("best",), "none": ("best", "last")}[keep]:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def missing_checkpoint(run_dir: Path, checkpoint: str, keep: str) -> SftdpoError:
    """The one-line error for a checkpoint a run does not have."""
    why = (f"the run kept only --keep-checkpoints {keep}: train it again with --keep-checkpoints {checkpoint} "
           "(or all) and a new --out (the same --out returns the finished run as it is)"
           ) if keep != "all" and checkpoint not in (keep,) else "train the run first"
    return SftdpoError(f"no {checkpoint} checkpoint in {run_dir}/checkpoints: {why}")


def load_checkpoint(ckpt_dir: Path, model) -> tuple[RunState, dict] | None:
    """(state, the saved blob with optimizer/scheduler state) of checkpoints/last, with the weights
    and the RNG restored; None when there is no checkpoint; DamagedFile when it cannot be read back
    (the weights are then not to be trusted either)."""
    last = ckpt_dir / "last"
    path = last / STATE_FILE
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=False)
        state = RunState(**blob["state"])
        rng = blob["rng"]
    except Exception as e:  # noqa: BLE001 - torch.load of a truncated or garbled file raises many types
        raise _damaged(path, e, RUN_RESTARTS) from None
    load_weights(model, last, RUN_RESTARTS)
    load_method_state(model, blob.get("method"))
    torch.set_rng_state(rng)
    if blob.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return state, blob


class MetricsLog:
    """Append-only metrics.jsonl; on resume it is cut back to what the checkpoint had seen (a line
    torn by a crash or a full disk goes with what follows it)."""

    def __init__(self, path: Path, enabled: bool = True, on_write: Callable[[dict], None] | None = None) -> None:
        self.path, self.enabled, self.on_write = path, enabled, on_write
        self.lines = len(path.read_bytes().splitlines()) if path.exists() else 0

    def truncate(self, n: int) -> None:
        """Keep the first `n` lines (replaced in one step); DamagedFile when the file does not hold `n`
        whole lines (then the checkpoint that counted them cannot be resumed faithfully)."""
        if not self.enabled:
            return
        data = self.path.read_bytes() if self.path.exists() else b""
        keep = data.splitlines(keepends=True)[:n]
        whole = [ln for ln in keep if ln.endswith(b"\n") and _parses(ln)]
        if len(whole) < n:
            raise DamagedFile(self.path, f"{len(whole)} whole lines where the checkpoint counted {n}", RUN_RESTARTS)
        if len(keep) != len(data.splitlines(keepends=True)):
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(b"".join(keep))
        self.lines = n

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if not is_write_failure(e):
                raise
            raise write_failure(e, str(self.path), "a line cut short is dropped on resume; the checkpoints are "
                                                   "intact and the same command resumes from the last one") from None
        self.lines += 1
        if self.on_write:  # experiment trackers (trackers.py)
            self.on_write(record)


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
