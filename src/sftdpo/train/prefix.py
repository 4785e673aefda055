"""Shared SFT prefixes: the epoch-k checkpoints of an SFT trajectory, kept once for every run of a
study that passes through them.

The SFT stage's schedule spans the run's whole epoch budget, so SFT@k->DPO's first k epochs are
exactly the first k epochs of the SFT-only run of the same config: the hand-off is a point on the
SFT trajectory. A run that reaches epoch k of a shared trajectory exports its checkpoints and
metrics there (`<study>/prefixes/<key>/`); a later run on the same trajectory starts from the
longest prefix its SFT stage contains instead of training those epochs again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config import RunConfig
from ..distributed import barrier, broadcast_from_main
from ..files import atomic_dir, copy_atomic, link_file, link_tree, replace_dir, stable_hash
from .checkpoint import STATE_FILE

log = logging.getLogger("sftdpo")


class SFTPrefixes:
    """The prefix store of a study: `root/<key>/{last,best,metrics.jsonl}` for the epochs in `epochs`."""

    def __init__(self, root: Path, epochs: set[int]) -> None:
        self.root, self.epochs = Path(root), set(epochs)

    def key(self, cfg: RunConfig, epoch: int, world_size: int) -> str:
        """The SFT trajectory of `cfg` up to `epoch` (data parallel: the batches depend on the world size)."""
        dist = {"world_size": world_size} if world_size > 1 else {}
        return stable_hash({"trajectory": cfg.trajectory_key(), "prefix_epoch": epoch, **dist})

    def seed(self, run_dir: Path, cfg: RunConfig, world_size: int, is_main: bool) -> int:
        """Copy (hard-link) the longest stored prefix of this run's SFT stage into `run_dir`;
        the number of epochs reused (0: none). Rank 0 decides and copies; then all ranks load."""
        for k in range(cfg.sft_epochs, 0, -1):
            src = self.root / self.key(cfg, k, world_size)
            if broadcast_from_main((src / "last" / STATE_FILE).exists() and (src / "metrics.jsonl").exists()):
                if is_main:
                    # the metrics first, in one step: a process killed half-way leaves no `last`
                    # checkpoint without the metrics it counted, so the next attempt seeds again
                    copy_atomic(src / "metrics.jsonl", run_dir / "metrics.jsonl")
                    for name in ("best", "last"):  # each replaced in one step (a checkpoint is flat)
                        dst = run_dir / "checkpoints" / name
                        if (src / name).exists():
                            replace_dir(dst, lambda tmp, d=src / name: [link_file(f, tmp / f.name) for f in d.iterdir()])
                        else:
                            shutil.rmtree(dst, ignore_errors=True)
                barrier()
                log.info("reusing the SFT prefix of %d epoch(s) from %s", k, src)
                return k
        return 0

    def drop(self, cfg: RunConfig, world_size: int) -> None:
        """Remove the stored prefixes of this run's SFT trajectory (a damaged one: the run that finds it
        trains those epochs again and exports them anew)."""
        for k in sorted(self.epochs):
            shutil.rmtree(self.root / self.key(cfg, k, world_size), ignore_errors=True)

    def export(self, run_dir: Path, cfg: RunConfig, epoch: int, world_size: int) -> None:
        """Store this run's state after SFT epoch `epoch` (if it is a shared epoch and not stored yet)."""
        if epoch not in self.epochs:
            return
        final = self.root / self.key(cfg, epoch, world_size)
        if final.exists():
            return

        def build(tmp: Path) -> None:
            link_tree(run_dir / "checkpoints" / "last", tmp / "last")
            if (run_dir / "checkpoints" / "best").exists():
                link_tree(run_dir / "checkpoints" / "best", tmp / "best")
            shutil.copy(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")

        atomic_dir(final, build)
