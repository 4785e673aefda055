"""Whole studies from one YAML spec: grid expansion, a resumable runner, and the results store.

A spec is `defaults` (RunConfig fields) + `grid` (field -> list of values; a value may be a
mapping that sets several fields at once, e.g. `{param: lora, lora_rank: 8}`) + `overrides`
(`{when: {field: value}, set: {...}}`, applied in order) + `exclude` (partial matches dropped).
Fields that cannot matter for a run (DPO settings of an SFT-only run, decoding of a paraphrase
run, LoRA options of an FFT run, the hand-off of a non-staged run) are reset to their defaults,
so the grid never trains the same run twice; every run is identified by its config hash.

Each run trains in its own subprocess (`python -m sftdpo.study worker RUN_DIR`): a crash, an
out-of-memory kill or kill -9 takes down that run only, peak memory is the run's own, and the
run resumes from its last epoch checkpoint the next time the study runs. Only the driver writes
the SQLite store.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .config import DECODING_FIELDS, DPO_FIELDS, LORA_FIELDS, RunConfig, SftdpoError
from .store import Store

log = logging.getLogger("sftdpo")

SHIPPED_SPECS = ("quick", "paper")
_DEFAULTS = RunConfig()


# -- specs -------------------------------------------------------------------------------------

def load_spec(spec: str) -> dict:
    """A spec file path, or the name of a shipped spec."""
    if spec in SHIPPED_SPECS:
        text = importlib.resources.files("sftdpo").joinpath("specs").joinpath(f"{spec}.yaml").read_text()
        name = spec
    else:
        p = Path(spec)
        if not p.exists():
            raise SftdpoError(f"study spec {spec} not found: give a YAML file or one of {', '.join(SHIPPED_SPECS)}")
        text, name = p.read_text(), p.stem
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SftdpoError(f"study spec {spec} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise SftdpoError(f"study spec {spec} must be a mapping with defaults/grid/overrides")
    unknown = set(d) - {"name", "description", "defaults", "grid", "overrides", "exclude", "order"}
    if unknown:
        raise SftdpoError(f"study spec {spec}: unknown key(s) {', '.join(sorted(unknown))}")
    d.setdefault("name", name)
    return d


def _matches(cfg: dict, when: dict) -> bool:
    for k, v in when.items():
        want = v if isinstance(v, list) else [v]
        if cfg.get(k) not in want:
            return False
    return True


def normalise(cfg: dict) -> dict:
    """Reset fields that cannot matter for this run, so equivalent grid points hash the same."""
    out = dict(cfg)
    irrelevant: list[str] = []
    if out.get("regime", "sft") == "sft":
        irrelevant += DPO_FIELDS
    if out.get("regime") != "sft-dpo":
        irrelevant.append("handoff_epoch")
    if out.get("regime") == "dpo":
        irrelevant.append("lr")  # the SFT learning rate; a DPO-only run has no SFT stage
    if out.get("param", "fft") == "fft":
        irrelevant += LORA_FIELDS
    if out.get("task") == "paraphrase":
        irrelevant += [*DECODING_FIELDS, "pairs", "pairs_n", "pairs_top_k", "pairs_temperatures"]
    elif out.get("pairs") in ("v1",):
        irrelevant += ["pairs_n", "pairs_top_k", "pairs_temperatures"]
    if out.get("task") == "sonnet":
        irrelevant.append("balance_labels")
    if out.get("pairs") == "v2":
        irrelevant.append("pairs_top_k")
    for f in irrelevant:
        out[f] = getattr(_DEFAULTS, f)
    return out


def expand(spec: dict, overrides: dict | None = None) -> list[tuple[str, RunConfig]]:
    """(name, config) for every distinct run, in a deterministic order."""
    defaults = dict(spec.get("defaults") or {})
    grid = spec.get("grid") or {}
    axes = [(k, v if isinstance(v, list) else [v]) for k, v in grid.items()]
    runs: dict[str, tuple[str, RunConfig]] = {}
    for combo in itertools.product(*[vals for _, vals in axes]):
        cfg = dict(defaults)
        for (axis, _), value in zip(axes, combo):
            if isinstance(value, dict):
                cfg.update(value)
            else:
                cfg[axis] = value
        for ov in spec.get("overrides") or []:
            if _matches(cfg, ov.get("when") or {}):
                cfg.update(ov.get("set") or {})
        if any(_matches(cfg, ex) for ex in spec.get("exclude") or []):
            continue
        cfg.update(overrides or {})
        try:
            rc = RunConfig.from_dict(normalise(cfg)).validate()
        except (SftdpoError, TypeError) as e:
            hint = ""
            if "--handoff-epoch" in str(e) and "epochs" in (overrides or {}) and "handoff_epoch" not in (overrides or {}):
                hint = " (a shorter budget needs its hand-off too, e.g. --set epochs=2 --set handoff_epoch=1)"
            raise SftdpoError(f"study spec {spec.get('name')}: grid point {_short(cfg)} is invalid: {e}{hint}") from None
        runs.setdefault(rc.hash(), (run_name(rc), rc))
    return list(runs.values())


def _short(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if getattr(_DEFAULTS, k, object()) != v)


def run_name(c: RunConfig) -> str:
    regime = {"sft": "sft", "dpo": "dpo"}.get(c.regime) or f"sft{c.handoff_epoch}-dpo"
    param = "fft" if c.param == "fft" else f"lora{c.lora_rank}"
    parts = [c.task, regime, param]
    if c.regime != "sft" and c.task == "sonnet":
        parts.append(c.pairs)
    if c.data_fraction != 1.0:
        parts.append(f"frac{c.data_fraction:g}")
    parts += [f"s{c.seed}", c.hash()]
    return "-".join(parts)


def parse_only(filters: list[str]) -> Callable[[RunConfig], bool]:
    conds: list[tuple[str, str]] = []
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for f in filters:
        if "=" not in f:
            raise SftdpoError(f"--only {f!r}: use FIELD=VALUE (e.g. --only task=sonnet)")
        k, v = f.split("=", 1)
        k = k.replace("-", "_")
        if k not in names:
            raise SftdpoError(f"--only {f!r}: {k} is not a config field")
        conds.append((k, v))
    return lambda c: all(str(getattr(c, k)) in v.split(",") for k, v in conds)


def parse_set(items: list[str]) -> dict:
    """--set FIELD=VALUE overrides for every run (values parsed as YAML scalars)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise SftdpoError(f"--set {it!r}: use FIELD=VALUE (e.g. --set epochs=2)")
        k, v = it.split("=", 1)
        out[k.replace("-", "_")] = yaml.safe_load(v)
    return out


