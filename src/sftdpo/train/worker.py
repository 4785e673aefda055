"""The process that trains one run of a study: `python -m sftdpo.train.worker RUN_DIR [--prefix-dir
DIR --prefix-epochs 1,3]`, started (or forked) by the study's executor. It reads the run's config
from RUN_DIR/run.json, trains or resumes it, and exits 0 when summary.json is written.

Fault injection for the crash-recovery tests, declared here and nowhere else:
SFTDPO_TEST_DIE_AFTER_EPOCH=N kills this process with SIGKILL right after the checkpoint of epoch N
is on disk (only runs whose directory name contains SFTDPO_TEST_DIE_RUN, when set);
SFTDPO_TEST_DIE_PARENT=1 kills its parent instead (under the Ray executor: the Ray worker), and
this process a minute later if the parent-death signal has not ended it by then.

Stopped with SIGTERM or SIGINT (the study driver's stop_runs, Ctrl-C in the terminal) the process
stops as `train` does on Ctrl-C, exit status 130 (143 for SIGTERM): the epochs finished so far are
checkpointed and the next `study run` resumes the run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import RunConfig, SftdpoError
from ..files import lock_holder, process_alive, read_json
from ..system import VERBOSE_ENV, WORKER_PARENT_PID_ENV, Terminated, setup_logging
from .loop import train
from .prefix import SFTPrefixes

# how long a run process waits for the previous process of its run directory to be gone (one killed
# with its study a moment ago: the kernel is still tearing it down)
LOCK_WAIT_S = 30.0


def die_with_parent() -> None:
    """The run's process must not outlive the process that started it (WORKER_PARENT_PID_ENV: the
    study driver, or under Ray the Ray worker): it would train on unseen, and the next study run
    would find the run directory busy. The kernel sends SIGKILL when this process's parent dies
    (PR_SET_PDEATHSIG). Forked from the local executor's fork server, whose parent is the driver,
    the parent is the fork server, which lives on while one of its children does: a thread then
    waits for the driver itself to end (a pidfd) and ends this process. Linux only."""
    watched = os.environ.get(WORKER_PARENT_PID_ENV)
    if not watched or not sys.platform.startswith("linux"):
        return
    watched_pid, parent = int(watched), os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or not process_alive(watched_pid):  # gone before the signal was armed
        os._exit(1)
    if watched_pid != parent:
        threading.Thread(target=_die_with, args=(watched_pid,), daemon=True, name="sftdpo-die-with-driver").start()


def _die_with(pid: int) -> None:
    """End this process (as SIGKILL would) once process `pid` has ended."""
    try:
        fd = os.pidfd_open(pid)  # readable when the process ends (Linux 5.3)
        select.select([fd], [], [])
    except (OSError, AttributeError):
        while process_alive(pid):
            time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _stop(signum: int, frame: object) -> None:
    """SIGTERM and SIGINT: stop once (a second signal, e.g. the driver's SIGTERM after the terminal's
    Ctrl-C, must not interrupt the first one's clean-up)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def wait_for_previous(run_dir: Path, seconds: float = LOCK_WAIT_S) -> None:
    """Give the previous process of this run directory (killed with its study a moment ago) time to
    be gone; a live one after that is the loop's one-line error."""
    deadline = time.monotonic() + seconds
    while lock_holder(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)


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
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        cfg = RunConfig.from_dict(read_json(run_dir / "run.json", "run the study again to rewrite it")["config"])
        epochs = {int(e) for e in ns.prefix_epochs.split(",") if e}
        prefixes = SFTPrefixes(Path(ns.prefix_dir), epochs) if ns.prefix_dir else None
        wait_for_previous(run_dir)
        train(cfg, run_dir, prefixes=prefixes, on_checkpoint=fault_hook(run_dir))
    except SftdpoError as e:
        print(f"sftdpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"sftdpo: {how}: the epochs finished so far are checkpointed; the next study run resumes the run",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
