"""The local executor: a study's pending runs on this machine, each in its own (forked) process;
one after the other, or `--jobs N` at once, each with its share of the CPU threads (N runs on one
GPU share it; see the README on NVIDIA MPS)."""

from __future__ import annotations

import json
import os
import queue
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from ..config import RunConfig, SftdpoError
from .process import can_fork, execute_run, stop_run, stop_runs, warm_fork_server
from .schedule import OnDone, Progress, dispatch, plan_prefix_waits


def threads_per_run(jobs: int, cpus: int | None = None) -> int | None:
    """torch threads of each of `jobs` concurrent runs: the machine's CPUs shared out (None: one run
    alone keeps torch's own choice)."""
    if jobs <= 1:
        return None
    return max(1, (cpus or os.cpu_count() or 1) // jobs)


def gpu_slots(gpus_per_run: float, n_gpus: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each concurrent run when runs take `gpus_per_run` of a GPU: 1/F slots
    per GPU (0.25: four runs share each GPU). Several runs on one GPU interleave their kernels;
    NVIDIA MPS lets them run at the same time (README)."""
    if gpus_per_run <= 0 or gpus_per_run > 1:
        raise SftdpoError(f"--gpus-per-run {gpus_per_run:g}: the local executor shares GPUs between runs (0 < F <= 1); "
                          "more than one GPU per run: torchrun (one run) or --executor ray")
    if n_gpus == 0:
        raise SftdpoError("--gpus-per-run needs a CUDA GPU and this machine has none: leave it out (or use --jobs N)")
    per_gpu = int(1 / gpus_per_run + 1e-9)
    return [str(g) for _ in range(per_gpu) for g in range(n_gpus)]


def run_local(study, todo: list[tuple[str, RunConfig]], on_done: OnDone, *, jobs: int | None = None,
              gpus_per_run: float = 0.0, estimates: dict[str, float] | None = None) -> None:
    slots: list[str | None] = [None]
    if gpus_per_run:
        slots = gpu_slots(gpus_per_run, torch.cuda.device_count())
        jobs = jobs or len(slots)
    jobs = 1 if jobs is None else jobs
    if jobs < 1:
        raise SftdpoError(f"--jobs must be at least 1 (got {jobs})")
    slots = (slots * jobs)[:jobs]
    fork = can_fork()
    threads = threads_per_run(jobs)
    # one after the other, a producer always finishes before the runs that reuse its prefix start
    # (StudyDir.pending puts it first); side by side, the others wait for it
    waits = plan_prefix_waits(todo, study.done_configs()) if jobs > 1 else {}
    if jobs > 1:
        print(f"local: {jobs} runs at once, {threads} CPU thread(s) each"
              + (f", GPUs {','.join(s for s in slots if s)}" if gpus_per_run else "")
              + (f"; {len(waits)} wait for the shared SFT prefix of another run" if waits else ""), flush=True)
        if fork:
            warm_fork_server()  # started once here, not by the first threads at the same time
    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)

    def execute(name: str) -> tuple[bool, str | None]:
        slot = free.get()  # never waits: at most `jobs` runs hold one
        try:
            env = {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None
            return execute_run(study.run_dir(name), study.prefix_dir, study.prefix_epochs, fork=fork, threads=threads,
                               env=env)
        finally:
            free.put(slot)

    names: dict[Future, str] = {}

    def submit(name: str) -> Future:
        future = pool.submit(execute, name)
        names[future] = name
        return future

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            dispatch(todo, waits, submit=submit, wait_any=lambda fs: wait(fs, return_when=FIRST_COMPLETED).done,
                     result=Future.result, on_done=on_done, progress=Progress(todo, estimates or {}, jobs),
                     capacity=jobs, details=lambda name: result_line(study.run_dir(name)),
                     cancel=lambda future: stop_run(study.run_dir(names[future])))
        except BaseException:  # stopped (Ctrl-C, SIGTERM): no run process trains on without the study
            stop_runs()
            raise


def result_line(run_dir: Path) -> str:
    """A finished run's dev metrics, `accuracy=0.7100 macro_f1=0.4354`."""
    try:
        return metrics_line(json.loads((run_dir / "summary.json").read_text()))
    except (OSError, ValueError):
        return "(no summary)"


def metrics_line(summary: dict) -> str:
    return " ".join(f"{k.removeprefix('dev/')}={v:.4f}" for k, v in summary.items()
                    if k.startswith("dev/") and isinstance(v, (int, float)))
