"""Results store: round trips, upserts, one-transaction updates, status bookkeeping."""

import sqlite3

import numpy as np
import pytest

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "study" / "study.db")


def add(store, order=0, **kw):
    cfg = RunConfig(**kw)
    store.add_run(cfg.hash(), f"run-{order}", cfg.to_dict(), f"runs/{cfg.hash()}", order)
    return cfg


def test_add_run_round_trip_and_order(store):
    b = add(store, order=1, regime="dpo", seed=1)
    a = add(store, order=0, seed=0)
    runs = store.runs()
    assert [r["run_hash"] for r in runs] == [a.hash(), b.hash()]
    r = runs[0]
    assert r["config"] == a.to_dict() and RunConfig.from_dict(r["config"]).hash() == a.hash()
    assert r["status"] == "pending" and r["order"] == 0 and r["name"] == "run-0"
    assert r["summary"] is None and r["env"] is None and r["error"] is None


def test_re_adding_keeps_status_and_results(store):
    cfg = add(store)
    store.set_status(cfg.hash(), "running")
    store.finish_run(cfg.hash(), {"dev/accuracy": 0.9}, {"device": "cpu"}, [("q1", "1", "1")])
    store.add_run(cfg.hash(), "renamed", cfg.to_dict(), "elsewhere", 5)
    (r,) = store.runs()
    assert r["status"] == "done" and r["summary"] == {"dev/accuracy": 0.9}
    assert r["name"] == "renamed" and r["run_dir"] == "elsewhere" and r["order"] == 5
    assert store.dev_outputs(cfg.hash()) == [("q1", "1", "1")]


def test_status_stamps_and_errors(store):
    h = add(store).hash()
    store.set_status(h, "running")
    (r,) = store.runs()
    assert r["started_at"] and r["finished_at"] is None
    store.set_status(h, "failed", "CUDA out of memory")
    (r,) = store.runs("failed")
    assert r["finished_at"] and r["error"] == "CUDA out of memory"
    store.set_status(h, "running")  # a retry clears the old failure
    (r,) = store.runs()
    assert r["error"] is None and r["finished_at"] is None
    with pytest.raises(SftdpoError, match="status"):
        store.set_status(h, "finished")
    with pytest.raises(SftdpoError, match="unknown run"):
        store.set_status("nope", "running")


def test_record_epoch_upserts(store):
    h = add(store, regime="sft-dpo", epochs=3, handoff_epoch=2).hash()
    store.record_epoch(h, "sft", 1, {"dev/accuracy": 0.5}, 10.0)
    store.record_epoch(h, "init", 0, {"dev/accuracy": 0.4}, None)
    store.record_epoch(h, "dpo", 3, {"dev/accuracy": 0.7}, 12.0)
    store.record_epoch(h, "sft", 1, {"dev/accuracy": 0.55, "train/loss": np.float32(1.5)}, 11.0)
    eps = store.epochs(h)
    assert [(e["stage"], e["epoch"]) for e in eps] == [("init", 0), ("sft", 1), ("dpo", 3)]
    assert eps[1]["metrics"] == {"dev/accuracy": 0.55, "train/loss": 1.5} and eps[1]["wall_s"] == 11.0
    assert eps[0]["wall_s"] is None
    with pytest.raises(SftdpoError):
        store.record_epoch("nope", "sft", 1, {}, 1.0)


def test_finish_run_round_trip(store):
    h = add(store, task="sonnet").hash()
    store.set_status(h, "running")
    outs = [("s2", "gen two", "true two"), ("s1", "gen\none", "true\none")]
    store.finish_run(h, {"dev/chrf": 41.2, "best_epoch": 3}, {"device": "cuda", "packages": {"torch": "2.13"}}, outs)
    (r,) = store.runs("done")
    assert r["summary"] == {"dev/chrf": 41.2, "best_epoch": 3}
    assert r["env"] == {"device": "cuda", "packages": {"torch": "2.13"}}
    assert r["finished_at"] and sorted(store.dev_outputs(h)) == sorted(outs)
    # finishing again replaces the outputs rather than mixing two evaluations
    store.finish_run(h, {"dev/chrf": 40.0}, {}, [("s1", "x", "true\none")])
    assert store.dev_outputs(h) == [("s1", "x", "true\none")]


def test_failed_finish_run_changes_nothing(store):
    h = add(store).hash()
    store.set_status(h, "running")
    store.finish_run(h, {"dev/accuracy": 0.8}, {}, [("q1", "0", "1")])
    store.set_status(h, "running")
    with pytest.raises(TypeError):
        store.finish_run(h, {"dev/accuracy": object()}, {}, [("q1", "1", "1"), ("q2", "0", "0")])
    (r,) = store.runs()
    assert r["status"] == "running"
    assert r["summary"] == {"dev/accuracy": 0.8}
    assert store.dev_outputs(h) == [("q1", "0", "1")]  # the delete and inserts were rolled back


def test_status_counts(store):
    hashes = [add(store, order=i, seed=i).hash() for i in range(4)]
    store.set_status(hashes[0], "running")
    store.set_status(hashes[1], "failed", "boom")
    store.set_status(hashes[2], "running")
    store.finish_run(hashes[2], {}, {}, [])
    assert store.status_counts() == {"pending": 1, "running": 1, "done": 1, "failed": 1}
    assert Store(store.path).status_counts() == store.status_counts()  # persisted, reopenable


def test_wal_mode(store):
    add(store)
    with sqlite3.connect(store.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
