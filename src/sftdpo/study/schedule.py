"""The order in which a study's pending runs start, shared by the local executor (`--jobs N`) and
the Ray executor: several runs at once, without training a shared SFT prefix twice.

Runs whose SFT trajectory is the same (`RunConfig.trajectory_key`: same config except regime,
hand-off and DPO settings) form a group; one run of the group produces the prefix (the SFT-only run
if the group has one, otherwise the staged run with the latest hand-off, whose SFT stage passes
every hand-off of the group) and the other runs of the group start only once it finished. If the
producer fails, the waiting run with the longest SFT stage takes its place (it trains the SFT stage
itself and exports the prefix) and the others wait for that one. Runs without a shared prefix run
side by side.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Iterable

from ..config import RunConfig
from ..system import format_duration

# (run name, ok, error) -> (ok, error) after the driver checked and recorded the result
OnDone = Callable[[str, bool, "str | None"], "tuple[bool, str | None]"]


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


class Progress:
    """The study's progress lines, and its ETA (calibrated_eta: the estimates of the runs still to
    come, scaled by how long the finished runs took against theirs) divided over the runs that train
    at once."""

    def __init__(self, todo: list[tuple[str, RunConfig]], estimates: dict[str, float], jobs: int = 1) -> None:
        self.n, self.jobs = len(todo), max(1, jobs)
        self.index = {name: i for i, (name, _) in enumerate(todo, 1)}
        self.estimates = estimates
        self.left = [name for name, _ in todo]
        self.took: dict[str, float] = {}
        self.started = time.perf_counter()

    def start(self, name: str) -> None:
        print(f"[{self.index[name]}/{self.n}] {name} ...", flush=True)

    def eta(self) -> float:
        runs = [("done", self.estimates.get(n), a) for n, a in self.took.items()]
        eta = calibrated_eta(runs + [("pending", self.estimates.get(n), None) for n in self.left])
        if eta is not None:
            return eta[0] / self.jobs
        # no estimates: the mean time of a finished run
        return (time.perf_counter() - self.started) / max(len(self.took), 1) * len(self.left) / self.jobs

    def finish(self, name: str, seconds: float, ok: bool, detail: str) -> None:
        self.left.remove(name)
        if not ok:
            print(f"[{self.index[name]}/{self.n}] {name} FAILED: {detail}", flush=True)
            return
        self.took[name] = seconds
        est = f", estimated {format_duration(self.estimates[name])}" if self.estimates.get(name) else ""
        print(f"[{self.index[name]}/{self.n}] {name} done in {format_duration(seconds)}{est}: {detail} "
              f"(study: {format_duration(time.perf_counter() - self.started)} elapsed, "
              f"ETA {format_duration(self.eta())})", flush=True)


def calibrated_eta(runs: list[tuple[str, float | None, float | None]]) -> tuple[float, str] | None:
    """(seconds, how) left for a study's pending and running runs, one at a time, from their
    estimates scaled by actual/estimated of its finished runs; runs are (status, estimated s, actual s).
    None when the runs left have no estimate (a study prepared before estimates existed) or none is left."""
    left = [e for status, e, _ in runs if status in ("pending", "running")]
    if not left or any(e is None for e in left):
        return None
    done = [(e, a) for status, e, a in runs if status == "done" and e and a is not None]
    if not done:
        return sum(left), "from the estimates; no run finished yet"
    ratio = sum(a for _, a in done) / sum(e for e, _ in done)
    return sum(left) * ratio, f"the estimates x {ratio:.2f}, actual/estimated of {len(done)} finished run(s)"


def dispatch(todo: list[tuple[str, RunConfig]], waits: dict[str, str], *, submit: Callable[[str], Hashable],
             wait_any: Callable[[list], Iterable], result: Callable[[Any], tuple[bool, str | None]], on_done: OnDone,
             progress: Progress, capacity: int | None = None, details: Callable[[str], str] = lambda name: "",
             cancel: Callable[[Any], None] | None = None) -> None:
    """Start the runs of `todo` in order, at most `capacity` at once (None: as many as the executor
    takes), a run that waits for a prefix producer only once that one finished; hand each result
    to `on_done` as it comes back. `submit(name)` starts a run and returns its handle,
    `wait_any(handles)` blocks until some are finished and returns those, `result(handle)` is the
    run's (ok, error). Interrupted (Ctrl-C included), the runs in flight are cancelled where
    `cancel` can, and recorded as interrupted: the next `study run` resumes them."""
    waiting = list(todo)
    finished: set[str] = set()
    inflight: dict[Any, tuple[str, float]] = {}
    try:
        _loop(waiting, waits, finished, inflight, submit, wait_any, result, on_done, progress, capacity, details)
    except BaseException:
        for handle, (name, _) in inflight.items():
            if cancel:
                try:
                    cancel(handle)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            on_done(name, False, "interrupted (the driver stopped): run the study again to resume")
        raise


def _loop(waiting, waits, finished, inflight, submit, wait_any, result, on_done, progress, capacity, details) -> None:
    while waiting or inflight:
        still = []
        for name, c in waiting:
            if (name in waits and waits[name] not in finished) or (capacity and len(inflight) >= capacity):
                still.append((name, c))
                continue
            progress.start(name)
            inflight[submit(name)] = (name, time.perf_counter())
        waiting = still
        if not inflight:  # cannot happen (producers never wait); never hang on it
            waits.clear()
            continue
        for handle in wait_any(list(inflight)):
            name, t0 = inflight.pop(handle)
            ok, err = on_done(name, *result(handle))
            progress.finish(name, time.perf_counter() - t0, ok, details(name) if ok else err)
            if not ok:
                after_failure(waits, name, waiting)
            finished.add(name)
