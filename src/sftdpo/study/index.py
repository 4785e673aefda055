"""A study directory on disk, and its index.

The run directories are the truth: `runs/<name>/run.json` (the run's name, order and config, written
when the study is prepared) and the files the run writes (config.json, metrics.jsonl, summary.json,
dev_outputs.jsonl), plus `failed.json` when its last attempt failed. A run's status follows from
them: done (summary.json), running (its directory's lock is held), failed (failed.json), else
pending. `study.db` is an index built from them (`index_study`): only runs whose files changed since
the last indexing are read again, and a deleted run directory leaves the index.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..files import lock_holder, write_json_atomic
from ..store import Store

RUN_FILE = "run.json"
FAILED_FILE = "failed.json"
INDEX_FILE = "study.db"


def write_run_file(run_dir: Path, name: str, order: int, cfg: RunConfig,
                   estimate: tuple[float, bool] | None = None) -> None:
    """The run's entry in the study: written when the study is prepared (order and estimate refreshed
    each time). `estimate`: (seconds on this machine, from measured rates or not), kept beside the
    run's actual time for `study status`."""
    info = {"name": name, "order": order, "hash": cfg.hash(), "config": cfg.to_dict()}
    if estimate is not None:
        info["estimated_s"], info["estimate_measured"] = round(estimate[0], 1), estimate[1]
    path = run_dir / RUN_FILE
    if not path.exists() or json.loads(path.read_text()) != info:
        write_json_atomic(path, info)


def read_run_file(run_dir: Path) -> dict:
    return json.loads((run_dir / RUN_FILE).read_text())


def run_status(run_dir: Path) -> tuple[str, str | None]:
    """(status, error) of a run from its directory."""
    if (run_dir / "summary.json").exists():
        return "done", None
    if lock_holder(run_dir):
        return "running", None
    failed = run_dir / FAILED_FILE
    if failed.exists():
        try:
            return "failed", json.loads(failed.read_text()).get("error") or "failed (no error recorded)"
        except (OSError, ValueError):
            return "failed", "failed (unreadable failed.json)"
    return "pending", None


def record_failure(run_dir: Path, error: str | None) -> None:
    write_json_atomic(run_dir / FAILED_FILE, {"error": error, "at": _now()})


def clear_failure(run_dir: Path) -> None:
    (run_dir / FAILED_FILE).unlink(missing_ok=True)


def epoch_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "epoch"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _mtime(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(st.st_mtime))


def _stamp(run_dir: Path, status: str) -> str:
    parts: list[Any] = [status]
    for name in (RUN_FILE, "summary.json", FAILED_FILE, "metrics.jsonl"):
        try:
            st = (run_dir / name).stat()
            parts.append((st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append(None)
    return json.dumps(parts)


def _environment(run_dir: Path, summary: dict) -> dict:
    conf = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    return {"versions": conf.get("versions", {}), "device": summary.get("device"), "precision": summary.get("precision"),
            "git_commit": conf.get("git_commit")}


def index_run(store: Store, run_dir: Path) -> str:
    """Bring the index entry of one run up to date with its directory; returns its hash."""
    info = read_run_file(run_dir)
    status, error = run_status(run_dir)
    stamp = _stamp(run_dir, status)
    h = info["hash"]
    if store.stamps().get(h) == stamp:
        return h
    summary = env = None
    epochs: list[tuple[str, int, dict, float | None]] = []
    outputs: list[tuple[str, str, str]] = []
    if status == "done":
        summary = json.loads((run_dir / "summary.json").read_text())
        env = _environment(run_dir, summary)
        for r in epoch_records(run_dir):
            metrics = {k: v for k, v in r.items() if k not in ("kind", "stage", "epoch")}
            epochs.append((r["stage"], r["epoch"], metrics, r.get("train_s")))
        outputs = [(o["id"], o["prediction"], o["reference"])
                   for o in map(json.loads, (run_dir / "dev_outputs.jsonl").read_text().splitlines())]
    conf = run_dir / "config.json"
    started = json.loads(conf.read_text()).get("created") if conf.exists() else None
    finished = _mtime(run_dir / ("summary.json" if status == "done" else FAILED_FILE)) if status in ("done", "failed") else None
    store.index_run(h, name=info["name"], config=info["config"], run_dir=str(run_dir), order=info["order"],
                    status=status, error=error, started_at=started, finished_at=finished, summary=summary, env=env,
                    epochs=epochs, outputs=outputs, stamp=stamp)
    return h


def index_study(study_dir: Path) -> Path:
    """Bring `study_dir/study.db` up to date with the run directories; returns its path."""
    study_dir = Path(study_dir)
    db = study_dir / INDEX_FILE
    with Store(db) as store:
        seen = {index_run(store, f.parent) for f in sorted((study_dir / "runs").glob(f"*/{RUN_FILE}"))}
        store.remove_runs(sorted({r["run_hash"] for r in store.runs()} - seen))
    return db
