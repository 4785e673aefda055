"""The machine a result came from: package versions, the CPU, memory, the git commit, and the logging
every sftdpo process sets up the same way. Torch-free, so the CLI and the study driver start fast."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm.auto import tqdm

# -v on the command line, for the run processes a study starts
VERBOSE_ENV = "SFTDPO_VERBOSE"
# Under the Ray executor: the pid of the Ray worker a run's process must not outlive (train/worker.py)
WORKER_PARENT_PID_ENV = "SFTDPO_WORKER_PARENT_PID"

# libraries whose INFO chatter (weight loading, hub retries) stays out of the terminal unless -v
NOISY_LOGGERS = ("transformers", "httpx", "urllib3", "huggingface_hub", "datasets", "accelerate", "peft",
                 "fontTools", "matplotlib", "mlflow", "alembic", "wandb")  # fontTools: each glyph subset of a PDF


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a line is written, not the stream it was when logging
    was set up (a caller that redirects stderr afterwards, as pytest's capture does, gets the lines)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO, verbose: bool = False) -> None:
    """sftdpo's messages as plain lines on stderr; library noise (INFO chatter, weight-loading and
    download bars) at ERROR unless `verbose` (-v)."""
    logging.basicConfig(level=level, format="%(message)s", handlers=[_Stderr()], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:  # read by transformers and huggingface_hub when they are imported (in this process or a child)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        quiet_transformers()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, Slurm, Kubernetes), raised where Ctrl-C raises KeyboardInterrupt, so
    a terminated run stops as an interrupted one does: checkpointed epochs kept, resumable."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block, SIGTERM raises Terminated in the main thread (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_transformers() -> None:
    """transformers' own bars (weight loading, GGUF conversion) off unless -v. setup_logging calls it,
    and models.py once more after importing transformers: the CLI sets logging up before a command
    imports transformers, a run process after."""
    if os.environ.get(VERBOSE_ENV) != "1" and "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def progress(total: int, desc: str, main: bool = True):
    """A tqdm bar where a person watches a terminal; nothing otherwise (CI, nohup, a log file get the
    per-epoch and per-evaluation lines instead)."""
    return tqdm(total=total, desc=desc, disable=not (main and sys.stderr.isatty()), leave=False)


def format_duration(seconds: float) -> str:
    """`1:02:03` / `2:03`: elapsed times and ETAs in progress lines."""
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("sftdpo", "torch", "transformers", "peft", "sacrebleu", "scikit-learn", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) Platinum 8480+'."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_bf16() -> str | None:
    """The CPU's bf16 matrix extension ('amx_bf16' or 'avx512_bf16'), None without one."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB. Not getrusage's ru_maxrss where /proc has them: that
    survives execve, so a spawned run process would report its parent's peak if that was higher."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def git_commit() -> str | None:
    """The commit of the sftdpo checkout this code runs from (None for an installed wheel)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def descendants(pid: int) -> set[int]:
    """The processes below `pid` now, children of children included (Linux: from /proc; elsewhere none).
    A study's run processes are its descendants: the chaos check and the tests look for any left."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p}
        out |= kids
        todo += kids
    return out


def still_running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie, ended but not yet reaped, is not)."""
    def running(p: int) -> bool:
        try:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    return {p for p in pids if running(p)}
