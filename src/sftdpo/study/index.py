"""A study directory on disk, and its index.

The run directories are the truth: `runs/<name>/run.json` (the run's name, order and config, written
when the study is prepared) and the files the run writes (config.json, metrics.jsonl, summary.json,
dev_outputs.jsonl), plus `failed.json` when its last attempt failed. `study.json` lists every run
the study's invocations prepared, so a run whose directory was deleted is still a run of the study:
pending, trained again by the next `study run`. A run's status follows from its files: done
(summary.json and the results it vouches for, readable), running (its directory's lock is held),
failed (failed.json, or a damaged result: the next `study run` redoes it), else pending.

`study.db` is an index built from them (`study_index`): only runs whose files changed since the
last indexing are read again. It is never the only copy of anything: a damaged one is rebuilt, and
a study directory this process cannot write (a shared results folder) is indexed in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import RunConfig
from ..files import DamagedFile, lock_holder, read_json, writable, write_json_atomic
from ..store import MEMORY, Store
from ..train.rundir import Results, RunDir

log = logging.getLogger("sftdpo")
RUN_FILE = "run.json"
FAILED_FILE = "failed.json"
INDEX_FILE = "study.db"
MANIFEST_FILE = "study.json"

_said: set[str] = set()


def _warn(message: object) -> None:
    """A damaged file said once per process (the index is brought up to date many times in a study run)."""
    if str(message) not in _said:
        _said.add(str(message))
        log.warning("%s", message)


def write_run_file(run_dir: Path, name: str, order: int, cfg: RunConfig,
                   estimate: tuple[float, bool] | None = None) -> dict:
    """The run's entry in the study: written when the study is prepared (order and estimate refreshed
    each time; a damaged one rewritten). `estimate`: (seconds on this machine, from measured rates or
    not), kept beside the run's actual time for `study status`. Returns the entry."""
    info: dict[str, Any] = {"name": name, "order": order, "hash": cfg.hash(), "config": cfg.to_dict()}
    if estimate is not None:
        info["estimated_s"], info["estimate_measured"] = round(estimate[0], 1), estimate[1]
    path = run_dir / RUN_FILE
    try:
        same = read_json(path, "") == info
    except (OSError, DamagedFile):
        same = False
    if not same:
        write_json_atomic(path, info)
    return info


def read_run_file(run_dir: Path) -> dict:
    """A run's entry (run.json); DamagedFile when unreadable, FileNotFoundError when absent."""
    info = read_json(run_dir / RUN_FILE, "run the study again to rewrite it")
    if not isinstance(info, dict) or not {"name", "order", "hash", "config"} <= set(info):
        raise DamagedFile(run_dir / RUN_FILE, "not a run entry", "run the study again to rewrite it")
    return info


# -- the study's list of runs -------------------------------------------------------------------

def read_manifest(study_dir: Path) -> dict[str, dict]:
    """{run name: entry} of every run the study's invocations prepared (study.json); {} when there is
    none yet (a study from before it existed) or it is damaged (said in one line: the run
    directories then stand for it, and the next `study run` rewrites it)."""
    path = Path(study_dir) / MANIFEST_FILE
    try:
        runs = read_json(path, "the run directories stand for it until `study run` rewrites it")["runs"]
        return {r["name"]: r for r in runs}
    except FileNotFoundError:
        return {}
    except DamagedFile as e:
        _warn(e)
    except (KeyError, TypeError):
        _warn(f"{path} is damaged (not a list of runs): the run directories stand for it until `study run` rewrites it")
    return {}


def write_manifest(study_dir: Path, entries: list[dict]) -> None:
    """Add `entries` (run.json contents) to study.json; the runs of earlier invocations stay (a
    damaged study.json is rebuilt from the run directories)."""
    runs = read_manifest(study_dir)
    for run_dir in run_dirs(study_dir):
        with contextlib.suppress(OSError, DamagedFile):
            runs.setdefault(run_dir.name, read_run_file(run_dir))
    for e in entries:
        runs[e["name"]] = e
    write_json_atomic(Path(study_dir) / MANIFEST_FILE,
                      {"runs": sorted(runs.values(), key=lambda r: (r["order"], r["name"]))})


def run_dirs(study_dir: Path) -> list[Path]:
    """The run directories of a study (those with a run entry, readable or not)."""
    return sorted(f.parent for f in (Path(study_dir) / "runs").glob(f"*/{RUN_FILE}"))


def study_runs(study_dir: Path) -> dict[str, dict]:
    """{run name: entry} of every run of the study: the run directories' entries, and the entries of
    study.json for runs whose directory is gone (or whose run.json is damaged)."""
    runs = read_manifest(study_dir)
    for run_dir in run_dirs(study_dir):
        try:
            runs[run_dir.name] = read_run_file(run_dir)
        except DamagedFile as e:
            _warn(f"{e}; its entry in study.json stands in" if run_dir.name in runs
                  else f"{e}; that run is left out until then")
    return runs


# -- a run's status and results -----------------------------------------------------------------

def run_status(run_dir: Path) -> tuple[str, str | None]:
    """(status, error) of a run from its directory, without reading its results (index_run does:
    a damaged result makes a finished run failed)."""
    if (run_dir / "summary.json").exists():
        return "done", None
    if lock_holder(run_dir):
        return "running", None
    failed = run_dir / FAILED_FILE
    if failed.exists():
        try:
            return "failed", read_json(failed, "")["error"] or "failed (no error recorded)"
        except (OSError, DamagedFile, KeyError, TypeError):
            return "failed", "failed (unreadable failed.json)"
    if not run_dir.exists():
        return "pending", "its directory is missing: `study run` trains it again"
    return "pending", None