# -- cost estimate (dry run) -------------------------------------------------------------------

# rough sizes used only by --dry-run; a real run measures everything
_PARAMS = {"smollm2-135m": 135e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "tiny-gpt2": 3.3e6, "tiny-llama": 3.2e6}
_TRAIN_SIZE = {"paraphrase": 283_003, "sonnet": 131}
_DEV_SIZE = {"paraphrase": 40_429, "sonnet": 12}
_TOKENS = {"paraphrase": 55, "sonnet": 170}


def estimate_flops(c: RunConfig) -> float:
    n = _PARAMS.get(c.model, 124e6)
    train = min(c.max_train_examples or 10**9, _TRAIN_SIZE[c.task]) * c.data_fraction
    dev = min(c.max_dev_examples or 10**9, _DEV_SIZE[c.task])
    tok = _TOKENS[c.task]
    dpo_factor = 2 if c.task == "sonnet" else 1  # chosen + rejected rows
    train_flops = 6 * n * tok * train * (c.sft_epochs + dpo_factor * c.dpo_epochs)
    if c.task == "sonnet":  # generation: one token at a time, ~2N FLOPs each, plus rejection sampling
        gen = 2 * n * c.max_new_tokens * (dev * c.num_samples * (c.epochs + 1) + (train * c.pairs_n if c.dpo_epochs else 0))
    else:
        gen = 2 * n * tok * dev * (c.epochs + 1)
    return train_flops + gen


def format_cost(flops: float) -> str:
    # effective rates seen for small models: ~0.12 TFLOP/s on a 2-core CPU (bf16), ~60 TFLOP/s on an H100
    return f"{flops / 0.12e12 / 3600:9.1f} CPU-h {flops / 60e12 / 3600:8.2f} GPU-h"


# -- running -----------------------------------------------------------------------------------

def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(summary: dict) -> dict:
    from .training import package_versions

    return {"versions": package_versions(), "device": summary.get("device"), "precision": summary.get("precision"),
            "git_commit": git_commit(), "host_cpus": os.cpu_count()}


