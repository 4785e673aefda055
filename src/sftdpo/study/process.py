"""How a study starts one run's process, and reads its failure.

Each run trains in its own process (`python -m sftdpo.train.worker RUN_DIR`): a crash, an
out-of-memory kill or kill -9 takes down that run only, peak memory is the run's own, and the run
resumes from its last epoch checkpoint the next time the study runs. The local executor forks the
process from a fork server that has torch and transformers imported already (~5 s less per run, a
minute of the quick study); the Ray executor starts it as a subprocess on the worker node.

No run process outlives the study that started it: stopped (Ctrl-C, SIGTERM) the driver asks its runs
to stop (`stop_runs`: SIGTERM, which a run takes as Ctrl-C, then SIGKILL after a grace period), and
killed outright (kill -9) it takes them along: each run process asks the kernel for SIGKILL when its
parent dies, and a forked one (whose parent, the fork server, lives on while it has children) also
watches the driver itself (train/worker.py die_with_parent).
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Iterable, Iterator

from ..system import WORKER_PARENT_PID_ENV

WORKER_MODULE = "sftdpo.train.worker"

# the run processes this driver has started and not yet seen end: run directory -> pid
_RUNNING: dict[Path, int] = {}
_STOPPING: set[int] = set()  # pids already asked to stop
_RUNNING_LOCK = threading.Lock()


@contextlib.contextmanager
def _running(run_dir: Path, pid: int) -> Iterator[None]:
    with _RUNNING_LOCK:
        _RUNNING[run_dir] = pid
    try:
        yield
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(run_dir, None)
            _STOPPING.discard(pid)


def stop_run(run_dir: Path) -> None:
    """Ask the process training `run_dir` (if this driver started it) to stop: SIGTERM, which the run
    takes as Ctrl-C (its finished epochs are checkpointed; the next `study run` resumes it)."""
    with _RUNNING_LOCK:
        pid = _RUNNING.get(Path(run_dir))
        if pid is None or pid in _STOPPING:
            return
        _STOPPING.add(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def stop_runs(grace: float = 30.0) -> None:
    """Stop every run process this driver started and wait until they are gone: SIGTERM, then
    SIGKILL for those still there after `grace` seconds."""
    for run_dir in list(_RUNNING):
        stop_run(run_dir)
    deadline = time.monotonic() + grace
    while _RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    with _RUNNING_LOCK:
        left = list(_RUNNING.values())
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def worker_args(run_dir: Path, prefix_dir: Path, prefix_epochs: Iterable[int]) -> list[str]:
    return [str(run_dir), "--prefix-dir", str(prefix_dir), "--prefix-epochs", ",".join(map(str, sorted(prefix_epochs)))]


def worker_command(run_dir: Path, prefix_dir: Path, prefix_epochs: Iterable[int]) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, *worker_args(run_dir, prefix_dir, prefix_epochs)]


def last_error_line(stderr: str, code: int) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("sftdpo: error:") or "Error" in ln:
            return ln.strip()[:500]
    return f"exit code {code}" + (f": {lines[-1][:400]}" if lines else "")


def execute_run(run_dir: Path, prefix_dir: Path, prefix_epochs: Iterable[int], *, fork: bool = False,
                threads: int | None = None, env: dict[str, str] | None = None) -> tuple[bool, str | None]:
    """Train one run in its own process; (ok, error line). Either way a crash, an OOM kill or kill -9
    ends that run only. `fork`: forked from the fork server (see the module docstring), not started
    afresh. `threads`: torch's thread count in the run's process (default: torch's own choice);
    `env`: variables set for it (CUDA_VISIBLE_DEVICES)."""
    log_path = run_dir / "train.log"
    # the process to outlive: the driver (forked: the fork server is the run's parent, and it exits with
    # the driver), or under Ray the worker that runs this function
    env = {**os.environ, WORKER_PARENT_PID_ENV: str(os.getpid()), **(env or {})}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if fork:
        err_path = run_dir / "train.err"
        proc = _fork_context().Process(
            target=_forked_worker, args=(worker_args(run_dir, prefix_dir, prefix_epochs), log_path, err_path, env,
                                         os.getcwd(), threads))
        proc.start()
        with _running(run_dir, proc.pid):
            proc.join()
        stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
        with log_path.open("a") as logf:
            logf.write(stderr)
        err_path.unlink(missing_ok=True)
        code = proc.exitcode if proc.exitcode is not None else 1
    else:
        with log_path.open("a") as logf:
            child = subprocess.Popen(worker_command(run_dir, prefix_dir, prefix_epochs), stdout=logf,
                                     stderr=subprocess.PIPE, text=True, env=env)
            with _running(run_dir, child.pid):
                _, stderr = child.communicate()
            logf.write(stderr)
        code = child.returncode
    if code == 0 and (run_dir / "summary.json").exists():
        return True, None
    return False, last_error_line(stderr, code)


def can_fork() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


_CONTEXT = None


def _fork_context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # what every run imports, imported once by the fork server (before it starts)
        _CONTEXT.set_forkserver_preload([WORKER_MODULE, "transformers.models.llama.modeling_llama",
                                         "transformers.models.gpt2.modeling_gpt2"])
    return _CONTEXT


def warm_fork_server() -> None:
    """Start the fork server now (from one thread), before runs are forked from several."""
    _fork_context()
    forkserver.ensure_running()


def _forked_worker(argv: list[str], log_path: Path, err_path: Path, env: dict[str, str], cwd: str,
                   threads: int | None) -> None:
    """A forked run process: the study's environment and directory (not the fork server's, which
    started earlier), stdout to the run's train.log, stderr to a file the parent reads back."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # The fork server preloaded the worker module; importing it here (not in the study driver) keeps
    # torch out of the driver process.
    import torch
    from tqdm import tqdm

    from ..train.worker import main

    if threads:
        torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: os._exit would leak its semaphore
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    err = os.open(err_path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT)
    os.dup2(out, 1)
    os.dup2(err, 2)
    # the parent's sys.stdout/stderr may not be fds 1/2 (a pytest capture, a notebook): rebind them
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    code = 1
    try:
        code = main(argv)
    except BaseException:  # noqa: BLE001  (reported like the subprocess's traceback would be)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not the parent's atexit handlers
