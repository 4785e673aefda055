"""The study's index (study_dir/study.db, SQLite): the run directories' results in one queryable file.

The run directories are the only truth (study/index.py builds this index from them and can always
rebuild it); nothing is written here that is not on disk there. Every update is one transaction,
so a crash leaves each run either before or after an update, never half-written; WAL mode lets
`sftdpo study report` read while a study is running.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .config import SftdpoError

STATUSES = ("pending", "running", "done", "failed")
MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config_json TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    ord INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    started_at TEXT,
    finished_at TEXT,
    summary_json TEXT,
    env_json TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_hash TEXT NOT NULL REFERENCES runs(run_hash),
    stage TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    wall_s REAL,
    PRIMARY KEY (run_hash, stage, epoch)
);
CREATE TABLE IF NOT EXISTS sources (
    run_hash TEXT PRIMARY KEY,
    stamp TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dev_outputs (
    run_hash TEXT NOT NULL REFERENCES runs(run_hash),
    example_id TEXT NOT NULL,
    prediction TEXT NOT NULL,
    reference TEXT NOT NULL,
    PRIMARY KEY (run_hash, example_id)
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(o: Any) -> Any:
    # numpy / torch scalars reach summaries from metric code; anything else is a bug upstream
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


class Store:
    """SQLite store of runs, per-epoch metrics and per-example dev outputs."""

    def __init__(self, path: str | Path, *, copy_of: str | Path | None = None):
        """The store in database file `path`, or MEMORY: in memory, a copy of database file `copy_of`
        if given (read without changing anything there: for a study directory this process cannot write)."""
        self.path = Path(path)
        if str(path) != MEMORY:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # one long-lived connection: closing the last one checkpoints the WAL, which costs an fsync
        self._con = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        try:  # a file that is not a database fails here (sqlite3.DatabaseError): the caller rebuilds it
            if copy_of is not None:
                # immutable: no lock, no -shm file, nothing written (commits still in a WAL are not
                # seen: those runs' stamps differ, and the index reads them again)
                src = sqlite3.connect(f"file:{quote(str(Path(copy_of).resolve()))}?immutable=1", uri=True)
                try:
                    src.backup(self._con)
                finally:
                    src.close()
            self._setup()
            with self._tx() as con:  # executescript would COMMIT implicitly; run statements in our transaction
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
        except BaseException:
            self._con.close()
            raise

    # -- connection handling -------------------------------------------------------------------
    def _setup(self) -> None:
        # autocommit mode (isolation_level=None): transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in _tx
        con = self._con
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: each commit is still atomic and survives a process crash; only an OS crash
        # or power loss can drop the last commits (the run is then simply redone)
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        with self._lock:
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._con.execute(sql, args).fetchall()

    @staticmethod
    def _require(con: sqlite3.Connection, run_hash: str) -> None:
        if con.execute("SELECT 1 FROM runs WHERE run_hash = ?", (run_hash,)).fetchone() is None:
            raise SftdpoError(f"store: unknown run {run_hash!r}")

    # -- writes --------------------------------------------------------------------------------
    def add_run(self, run_hash: str, name: str, config: dict, run_dir: str, order: int) -> None:
        """Register a run as pending; re-adding keeps its status and results (resumable studies)
        but refreshes name, directory and order from the current spec."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO runs (run_hash, name, config_json, run_dir, ord, status) VALUES (?, ?, ?, ?, ?, 'pending') "
                "ON CONFLICT(run_hash) DO UPDATE SET name = excluded.name, run_dir = excluded.run_dir, ord = excluded.ord",
                (run_hash, name, _dumps(config), str(run_dir), int(order)))

    def set_status(self, run_hash: str, status: str, error: str | None = None) -> None:
        """Move a run to a status; 'running' stamps started_at (and clears a previous error and
        finish time), 'done'/'failed' stamp finished_at."""
        if status not in STATUSES:
            raise SftdpoError(f"store: status {status!r} is not one of {', '.join(STATUSES)}")
        with self._tx() as con:
            self._require(con, run_hash)
            if status == "running":
                con.execute("UPDATE runs SET status = ?, error = NULL, started_at = ?, finished_at = NULL "
                            "WHERE run_hash = ?", (status, _now(), run_hash))
            elif status in ("done", "failed"):
                con.execute("UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE run_hash = ?",
                            (status, error, _now(), run_hash))
            else:
                con.execute("UPDATE runs SET status = ?, error = ? WHERE run_hash = ?", (status, error, run_hash))

    def record_epoch(self, run_hash: str, stage: str, epoch: int, metrics: dict, wall_s: float | None) -> None:
        """Upsert one epoch's metrics; epoch counts across the whole run (0 = before training)."""
        with self._tx() as con:
            self._require(con, run_hash)
            con.execute(
                "INSERT INTO epochs (run_hash, stage, epoch, metrics_json, wall_s) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(run_hash, stage, epoch) DO UPDATE SET metrics_json = excluded.metrics_json, "
                "wall_s = excluded.wall_s",
                (run_hash, stage, int(epoch), _dumps(metrics), None if wall_s is None else float(wall_s)))

    def finish_run(self, run_hash: str, summary: dict, env: dict,
                   dev_outputs: list[tuple[str, str, str]]) -> None:
        """Store a finished run's dev outputs, summary and environment and mark it done, all in
        one transaction: if anything fails (e.g. an unserialisable summary) nothing changes."""
        with self._tx() as con:
            self._require(con, run_hash)
            con.execute("DELETE FROM dev_outputs WHERE run_hash = ?", (run_hash,))
            con.executemany(
                "INSERT INTO dev_outputs (run_hash, example_id, prediction, reference) VALUES (?, ?, ?, ?)",
                [(run_hash, str(i), str(p), str(r)) for i, p, r in dev_outputs])
            # serialised after the inserts on purpose: a bad summary must roll those back too
            con.execute("UPDATE runs SET summary_json = ?, env_json = ?, status = 'done', error = NULL, "
                        "finished_at = ? WHERE run_hash = ?", (_dumps(summary), _dumps(env), _now(), run_hash))

    def index_run(self, run_hash: str, *, name: str, config: dict, run_dir: str, order: int, status: str,
                  error: str | None, started_at: str | None, finished_at: str | None, summary: dict | None,
                  env: dict | None, epochs: list[tuple[str, int, dict, float | None]],
                  outputs: list[tuple[str, str, str]], stamp: str) -> None:
        """Replace everything known of a run by what its directory holds now, in one transaction."""
        if status not in STATUSES:
            raise SftdpoError(f"store: status {status!r} is not one of {', '.join(STATUSES)}")
        with self._tx() as con:
            for table in ("epochs", "dev_outputs"):
                con.execute(f"DELETE FROM {table} WHERE run_hash = ?", (run_hash,))  # noqa: S608 - fixed names
            con.execute(
                "INSERT INTO runs (run_hash, name, config_json, run_dir, ord, status, error, started_at, finished_at, "
                "summary_json, env_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_hash) DO UPDATE SET "
                "name = excluded.name, config_json = excluded.config_json, run_dir = excluded.run_dir, ord = excluded.ord, "
                "status = excluded.status, error = excluded.error, started_at = excluded.started_at, "
                "finished_at = excluded.finished_at, summary_json = excluded.summary_json, env_json = excluded.env_json",
                (run_hash, name, _dumps(config), run_dir, int(order), status, error, started_at, finished_at,
                 None if summary is None else _dumps(summary), None if env is None else _dumps(env)))
            con.executemany("INSERT OR REPLACE INTO epochs (run_hash, stage, epoch, metrics_json, wall_s) VALUES (?, ?, ?, ?, ?)",
                            [(run_hash, st, int(ep), _dumps(m), None if w is None else float(w)) for st, ep, m, w in epochs])
            con.executemany("INSERT INTO dev_outputs (run_hash, example_id, prediction, reference) VALUES (?, ?, ?, ?)",
                            [(run_hash, str(i), str(p), str(r)) for i, p, r in outputs])
            con.execute("INSERT OR REPLACE INTO sources (run_hash, stamp) VALUES (?, ?)", (run_hash, stamp))

    def stamps(self) -> dict[str, str]:
        """run hash -> the stamp of the run directory's files when the run was last indexed."""
        return {r[0]: r[1] for r in self._read("SELECT run_hash, stamp FROM sources")}

    def run_hashes(self) -> list[str]:
        return [r[0] for r in self._read("SELECT run_hash FROM runs")]

    def remove_runs(self, run_hashes: list[str]) -> None:
        with self._tx() as con:
            for h in run_hashes:
                for table in ("epochs", "dev_outputs", "sources", "runs"):
                    con.execute(f"DELETE FROM {table} WHERE run_hash = ?", (h,))  # noqa: S608 - fixed names

    # -- reads ---------------------------------------------------------------------------------
    def runs(self, status: str | None = None) -> list[dict]:
        """Runs in study order, with config/summary/env parsed (None when not yet recorded)."""
        sql = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY ord, run_hash"
        out = []
        for row in self._read(sql, (status,) if status else ()):
            out.append({
                "run_hash": row["run_hash"], "name": row["name"], "config": _loads(row["config_json"]),
                "run_dir": row["run_dir"], "order": row["ord"], "status": row["status"], "error": row["error"],
                "started_at": row["started_at"], "finished_at": row["finished_at"],
                "summary": _loads(row["summary_json"]), "env": _loads(row["env_json"]),
            })
        return out

    def epochs(self, run_hash: str) -> list[dict]:
        """Per-epoch rows in training order (epoch 0 'init' first)."""
        rows = self._read("SELECT * FROM epochs WHERE run_hash = ? ORDER BY epoch, stage", (run_hash,))
        return [{"run_hash": r["run_hash"], "stage": r["stage"], "epoch": r["epoch"],
                 "metrics": json.loads(r["metrics_json"]), "wall_s": r["wall_s"]} for r in rows]

    def dev_outputs(self, run_hash: str) -> list[tuple[str, str, str]]:
        rows = self._read("SELECT example_id, prediction, reference FROM dev_outputs WHERE run_hash = ? "
                          "ORDER BY example_id", (run_hash,))
        return [(r[0], r[1], r[2]) for r in rows]

    def status_counts(self) -> dict[str, int]:
        """Runs per status, every known status present (0 when none)."""
        counts = {s: 0 for s in STATUSES}
        for status, n in self._read("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            counts[status] = n
        return counts