def read_run_results(run_dir: Path) -> tuple[dict, list[dict], list[tuple[str, str, str]]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "epoch"]
    outputs = [(o["id"], o["prediction"], o["reference"]) for o in map(json.loads, (run_dir / "dev_outputs.jsonl").read_text().splitlines())]
    return summary, epochs, outputs


def record(store: Store, run_hash: str, run_dir: Path) -> None:
    summary, epochs, outputs = read_run_results(run_dir)
    for r in epochs:
        metrics = {k: v for k, v in r.items() if k not in ("kind", "stage", "epoch")}
        store.record_epoch(run_hash, r["stage"], r["epoch"], metrics, r.get("train_s"))
    store.finish_run(run_hash, summary, environment(summary), outputs)


def worker_args(run_dir: Path, prefix_dir: Path, prefix_epochs: Iterable[int]) -> list[str]:
    """The run process's arguments (`_worker_main`), forked or started afresh."""
    return [str(run_dir), "--prefix-dir", str(prefix_dir), "--prefix-epochs", ",".join(map(str, sorted(prefix_epochs)))]


def worker_command(run_dir: Path, prefix_dir: Path, prefix_epochs: Iterable[int]) -> list[str]:
    return [sys.executable, "-m", "sftdpo.study", "worker", *worker_args(run_dir, prefix_dir, prefix_epochs)]


def execute_run(run_dir: Path, prefix_dir: Path, prefix_epochs: Iterable[int], *, fork: bool = False) -> tuple[bool, str | None]:
    """Train one run in its own process; (ok, error line). Either way a crash, an OOM kill or kill -9
    ends that run only. With `fork` (the local executor, where the OS has a fork server) the process is
    forked from a server that has torch and transformers imported already, not started afresh: ~5 s
    less per run, a minute of the quick study. (A fork server, not fork: forking a process that has
    run torch ops, e.g. a notebook or pytest, can deadlock on the locks of its thread pools.)"""
    log_path = run_dir / "train.log"
    if fork:
        err_path = run_dir / "train.err"
        proc = _fork_context().Process(
            target=_forked_worker, args=(worker_args(run_dir, prefix_dir, prefix_epochs), log_path, err_path, dict(os.environ), os.getcwd()))
        proc.start()
        proc.join()
        stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
        with log_path.open("a") as logf:
            logf.write(stderr)
        err_path.unlink(missing_ok=True)
        code = proc.exitcode if proc.exitcode is not None else 1
    else:
        with log_path.open("a") as logf:
            cp = subprocess.run(worker_command(run_dir, prefix_dir, prefix_epochs), stdout=logf, stderr=subprocess.PIPE, text=True)
            logf.write(cp.stderr)
        stderr, code = cp.stderr, cp.returncode
    if code == 0 and (run_dir / "summary.json").exists():
        return True, None
    return False, last_error_line(stderr, code)


def can_fork() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def _fork_context():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # what every run imports, imported once by the fork server (before it starts)
    ctx.set_forkserver_preload(["sftdpo.study", "sftdpo.training", "sftdpo.dpo",
                                "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2"])
    return ctx


