"""Run a study's pending runs as Ray tasks: `sftdpo study run SPEC --executor ray`.

Each pending run becomes one Ray task with `--cpus-per-run`/`--gpus-per-run` resources. The task
runs the same worker process as the local executor (`study.process.execute_run`, i.e. `python -m
sftdpo.train.worker RUN_DIR`), so isolation, peak-memory accounting and checkpoint/resume are the
same; it returns `(ok, error)` to the driver, which records it in the run directory.

Run directories live in the study directory (`--out`), which must be on a path every node sees
under the same name (NFS, a shared disk); the driver resolves it to an absolute path. Environment
variables that tell sftdpo and Hugging Face where data and caches are (`SFTDPO_*`, `HF_*`,
`TRANSFORMERS_*`) travel with every task in its `runtime_env`.

Scheduling (schedule.py, as for `--jobs N` on one machine): the runs of a group that shares an SFT
prefix are dispatched once the group's producer finished; runs without a shared prefix run in
parallel.

Failures: a run whose task raised, whose training subprocess failed or whose Ray worker died
(max_retries=0) is marked 'failed' with its error line; its epoch checkpoints stay in its run
directory and the next `sftdpo study run` resumes it, exactly as with the local executor. The
training subprocess is tied to its Ray worker (Linux: parent-death signal), so a dead or
cancelled worker never leaves a run training unsupervised.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from ..config import RunConfig, SftdpoError
from ..system import WORKER_PARENT_PID_ENV as PARENT_PID_ENV
from .local import result_line
from .process import execute_run
from .schedule import OnDone, Progress, dispatch, plan_prefix_waits

RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'sftdpo[ray]'"

# environment that decides where runs find data, models and caches; forwarded to every task
FORWARD_ENV_PREFIXES = ("SFTDPO_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
# path-valued variables: made absolute, since a Ray worker's working directory is not the driver's
PATH_ENV = ("SFTDPO_DATA_DIR", "SFTDPO_CACHE_DIR", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")

# a local cluster only passes (ok, error) tuples around: a small object store is plenty
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20


def require_ray():
    """The ray module, or the one-line error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise SftdpoError(RAY_MISSING) from None
    return ray


# -- the Ray side -------------------------------------------------------------------------------

def run_task(run_dir: str, prefix_dir: str, prefix_epochs: list[int]) -> tuple[bool, str | None]:
    """Body of a run's Ray task, on a worker node: train the run in its worker subprocess."""
    d = Path(run_dir)
    if not (d / "run.json").exists():
        return False, (f"run directory {d} is not visible on node {socket.gethostname()}: "
                       "put the study directory (--out) on a path shared by every node")
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # inherited by the subprocess
    return execute_run(d, Path(prefix_dir), prefix_epochs)


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's data/cache/hub settings, for every task's runtime_env."""
    environ = dict(os.environ if environ is None else environ)
    out = {k: v for k, v in environ.items() if k.startswith(FORWARD_ENV_PREFIXES) and k != PARENT_PID_ENV}
    for k in PATH_ENV:
        if out.get(k) and not os.path.isabs(out[k]):
            out[k] = str(Path(out[k]).expanduser().resolve())
    # the driver's ./data would not be in a worker's working directory: name it explicitly
    if "SFTDPO_DATA_DIR" not in out and (Path.cwd() / "data").is_dir():
        out["SFTDPO_DATA_DIR"] = str(Path.cwd() / "data")
    return out


def error_line(e: BaseException) -> str:
    """One line for the store from a Ray exception (task error, dead worker or node, cancelled)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # a RayTaskError ends with the task's own exception; system errors say what happened first
    last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    first = lines[0] if lines else ""
    msg = last if type(e).__name__ == "RayTaskError" or "RayTaskError" in type(e).__name__ else first
    return f"{type(e).__name__}: {msg}"[:500]


def _check_resources(ray, cpus: float, gpus: float, local: bool) -> None:
    """A run that fits no node would wait forever: an error on the local cluster we started (it
    never grows), a warning on a cluster that may still add nodes (autoscaler, `ray start`)."""
    fits = False
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            fits |= res.get("CPU", 0) >= cpus and res.get("GPU", 0) >= gpus
    if fits:
        return
    msg = f"no node of the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for a run (--cpus-per-run/--gpus-per-run)"
    if local:
        raise SftdpoError(f"{msg}: the local Ray cluster has {_total(ray)}; lower them or give --address of a larger cluster")
    print(f"sftdpo: warning: {msg}; the runs wait until such a node joins", file=sys.stderr, flush=True)


def _total(ray) -> str:
    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPU(s) and {res.get('GPU', 0):g} GPU(s)"


def run_ray(study, todo: list[tuple[str, RunConfig]], on_done: OnDone, *, address: str | None = None,
            gpus_per_run: float = 0.0, cpus_per_run: float = 1.0, estimates: dict[str, float] | None = None) -> None:
    """Dispatch `todo` (from StudyDir.pending) as Ray tasks; report each result to `on_done` as it comes back."""
    ray = require_ray()
    gpus_per_run, cpus_per_run = float(gpus_per_run or 0.0), float(1.0 if cpus_per_run is None else cpus_per_run)
    if cpus_per_run < 0 or gpus_per_run < 0:
        raise SftdpoError("--cpus-per-run and --gpus-per-run must be >= 0")
    if gpus_per_run > 1 and not gpus_per_run.is_integer():
        raise SftdpoError(f"--gpus-per-run {gpus_per_run:g}: more than one GPU must be a whole number (Ray's rule)")
    if not todo:
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = local = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:  # a local cluster on this machine, for the duration of the study
                local = True
                ray.init(address="local", num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise SftdpoError(f"could not start or reach {where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        started = True
    try:
        _check_resources(ray, cpus_per_run, gpus_per_run, local)
        _dispatch(ray, study, todo, on_done, cpus_per_run, gpus_per_run, estimates or {})
    finally:
        if started:
            ray.shutdown()


def _dispatch(ray, study, todo, on_done: OnDone, cpus: float, gpus: float, estimates: dict[str, float]) -> None:
    waits = plan_prefix_waits(todo, study.done_configs())
    env = forwarded_env()
    task = ray.remote(run_task)
    prefix_dir = str(Path(study.prefix_dir).resolve())
    prefix_epochs = sorted(study.prefix_epochs)
    print(f"ray: {len(todo)} run(s) as tasks of {cpus:g} CPU / {gpus:g} GPU each"
          + (f"; {len(waits)} wait for the shared SFT prefix of another run" if waits else ""), flush=True)

    def submit(name: str):
        return task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=name, runtime_env={"env_vars": env}).remote(
            str(study.run_dir(name).resolve()), prefix_dir, prefix_epochs)

    def result(ref) -> tuple[bool, str | None]:
        try:
            return ray.get(ref)
        except Exception as e:  # noqa: BLE001 - worker or node died, task raised, cancelled
            return False, error_line(e)

    # the cluster's resources decide how many run at once; the ETA assumes what fits on its CPUs/GPUs
    res = ray.cluster_resources()
    at_once = min(res.get("GPU", 0) / gpus if gpus else float("inf"), res.get("CPU", 1) / cpus if cpus else float("inf"))
    dispatch(todo, waits, submit=submit, wait_any=lambda refs: ray.wait(refs, num_returns=1)[0], result=result,
             on_done=on_done, progress=Progress(todo, estimates, int(max(1, min(at_once, len(todo))))),
             details=lambda name: result_line(study.run_dir(name)), cancel=lambda ref: ray.cancel(ref, force=True))
