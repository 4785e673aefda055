"""The local executor: a study's pending runs one after the other on this machine, each in its own
(forked) process."""

from __future__ import annotations

import time
from typing import Callable

from ..config import RunConfig
from .process import can_fork, execute_run

# (run name, ok, error) -> (ok, error) after the driver checked and recorded the result
OnDone = Callable[[str, bool, "str | None"], "tuple[bool, str | None]"]


def run_local(study, todo: list[tuple[str, RunConfig]], on_done: OnDone) -> None:
    fork = can_fork()
    for i, (name, _) in enumerate(todo, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(todo)}] {name} ...", flush=True)
        ok, err = execute_run(study.run_dir(name), study.prefix_dir, study.prefix_epochs, fork=fork)
        ok, err = on_done(name, ok, err)
        if ok:
            print(f"[{i}/{len(todo)}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            print(f"[{i}/{len(todo)}] {name} FAILED: {err}", flush=True)
