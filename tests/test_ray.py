"""The Ray executor: prefix scheduling, the missing-Ray error, and whole studies on a local
multi-node Ray cluster (a head without CPUs and two 1-CPU worker nodes on this machine) that must
give the local executor's results and recover a run whose Ray worker died mid-run.

The cluster tests need `pip install 'sftdpo[ray]'` and tiny-gpt2 with the shared data
(SFTDPO_DATA_DIR with gpt2-tokenizer/ and qqp/); they skip with the reason otherwise."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from sftdpo.cli import main
from sftdpo.study.ray import forwarded_env
from sftdpo.store import Store
from sftdpo.study import run_study

SPEC = {"name": "raytiny",
        "defaults": {"task": "paraphrase", "model": "tiny-gpt2", "param": "fft", "epochs": 2, "max_train_examples": 16,
                     "max_dev_examples": 8, "precision": "fp32", "device": "cpu"},
        "grid": {"regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1}]}}
SFT_RUN = "paraphrase-sft-fft-"  # the directory names of the two runs start like this
STAGED_RUN = "paraphrase-sft1-dpo-fft-"
_ENV_PREFIXES = ("SFTDPO_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
MB = 2**20


# -- no cluster needed --------------------------------------------------------------------------

def test_forwarded_env_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = forwarded_env({"SFTDPO_DATA_DIR": "data", "HF_HUB_OFFLINE": "1", "HOME": "/h", "SFTDPO_WORKER_PARENT_PID": "1"})
    assert env == {"SFTDPO_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}


def test_missing_ray_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    rc = main(["study", "run", str(spec), "--out", str(tmp_path / "study"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and "pip install 'sftdpo[ray]'" in err, err
    assert not (tmp_path / "study").exists()


# -- a local Ray cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_env():
    """SFTDPO_DATA_DIR must hold the tokenizer and QQP; one cache for the module."""
    data = os.environ.get("SFTDPO_DATA_DIR")
    if not data or not (Path(data) / "gpt2-tokenizer").is_dir() or not (Path(data) / "qqp").is_dir():
        pytest.skip("set SFTDPO_DATA_DIR to the shared data directory (gpt2-tokenizer/ and qqp/) for the Ray study tests")
    return {"SFTDPO_DATA_DIR": data}


@pytest.fixture(scope="module")
def ray_cluster(data_env):
    """Head (0 CPUs: runs must go to the workers) + two 1-CPU worker nodes on loopback. The nodes
    start without any SFTDPO_/HF_ variable, so runs see the data only through the executor's
    runtime_env."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sftdpo[ray]')")
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(_ENV_PREFIXES)}
    cluster = None
    try:
        # all nodes on this machine, at its default node address (a driver rewrites 127.0.0.1 to it)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": 100 * MB, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
        cluster.wait_for_nodes()
    except BaseException:
        if cluster is not None:
            cluster.shutdown()
        raise
    finally:
        os.environ.update(saved)
    try:
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def study_env(data_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-study")
    spec = root / "raytiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTDPO_CACHE_DIR", str(root / "cache"))
        for k in ("SFTDPO_TEST_DIE_AFTER_EPOCH", "SFTDPO_TEST_DIE_RUN", "SFTDPO_TEST_DIE_PARENT"):
            mp.delenv(k, raising=False)
        yield root, spec


@pytest.fixture(scope="module")
def local_results(study_env):
    """The reference: the same spec on the local executor."""
    root, spec = study_env
    out = run_study(str(spec), root / "local", report=False)
    res = results(out)
    assert len(res) == 2 and all(r["status"] == "done" for r in res.values())
    return res


def results(out: Path) -> dict[str, dict]:
    with Store(Path(out) / "study.db") as s:
        return {r["run_hash"]: {"name": r["name"], "status": r["status"], "error": r["error"],
                                "summary": r["summary"] or {},
                                "dev": {k: v for k, v in (r["summary"] or {}).items() if k.startswith(("dev/", "best/", "init/"))},
                                "epochs": [(e["stage"], e["epoch"], e["metrics"]) for e in s.epochs(r["run_hash"])],
                                "outputs": s.dev_outputs(r["run_hash"])}
                for r in s.runs()}


