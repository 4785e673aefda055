"""The local executor: a study's pending runs one after the other on this machine, each in its own
(forked) process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..system import format_duration
from .process import can_fork, execute_run

# (run name, ok, error) -> (ok, error) after the driver checked and recorded the result
OnDone = Callable[[str, bool, "str | None"], "tuple[bool, str | None]"]


def run_local(study, todo: list[tuple[str, RunConfig]], on_done: OnDone) -> None:
    fork = can_fork()
    started = time.perf_counter()
    for i, (name, _) in enumerate(todo, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(todo)}] {name} ...", flush=True)
        ok, err = execute_run(study.run_dir(name), study.prefix_dir, study.prefix_epochs, fork=fork)
        ok, err = on_done(name, ok, err)
        now = time.perf_counter()
        eta = (now - started) / i * (len(todo) - i)
        if ok:
            print(f"[{i}/{len(todo)}] {name} done in {now - t0:.0f} s: {result_line(study.run_dir(name))} "
                  f"(study: {format_duration(now - started)} elapsed, ETA {format_duration(eta)})", flush=True)
        else:
            print(f"[{i}/{len(todo)}] {name} FAILED: {err}", flush=True)


def result_line(run_dir: Path) -> str:
    """A finished run's dev metrics, `accuracy=0.7100 macro_f1=0.4354`."""
    try:
        return metrics_line(json.loads((run_dir / "summary.json").read_text()))
    except (OSError, ValueError):
        return "(no summary)"


def metrics_line(summary: dict) -> str:
    return " ".join(f"{k.removeprefix('dev/')}={v:.4f}" for k, v in summary.items()
                    if k.startswith("dev/") and isinstance(v, (int, float)))
