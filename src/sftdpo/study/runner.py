"""Running a study: its directory prepared from the spec, the pending runs handed to an executor
(local.py, or ray.py with `--executor ray`), each result recorded in its run directory and the index,
and the report written at the end.

One writer per study directory: `study run` holds the directory's lock while it runs, so a second
`study run` on the same directory stops with one line naming the process that holds it (several
workers on one study is the Ray executor's job).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, SftdpoError
from ..files import DamagedFile, DirectoryBusy, DirLock, write_text_atomic
from ..models import resolve_device
from ..report import write_report
from ..system import format_duration
from .claims import print_claims_plan
from .cost import (DEVICE_NAMES, data_sizes, estimate_flops, flop_seconds, format_disk, format_gpu_hours, study_disk,
                   study_flops, study_seconds)
from .index import (clear_failure, record_failure, run_results, run_status, study_index, study_runs, write_manifest,
                    write_run_file)
from .local import run_local
from .rates import probe_work, study_rates, unmeasured
from .ray import require_ray, run_ray
from .spec import expand, load_spec, parse_only, resolve_runs


class StudyDir:
    """A study's directory: `spec.yaml`, `study.json` (every run its invocations prepared),
    `runs/<name>/` for every run of the spec, `prefixes/` for shared SFT prefixes, and the index
    `study.db`."""

    def __init__(self, spec: dict, out: Path, runs: list[tuple[str, RunConfig]]) -> None:
        self.spec, self.out = spec, Path(out)
        self.runs = runs
        self.prefix_dir = self.out / "prefixes"
        # hand-off epochs of staged runs: SFT stages export their checkpoints there to be shared
        self.prefix_epochs = {c.handoff_epoch for _, c in self.runs if c.regime == "sft-dpo"}

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def estimates(self, runs: list[tuple[str, RunConfig]], rates: dict,
                  flops: list[float] | None = None) -> dict[str, tuple[float, bool]]:
        """{run name: (estimated seconds on this machine, measured)}: from the measured `rates` of its
        kind of run (rates.study_rates), else from its FLOP count (`flops`, or counted here) at the rough
        rate of the device it would run on."""
        configs = [c for _, c in runs]
        seconds = study_seconds(configs, rates)
        flops = flops or study_flops(configs, data_sizes(configs, rates))
        return {name: (s, True) if s is not None else (flop_seconds(f, _device(c)), False)
                for (name, c), s, f in zip(runs, seconds, flops)}

    def dry_run(self, runs: list[tuple[str, RunConfig]], *, measure: bool = False) -> None:
        """Print each run's estimated time, GPU hours and disk: from the rates cached on this machine and,
        where none are, the FLOP count (said so, with what `--probe` would cost); with `measure`, probe the
        kinds of run without cached rates first, each announced with its estimated time."""
        configs = [c for _, c in runs]
        todo = unmeasured(configs)
        sizes = dict(zip(map(id, configs), data_sizes(configs, {}))) if todo else {}

        def probe_eta(c: RunConfig) -> float:
            work, n_train, n_dev = probe_work(c)
            work = dataclasses.replace(work, max_train_examples=n_train, max_dev_examples=n_dev)
            return flop_seconds(estimate_flops(work, 0, sizes.get(id(c))), _device(c))

        if measure and todo:
            print(f"probing {len(todo)} kind(s) of run on this machine first, about "
                  f"{format_duration(sum(map(probe_eta, todo)))} by their FLOP count (without --probe, --dry-run "
                  "answers at once):", flush=True)
        rates = study_rates(configs, measure=measure, eta=probe_eta)
        flops = study_flops(configs, data_sizes(configs, rates))
        est = self.estimates(runs, rates, flops)
        print(f"{len(runs)} runs in study {self.spec.get('name')}; estimated time on this machine, one run at a time "
              "(shared SFT prefixes and the untrained model's evaluation charged once):")
        for src in sorted({r.source for r in rates.values() if r}):
            print(f"  rates {src} (cached per model/device/precision)")
        left = unmeasured(configs)
        if left:
            devices = sorted({_device(c).split(":")[0] for c in left})
            print(f"  * {sum(not m for _, m in est.values())} runs: a FLOP count at the rough rate of a "
                  f"{' / '.join(DEVICE_NAMES[d] for d in devices)} (see study/cost.py), no rates cached for "
                  f"{len(left)} kind(s) of run; `--dry-run --probe` measures them here, about "
                  f"{format_duration(sum(map(probe_eta, left)))}")
        for name, _ in runs:
            s, measured = est[name]
            print(f"  {name:60s} {format_duration(s):>12s}{'' if measured else ' *'}")
        total = sum(s for s, _ in est.values())
        print(f"  {'total':60s} {format_duration(total):>12s}  (--jobs N: up to N times less, cores permitting)")
        print(f"GPU: {format_gpu_hours(sum(flops))}")
        print(format_disk(*study_disk(configs)))
        print_claims_plan(self.spec, configs, rates)

    def prepare(self, runs: list[tuple[str, RunConfig]], estimates: dict[str, tuple[float, bool]]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "spec.yaml", yaml.safe_dump(self.spec, sort_keys=False))
        entries = [write_run_file(self.run_dir(name), name, order, c, estimates.get(name))
                   for order, (name, c) in enumerate(runs)]
        write_manifest(self.out, entries)

    def pending(self, runs: list[tuple[str, RunConfig]], status: dict[str, str]) -> list[tuple[str, RunConfig]]:
        """Runs whose index `status` is not done (no result, a failed attempt, a damaged result or a
        deleted directory), SFT-only and staged runs first: they create the shared SFT prefixes that
        later runs reuse."""
        todo = [(n, c) for n, c in runs if status.get(n) != "done"]
        return sorted(todo, key=lambda nc: {"sft": 0, "sft-dpo": 1, "dpo": 2}[nc[1].regime])

    def done_configs(self) -> list[RunConfig]:
        """Configs of the runs of this directory that have finished (in this or an earlier invocation)."""
        return [RunConfig.from_dict(info["config"]) for name, info in study_runs(self.out).items()
                if run_status(self.run_dir(name))[0] == "done"]

    def prune_prefixes(self) -> None:
        """Shared SFT prefixes serve runs that have not finished; once every run of the study is done
        they go, unless a run keeps all its checkpoints (--keep-checkpoints all)."""
        runs = study_runs(self.out)  # this and earlier invocations
        if self.prefix_dir.exists() and all(run_status(self.run_dir(n))[0] == "done" for n in runs) and all(
                info["config"].get("keep_checkpoints", "all") != "all" for info in runs.values()):
            shutil.rmtree(self.prefix_dir, ignore_errors=True)

    def on_done(self, name: str, ok: bool, err: str | None) -> tuple[bool, str | None]:
        """Record a run's result where it lives (a failure, or results that cannot be read back, in
        the run directory); then the index."""
        run_dir = self.run_dir(name)
        if ok:
            try:
                run_results(run_dir)
            except (OSError, DamagedFile) as e:
                ok, err = False, f"results unreadable: {e}"
        if not ok:
            record_failure(run_dir, err)
        with study_index(self.out, run=name):
            pass
        return ok, err


def _device(c: RunConfig) -> str:
    """The device `c` would run on here (--device auto: a GPU where there is one)."""
    return str(resolve_device(c.device))


def run_study(spec: str | dict, out: Path | None = None, *, only: list[str] = (), overrides: dict | None = None,
              dry_run: bool = False, probe: bool = False, executor: str = "local", report: bool = True,
              **executor_opts: Any) -> Path:
    """Run (or resume) a study; returns its directory."""
    spec_d = load_spec(spec) if isinstance(spec, str) else spec
    out = Path(out or Path("studies") / spec_d["name"])
    keep = parse_only(list(only))
    runs = [(n, c) for n, c in expand(spec_d, overrides) if keep(c)]
    if not runs:
        raise SftdpoError(f"no run of study {spec_d['name']} matches --only {' '.join(only)}")
    if dry_run:
        StudyDir(spec_d, out, runs).dry_run(runs, measure=probe)  # measures only when asked (--probe)
        return out
    if executor == "ray":  # fail before reading data or touching the study directory when Ray is missing
        require_ray()
    runs = resolve_runs([c for _, c in runs], spec_d.get("aliases"))
    study = StudyDir(spec_d, out, runs)
    try:
        with DirLock(out, f"sftdpo study run {spec_d['name']}"):
            _run(study, runs, executor, executor_opts)
    except DirectoryBusy as e:
        raise SftdpoError(f"study directory {e.path} is in use by {e.holder}: wait for it to finish, "
                          "or use another --out") from None
    if report:
        with study_index(out) as store:
            print(f"report: {write_report(out, store)}", flush=True)
    return out


def _run(study: StudyDir, runs: list[tuple[str, RunConfig]], executor: str, executor_opts: dict) -> None:
    # estimates from cached rates only (a --dry-run measures them); the ETA corrects them as runs finish
    estimates = study.estimates(runs, study_rates([c for _, c in runs], measure=False))
    study.prepare(runs, estimates)
    with study_index(study.out) as store:
        status = {r["name"]: r["status"] for r in store.runs()}
    todo = study.pending(runs, status)
    for name, _ in todo:
        clear_failure(study.run_dir(name))
    left = sum(estimates[name][0] for name, _ in todo)
    measured = sum(estimates[name][1] for name, _ in todo)
    how = "measured rates" if measured == len(todo) else \
        f"measured rates for {measured} of {len(todo)} runs, a rough FLOP count for the rest: --dry-run measures them"
    print(f"study {study.spec['name']}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"(estimated {format_duration(left)} one at a time; {how}) -> {study.out}", flush=True)
    seconds = {name: s for name, (s, _) in estimates.items()}
    if executor == "ray":
        run_ray(study, todo, study.on_done, estimates=seconds, **executor_opts)
    else:
        run_local(study, todo, study.on_done, estimates=seconds, **executor_opts)
    study.prune_prefixes()
    with study_index(study.out) as store:
        counts = store.status_counts()
    print("study status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)


def study_counts(out: Path) -> dict[str, int]:
    """Runs per status in a study directory (the index brought up to date first)."""
    with study_index(out) as store:
        return store.status_counts()