def assert_same_results(got: dict, want: dict) -> None:
    assert set(got) == set(want)  # the same run hashes
    for h, w in want.items():
        g = got[h]
        assert g["status"] == "done", (g["name"], g["error"])
        assert g["dev"] == pytest.approx(w["dev"], rel=1e-5, abs=1e-6), g["name"]
        assert g["outputs"] == w["outputs"], g["name"]
        assert [(s, e) for s, e, _ in g["epochs"]] == [(s, e) for s, e, _ in w["epochs"]]
        for (_, e, gm), (_, _, wm) in zip(g["epochs"], w["epochs"]):
            # torch's thread count differs (a Ray task of 1 CPU runs 1 thread): losses agree to float noise
            keys = [k for k in wm if k.startswith(("dev/", "train/loss"))]
            assert {k: gm[k] for k in keys} == pytest.approx({k: wm[k] for k in keys}, rel=1e-4, abs=1e-6), (g["name"], e)


def ray_run(spec: Path, out: Path, address: str) -> int:
    return main(["study", "run", str(spec), "--out", str(out), "--executor", "ray", "--address", address,
                 "--cpus-per-run", "1", "--no-report"])


def by_name(res: dict, prefix: str) -> dict:
    return next(r for r in res.values() if r["name"].startswith(prefix))


def worker_processes(run_dir_part: str) -> list[int]:
    """pids of `python -m sftdpo.train.worker` processes whose run directory contains run_dir_part."""
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sftdpo.train.worker" in cmd and any(run_dir_part.encode() in a for a in cmd):
            pids.append(int(p.name))
    return pids


def test_ray_study_equals_local(ray_cluster, study_env, local_results, capsys):
    root, spec = study_env
    out = root / "ray"
    assert ray_run(spec, out, ray_cluster) == 0
    got = results(out)
    assert_same_results(got, local_results)
    # scheduled after its prefix's producer: the staged run reused the SFT run's epoch-1 checkpoint
    assert by_name(got, STAGED_RUN)["summary"]["prefix_reused_epochs"] == 1
    # run directories written by the workers in the study directory; a second run skips everything
    assert all((out / "runs" / r["name"] / "summary.json").exists() for r in got.values())
    capsys.readouterr()
    assert ray_run(spec, out, ray_cluster) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out


def test_dead_worker_is_failed_then_resumed(ray_cluster, study_env, local_results, monkeypatch, capsys):
    root, spec = study_env
    out = root / "ray-crash"
    # the SFT run's Ray worker and its training process die right after the epoch-1 checkpoint
    monkeypatch.setenv("SFTDPO_TEST_DIE_AFTER_EPOCH", "1")
    monkeypatch.setenv("SFTDPO_TEST_DIE_RUN", SFT_RUN)
    monkeypatch.setenv("SFTDPO_TEST_DIE_PARENT", "1")
    assert ray_run(spec, out, ray_cluster) == 3  # some done, some failed
    first = results(out)
    dead = by_name(first, SFT_RUN)
    assert dead["status"] == "failed" and dead["error"], dead
    if sys.platform.startswith("linux"):  # the training process did not outlive its Ray worker
        # (it sleeps 60 s after killing the worker, unless the parent-death signal ends it; under load
        # the kernel may take a moment to deliver it and to reap the process)
        deadline = time.monotonic() + 30
        while worker_processes(str((out / "runs" / dead["name"]).resolve())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert worker_processes(str((out / "runs" / dead["name"]).resolve())) == []
    # the producer failed: the staged run was released and trained its own SFT epoch
    assert by_name(first, STAGED_RUN)["status"] == "done"
    capsys.readouterr()
    assert main(["study", "status", str(out)]) == 0
    status = capsys.readouterr().out
    line = next(ln for ln in status.splitlines() if dead["name"] in ln)
    assert "failed 1" in status and line.split()[0] == "failed" and dead["error"] in line

    for k in ("SFTDPO_TEST_DIE_AFTER_EPOCH", "SFTDPO_TEST_DIE_RUN", "SFTDPO_TEST_DIE_PARENT"):
        monkeypatch.delenv(k)
    assert ray_run(spec, out, ray_cluster) == 0
    assert "1 already done, 1 to run" in capsys.readouterr().out
    log = (out / "runs" / dead["name"] / "train.log").read_text()
    assert "after epoch 1" in log  # resumed from its last checkpoint, not from scratch
    assert_same_results(results(out), local_results)
