"""Run a study's pending runs as Ray tasks: `sftdpo study run SPEC --executor ray`.

Each pending run becomes one Ray task with `--cpus-per-run`/`--gpus-per-run` resources. The task
runs the same worker process as the local executor (`study.process.execute_run`, i.e. `python -m
sftdpo.train.worker RUN_DIR`), so isolation, peak-memory accounting and checkpoint/resume are the
same; it returns `(ok, error)` to the driver, which records it in the run directory.

Run directories live in the study directory (`--out`), which must be on a path every node sees
under the same name (NFS, a shared disk); the driver resolves it to an absolute path. Environment
variables that tell sftdpo and Hugging Face where data and caches are (`SFTDPO_*`, `HF_*`,
`TRANSFORMERS_*`) travel with every task in its `runtime_env`.

Scheduling: the SFT prefix of staged (sft-dpo) runs is shared through `<study>/prefixes/`. Runs
whose SFT trajectory is the same (`RunConfig.trajectory_key`: same config except regime, hand-off
and DPO settings) form a group; one run of the group produces the prefix
(the SFT-only run if the group has one, otherwise the staged run with the latest hand-off, whose
SFT stage passes every hand-off of the group) and the other runs of the group are dispatched only
once it finished. If the producer fails, the waiting run with the longest SFT stage takes its place
(it trains the SFT stage itself and exports the prefix) and the others wait for that one. Runs
without a shared prefix (SFT-only and DPO runs of other groups, DPO from the base model) run in
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
import time
from pathlib import Path
from typing import Any, Iterable

from ..config import RunConfig, SftdpoError
from ..system import WORKER_PARENT_PID_ENV as PARENT_PID_ENV
from .local import OnDone
from .process import execute_run

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


# -- prefix scheduling --------------------------------------------------------------------------

def _producer_rank(c: RunConfig) -> tuple[int, int]:
    # the SFT-only run passes every epoch of the trajectory; else the latest hand-off
    return (1, c.epochs) if c.regime == "sft" else (0, c.sft_epochs)


def plan_prefix_waits(todo: list[tuple[str, RunConfig]], done: Iterable[RunConfig] = ()) -> dict[str, str]:
    """{run name: name of the run it waits for}. Only staged runs share a prefix; in each group of
    runs with one SFT trajectory the producer goes first (see the module docstring). If the
    producer finished before (in `done`), its prefixes are on disk and nobody waits."""
    groups: dict[str, list[tuple[str, RunConfig]]] = {}
    for name, c in todo:
        key = c.trajectory_key()
        if key is not None:
            groups.setdefault(key, []).append((name, c))
    done_best: dict[str, tuple[int, int]] = {}
    for c in done:
        key = c.trajectory_key()
        if key in groups:
            done_best[key] = max(done_best.get(key, (-1, -1)), _producer_rank(c))
    waits: dict[str, str] = {}
    for key, members in groups.items():
        if not any(c.regime == "sft-dpo" for _, c in members) or len(members) < 2:
            continue  # nothing to share
        producer, pc = max(members, key=lambda nc: _producer_rank(nc[1]))  # first of the best, in todo order
        if key in done_best and done_best[key] >= _producer_rank(pc):
            continue  # a finished run already exported every prefix this group needs
        for name, _ in members:
            if name != producer:
                waits[name] = producer
    return waits


def after_failure(waits: dict[str, str], failed: str, waiting: list[tuple[str, RunConfig]]) -> None:
    """The producer `failed` (its prefix may be missing): the first waiting run of its group with
    the longest SFT stage becomes the producer and the others wait for it, so the prefix is still
    trained once (and never exported by two runs at the same time)."""
    waiters = [(n, c) for n, c in waiting if waits.get(n) == failed]
    if not waiters:
        return
    new, _ = max(waiters, key=lambda nc: _producer_rank(nc[1]))
    del waits[new]
    for n, _ in waiters:
        if n != new:
            waits[n] = new


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
            gpus_per_run: float = 0.0, cpus_per_run: float = 1.0) -> None:
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
        _dispatch(ray, study, todo, on_done, cpus_per_run, gpus_per_run)
    finally:
        if started:
            ray.shutdown()


def _dispatch(ray, study, todo, on_done: OnDone, cpus: float, gpus: float) -> None:
    waits = plan_prefix_waits(todo, study.done_configs())
    env = forwarded_env()
    task = ray.remote(run_task)
    prefix_dir = str(Path(study.prefix_dir).resolve())
    prefix_epochs = sorted(study.prefix_epochs)
    n = len(todo)
    index = {name: i for i, (name, _) in enumerate(todo, 1)}
    waiting = list(todo)
    finished: set[str] = set()
    inflight: dict[Any, tuple[str, RunConfig, float]] = {}
    print(f"ray: {n} run(s) as tasks of {cpus:g} CPU / {gpus:g} GPU each"
          + (f"; {len(waits)} wait for the shared SFT prefix of another run" if waits else ""), flush=True)
    try:
        while waiting or inflight:
            still = []
            for name, c in waiting:
                if name in waits and waits[name] not in finished:
                    still.append((name, c))
                    continue
                ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=name,
                                   runtime_env={"env_vars": env}).remote(
                    str(study.run_dir(name).resolve()), prefix_dir, prefix_epochs)
                inflight[ref] = (name, c, time.perf_counter())
                print(f"[{index[name]}/{n}] {name} dispatched", flush=True)
            waiting = still
            if not inflight:  # cannot happen (producers never wait); never hang on it
                waits.clear()
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                name, c, t0 = inflight.pop(ref)
                try:
                    ok, err = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - worker or node died, task raised, cancelled
                    ok, err = False, error_line(e)
                ok, err = on_done(name, ok, err)
                if ok:
                    print(f"[{index[name]}/{n}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
                else:
                    print(f"[{index[name]}/{n}] {name} FAILED: {err}", flush=True)
                    after_failure(waits, name, waiting)
                finished.add(name)
    except BaseException:  # KeyboardInterrupt included: stop what runs, say so in its run directory
        for ref, (name, c, _) in inflight.items():
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
            on_done(name, False, "interrupted (the driver stopped): run the study again to resume")
        raise
