"""The process that trains one run of a study: `python -m sftdpo.train.worker RUN_DIR [--prefix-dir
DIR --prefix-epochs 1,3]`, started (or forked) by the study's executor. It reads the run's config
from RUN_DIR/run.json, trains or resumes it, and exits 0 when summary.json is written.

Fault injection for the crash-recovery tests, declared here and nowhere else:
SFTDPO_TEST_DIE_AFTER_EPOCH=N kills this process with SIGKILL right after the checkpoint of epoch N
is on disk (only runs whose directory name contains SFTDPO_TEST_DIE_RUN, when set);
SFTDPO_TEST_DIE_PARENT=1 kills its parent instead (under the Ray executor: the Ray worker), and
this process a minute later if the parent-death signal has not ended it by then.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from ..config import RunConfig, SftdpoError
from ..system import VERBOSE_ENV, WORKER_PARENT_PID_ENV, setup_logging
from .loop import train
from .prefix import SFTPrefixes



def die_with_parent() -> None:
    """Under the Ray executor the run's process must not outlive its Ray worker: a dead or cancelled
    worker would leave it training unseen, and the next study run would start a second process on
    the same run directory. Linux only (PR_SET_PDEATHSIG)."""
    parent = os.environ.get(WORKER_PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os._exit(1)


def fault_hook(run_dir: Path) -> Callable[[int], None] | None:
    """The test fault of the module docstring, as the run's on_checkpoint callback (None: no fault)."""
    epoch = os.environ.get("SFTDPO_TEST_DIE_AFTER_EPOCH")
    if not epoch or os.environ.get("SFTDPO_TEST_DIE_RUN", "") not in run_dir.name:
        return None

    def die(done: int) -> None:
        if done != int(epoch):
            return
        sys.stderr.flush()
        if os.environ.get("SFTDPO_TEST_DIE_PARENT") == "1":
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # under Ray the parent-death signal ends this process first (tests check)
        os.kill(os.getpid(), signal.SIGKILL)

    return die


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sftdpo.train.worker")
    p.add_argument("run_dir")
    p.add_argument("--prefix-dir")
    p.add_argument("--prefix-epochs", default="")
    ns = p.parse_args(argv)
    setup_logging(verbose=os.environ.get(VERBOSE_ENV) == "1")
    run_dir = Path(ns.run_dir)
    die_with_parent()
    try:
        cfg = RunConfig.from_dict(json.loads((run_dir / "run.json").read_text())["config"])
        epochs = {int(e) for e in ns.prefix_epochs.split(",") if e}
        prefixes = SFTPrefixes(Path(ns.prefix_dir), epochs) if ns.prefix_dir else None
        train(cfg, run_dir, prefixes=prefixes, on_checkpoint=fault_hook(run_dir))
    except SftdpoError as e:
        print(f"sftdpo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