def _forked_worker(argv: list[str], log_path: Path, err_path: Path, env: dict[str, str], cwd: str) -> None:
    """A forked run process: the study's environment and directory (not the fork server's, which
    started earlier), stdout to the run's train.log, stderr to a file the parent reads back."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import threading

    from tqdm import tqdm

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
        code = _worker_main(argv)
    except BaseException:  # noqa: BLE001  (reported like the subprocess's traceback would be)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not the parent's atexit handlers


def last_error_line(stderr: str, code: int) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("sftdpo: error:") or "Error" in ln:
            return ln.strip()[:500]
    return f"exit code {code}" + (f": {lines[-1][:400]}" if lines else "")


class Study:
    def __init__(self, spec: dict, out: Path, overrides: dict | None = None) -> None:
        self.spec, self.out = spec, Path(out)
        self.runs = expand(spec, overrides)
        self.prefix_dir = self.out / "prefixes"
        # hand-off epochs of staged runs: SFT stages export their checkpoints there to be shared
        self.prefix_epochs = {c.handoff_epoch for _, c in self.runs if c.regime == "sft-dpo"}

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def dry_run(self, runs: list[tuple[str, RunConfig]]) -> None:
        total = 0.0
        print(f"{len(runs)} runs in study {self.spec.get('name')} (estimated cost, rough):")
        for name, c in runs:
            f = estimate_flops(c)
            total += f
            print(f"  {name:60s} {format_cost(f)}")
        print(f"  {'total':60s} {format_cost(total)}")

    def prepare(self, runs: list[tuple[str, RunConfig]]) -> Store:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "spec.yaml").write_text(yaml.safe_dump(self.spec, sort_keys=False))
        store = Store(self.out / "study.db")
        for order, (name, c) in enumerate(runs):
            d = self.run_dir(name)
            d.mkdir(parents=True, exist_ok=True)
            cfg_file = d / "run.json"
            if not cfg_file.exists():
                cfg_file.write_text(json.dumps(c.to_dict(), indent=2))
            store.add_run(c.hash(), name, c.to_dict(), str(d), order)
        return store

    def pending(self, store: Store, runs: list[tuple[str, RunConfig]]) -> list[tuple[str, RunConfig]]:
        """Runs still to do; a run finished on disk but not yet in the store (driver killed in between) is recorded now."""
        status = {r["run_hash"]: r["status"] for r in store.runs()}
        todo = []
        for name, c in runs:
            h = c.hash()
            if status.get(h) == "done":
                continue
            if (self.run_dir(name) / "summary.json").exists():
                record(store, h, self.run_dir(name))
                continue
            todo.append((name, c))
        # SFT-only and staged runs first: they create the shared SFT prefixes that later runs reuse
        return sorted(todo, key=lambda nc: {"sft": 0, "sft-dpo": 1, "dpo": 2}[nc[1].regime])

    def run_local(self, store: Store, todo: list[tuple[str, RunConfig]]) -> None:
        fork = can_fork()
        for i, (name, c) in enumerate(todo, 1):
            h = c.hash()
            store.set_status(h, "running")
            t0 = time.perf_counter()
            print(f"[{i}/{len(todo)}] {name} ...", flush=True)
            ok, err = execute_run(self.run_dir(name), self.prefix_dir, self.prefix_epochs, fork=fork)
            if ok:
                try:
                    record(store, h, self.run_dir(name))
                except (OSError, ValueError, KeyError) as e:
                    ok, err = False, f"results unreadable: {e}"
            if not ok:
                store.set_status(h, "failed", err)
                print(f"[{i}/{len(todo)}] {name} FAILED: {err}", flush=True)
            else:
                print(f"[{i}/{len(todo)}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)


def run_study(spec: str | dict, out: Path | None = None, *, only: list[str] = (), overrides: dict | None = None,
              dry_run: bool = False, executor: str = "local", report: bool = True, **executor_opts: Any) -> Path:
    spec_d = load_spec(spec) if isinstance(spec, str) else spec
    out = Path(out or Path("studies") / spec_d["name"])
    study = Study(spec_d, out, overrides)
    keep = parse_only(list(only))
    runs = [(n, c) for n, c in study.runs if keep(c)]
    if not runs:
        raise SftdpoError(f"no run of study {spec_d['name']} matches --only {' '.join(only)}")
    if dry_run:
        study.dry_run(runs)
        return out
    if executor == "ray":  # fail before touching the study directory when Ray is missing
        from .ray_executor import require_ray

        require_ray()
    store = study.prepare(runs)
    try:
        todo = study.pending(store, runs)
        print(f"study {spec_d['name']}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run -> {out}", flush=True)
        if executor == "ray":
            from .ray_executor import run_ray

            run_ray(study, store, todo, **executor_opts)
        else:
            study.run_local(store, todo)
        counts = store.status_counts()
    finally:
        store.close()
    print("study status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    if report:
        from .report import write_report

        print(f"report: {write_report(out)}", flush=True)
    return out


# -- CLI ---------------------------------------------------------------------------------------

def cli_run(ns: argparse.Namespace) -> int:
    overrides = parse_set(getattr(ns, "set", []) or [])
    if ns.model:
        overrides["model"] = ns.model
    out = run_study(ns.spec, ns.out, only=ns.only, overrides=overrides, dry_run=ns.dry_run, executor=ns.executor,
                    report=not ns.no_report, address=ns.address, gpus_per_run=ns.gpus_per_run, cpus_per_run=ns.cpus_per_run)
    if ns.dry_run:
        return 0
    with Store(out / "study.db") as store:
        counts = store.status_counts()
    return 0 if counts.get("done", 0) and not counts.get("failed", 0) else (1 if not counts.get("done") else 3)


def cli_status(ns: argparse.Namespace) -> int:
    db = Path(ns.dir) / "study.db"
    if not db.exists():
        raise SftdpoError(f"{ns.dir} is not a study directory (no study.db)")
    with Store(db) as store:
        runs = store.runs()
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{ns.dir}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for r in runs:
        extra = ""
        if r["status"] == "done" and r.get("summary"):
            s = r["summary"]
            extra = " ".join(f"{k.removeprefix('dev/')}={s[k]:.4f}" for k in s if k.startswith("dev/"))
        elif r["status"] == "failed":
            extra = r.get("error") or ""
        elif r["status"] in ("running", "pending"):
            extra = _progress(Path(r["run_dir"]))
        print(f"  {r['status']:8s} {r['name']:60s} {extra}")
    return 0


def _progress(run_dir: Path) -> str:
    m = run_dir / "metrics.jsonl"
    if not m.exists():
        return ""
    epochs = [json.loads(x) for x in m.read_text().splitlines() if '"kind": "epoch"' in x]
    return f"epoch {epochs[-1]['epoch']} done" if epochs else ""


def cli_report(ns: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(Path(ns.dir)))
    return 0


def qqp_available() -> str | None:
    """None if QQP data can be had, else the one-line reason with the fix."""
    from .data import load_paraphrase_data

    try:
        load_paraphrase_data()
    except SftdpoError as e:
        return str(e)
    return None


def demo(out: str = "studies/quick") -> int:
    """The README's main job: the `quick` study on the offline default. Without QQP data it says
    so and runs the sonnet part; it fails only if nothing could run."""
    only: list[str] = []
    why = qqp_available()
    if why:
        print(f"sftdpo: paraphrase skipped: {why}", file=sys.stderr)
        only = ["task=sonnet"]
    path = run_study("quick", Path(out), only=only)
    with Store(path / "study.db") as store:
        counts = store.status_counts()
    print(f"results: {path}/study.db, report: {path}/report/report.md, runs: {path}/runs/")
    return 0 if counts.get("done") else 1


def _die_with_parent() -> None:
    """Under the Ray executor (SFTDPO_WORKER_PARENT_PID = the Ray worker's pid) the run's subprocess
    must not outlive its Ray worker: a dead or cancelled worker would leave it training unseen, and
    the next study run would start a second process on the same run directory. Linux only."""
    parent = os.environ.get("SFTDPO_WORKER_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os._exit(1)


def _test_die_hook(run_dir: Path) -> None:
    """Crash-recovery test hook: SFTDPO_TEST_DIE_AFTER_EPOCH=N kills this worker with SIGKILL right
    after it saved the checkpoint of epoch N (only runs whose directory name contains
    SFTDPO_TEST_DIE_RUN, when set); SFTDPO_TEST_DIE_PARENT=1 kills its parent process instead (under
    the Ray executor: the Ray worker, i.e. the worker dies), and this one a minute later if the
    parent-death signal has not ended it by then."""
    epoch = os.environ.get("SFTDPO_TEST_DIE_AFTER_EPOCH")
    if not epoch or os.environ.get("SFTDPO_TEST_DIE_RUN", "") not in run_dir.name:
        return
    import signal

    from . import training

    save = training.Run.save_checkpoint

    def save_then_die(self, state, opt, sched):
        save(self, state, opt, sched)
        if state.epoch == int(epoch):
            sys.stderr.flush()
            if os.environ.get("SFTDPO_TEST_DIE_PARENT") == "1":
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(60)  # under Ray the parent-death signal ends this process first (tests check)
            os.kill(os.getpid(), signal.SIGKILL)

    training.Run.save_checkpoint = save_then_die


def _worker_main(argv: list[str]) -> int:
    """Entry point of a run's subprocess."""
    from .training import train

    p = argparse.ArgumentParser(prog="python -m sftdpo.study worker")
    p.add_argument("run_dir")
    p.add_argument("--prefix-dir")
    p.add_argument("--prefix-epochs", default="")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    run_dir = Path(ns.run_dir)
    _die_with_parent()
    _test_die_hook(run_dir)
    try:
        cfg = RunConfig.from_dict(json.loads((run_dir / "run.json").read_text()))
        epochs = {int(e) for e in ns.prefix_epochs.split(",") if e}
        train(cfg, run_dir, prefix_dir=Path(ns.prefix_dir) if ns.prefix_dir else None, prefix_epochs=epochs)
    except SftdpoError as e:
        print(f"sftdpo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m sftdpo.study worker RUN_DIR [--prefix-dir DIR --prefix-epochs 1,3]")