def record_failure(run_dir: Path, error: str | None) -> None:
    write_json_atomic(run_dir / FAILED_FILE, {"error": error, "at": _now()})


def clear_failure(run_dir: Path) -> None:
    (run_dir / FAILED_FILE).unlink(missing_ok=True)


def epoch_records(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl (RunDir.epoch_records)."""
    return RunDir(run_dir).epoch_records()


def run_results(run_dir: Path) -> Results:
    """(summary, environment, epochs, dev outputs) of a finished run (RunDir.results); DamagedFile if a
    file they come from is damaged."""
    return RunDir(run_dir).results()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _mtime(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(st.st_mtime))


_STAMPED = (RUN_FILE, "summary.json", FAILED_FILE, "metrics.jsonl", "config.json", "dev_outputs.jsonl")


def _stamp(run_dir: Path, status: str) -> str:
    parts: list[Any] = [status, str(run_dir)]  # a moved study directory is indexed again
    for name in _STAMPED:
        try:
            st = (run_dir / name).stat()
            parts.append((st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append(None)
    return repr(parts)


def index_run(store: Store, run_dir: Path, info: dict | None = None, stamps: dict[str, str] | None = None) -> str:
    """Bring the index entry of one run up to date with its directory (`info`: its entry, when run.json
    is not to be read; `stamps`: store.stamps(), when known); returns its hash."""
    info = info if info is not None else read_run_file(run_dir)
    status, error = run_status(run_dir)
    stamp = _stamp(run_dir, status)
    h = info["hash"]
    if (stamps if stamps is not None else store.stamps()).get(h) == stamp:
        return h
    summary = env = None
    epochs: list[tuple[str, int, dict, float | None]] = []
    outputs: list[tuple[str, str, str]] = []
    if status == "done":
        try:
            summary, env, epochs, outputs = run_results(run_dir)
        except DamagedFile as e:
            status, error, summary, env, epochs, outputs = "failed", str(e), None, None, [], []
    try:
        started = read_json(run_dir / "config.json", "").get("created")
    except (OSError, DamagedFile, AttributeError):
        started = None
    finished = _mtime(run_dir / ("summary.json" if status == "done" else FAILED_FILE)) if status in ("done", "failed") else None
    store.index_run(h, name=info["name"], config=info["config"], run_dir=str(run_dir), order=info["order"],
                    status=status, error=error, started_at=started, finished_at=finished, summary=summary, env=env,
                    epochs=epochs, outputs=outputs, stamp=stamp)
    return h


# -- the index ------------------------------------------------------------------------------------

def index_study(store: Store, study_dir: Path) -> None:
    """Bring `store` up to date with the study's runs (study_runs): a run directory's files, or
    pending for a run whose directory is gone; runs no longer in the study leave the index."""
    seen = set()
    stamps = store.stamps()
    for name, info in study_runs(study_dir).items():
        seen.add(index_run(store, Path(study_dir) / "runs" / name, info, stamps))
    store.remove_runs(sorted(set(store.run_hashes()) - seen))


@contextlib.contextmanager
def study_index(study_dir: Path, run: str | None = None) -> Iterator[Store]:
    """The study's index (study.db) brought up to date with its run directories (`run`: that run's
    only, when the others are known to be indexed). A damaged study.db is rebuilt from them, said in
    one line. Where it cannot be written (a study directory this process cannot write, a shared
    results folder; a full disk) it is indexed in memory, from a copy of study.db, also said in one
    line, and nothing in the study directory changes."""
    study_dir = Path(study_dir)
    db = study_dir / INDEX_FILE

    def update(store: Store) -> None:
        if run is None:
            index_study(store, study_dir)
        else:
            run_dir = study_dir / "runs" / run
            try:
                info = read_run_file(run_dir)
            except (OSError, DamagedFile):
                info = read_manifest(study_dir)[run]
            index_run(store, run_dir, info)

    if writable(study_dir) and (not db.exists() or os.access(db, os.W_OK)):
        try:
            store = _open_indexed(db, study_dir, update)
        except sqlite3.OperationalError as e:  # the disk is full, a file-size limit
            log.warning("could not update %s (%s): the index is built in memory for this command", db, e)
            store = _in_memory(db, study_dir)
    else:
        log.info("%s is not writable: its index is built in memory (nothing there is changed)", study_dir)
        store = _in_memory(db, study_dir)
    try:
        yield store
    finally:
        store.close()


def _open_indexed(db: Path, study_dir: Path, update: Callable[[Store], None]) -> Store:
    """Store(db) brought up to date by `update`; a database SQLite cannot read is removed and built
    again from the run directories."""
    try:
        return _indexed(Store(db), update)
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):  # locked, disk full: not damage
            raise
        log.warning("%s is damaged (%s): rebuilt from the run directories", db, e)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return _indexed(Store(db), lambda store: index_study(store, study_dir))


def _in_memory(db: Path, study_dir: Path) -> Store:
    """The index in memory: a copy of study.db (if it can be read) brought up to date."""
    update = lambda store: index_study(store, study_dir)  # noqa: E731
    try:
        return _indexed(Store(MEMORY, copy_of=db if db.is_file() and os.access(db, os.R_OK) else None), update)
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):
            raise
        log.warning("%s is damaged (%s): the index is built from the run directories alone", db, e)
    return _indexed(Store(MEMORY), update)


def _indexed(store: Store, update: Callable[[Store], None]) -> Store:
    try:
        update(store)
    except BaseException:
        store.close()
        raise
    return store
