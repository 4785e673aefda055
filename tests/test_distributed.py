"""Data parallelism (distributed.py): sharding and loss shares, and `torchrun --nproc-per-node 2`
(gloo, CPU) against one process with the same effective batch.

Tolerance: fp32, 2 ranks x batch B against 1 process x batch 2B. Losses and DPO log-probs agree to
1e-4 relative (measured: ~1e-7, float rounding: different padding widths and summation order);
DPO rewards (beta x a difference of nearly equal log-ratios) to 1e-5 absolute; dev metrics and
token counts exactly. rewards/accuracies is not compared: it counts margins > 0, and at the start
of DPO every margin is 0 up to rounding, so it flips with the rounding. Dropout is switched off in both (its masks cannot match across batch shapes).
Needs tiny-gpt2's tokenizer and the QQP data: set SFTDPO_DATA_DIR (as the other tests).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftdpo.objectives.dpo import DPOObjective
from sftdpo.objectives.dpo.pairs import label_pair_set
from sftdpo.objectives.sft import SFTObjective
from sftdpo.train import loop as training
from sftdpo.config import RunConfig, SftdpoError, find_in_data_dirs
from sftdpo.distributed import init_from_env, shard
from sftdpo.models import load_model
from sftdpo.train.loop import Run

from conftest import qqp_files

TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = dict(model="tiny-gpt2", precision="fp32", device="cpu", max_dev_examples=16, eval_batch_size=8, log_every=2)

# launched by torchrun: the CLI, with dropout off and an optional stop after an epoch's checkpoint
ENTRY = """
import os, sys
import torch
from sftdpo.train import loop as training
from sftdpo.cli import main
from sftdpo.distributed import barrier

load_model = training.load_model
def load_model_without_dropout(name, seed=0):
    model, tok = load_model(name, seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, tok
training.load_model = load_model_without_dropout

stop = int(os.environ.get("STOP_AFTER_EPOCH", "0"))
checkpoint = training.Run.checkpoint
def checkpoint_then_stop(self, state, stage, epoch, opt, sched):
    checkpoint(self, state, stage, epoch, opt, sched)
    if state.epoch == stop:
        barrier()
        raise SystemExit(3)
training.Run.checkpoint = checkpoint_then_stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def _needs_data():
    try:
        load_model("tiny-gpt2")
    except SftdpoError as e:
        pytest.skip(f"tiny-gpt2 unavailable (set SFTDPO_DATA_DIR to a folder with gpt2-tokenizer/): {e}")
    if find_in_data_dirs("qqp") is None or find_in_data_dirs("sonnets") is None:
        pytest.skip("QQP/sonnet data not found; set SFTDPO_DATA_DIR to the shared data directory")


def no_dropout(monkeypatch) -> None:
    original = training.load_model

    def load(name, seed=0):
        model, tok = original(name, seed)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model, tok

    monkeypatch.setattr(training, "load_model", load)


# -- sharding ----------------------------------------------------------------------------------

def test_shard_one_process_is_the_identity():
    batches = [[3, 1, 2], [0]]
    assert shard(batches, 0, 1) == [([3, 1, 2], 1.0), ([0], 1.0)]


def test_shard_strided_rows_shares_and_stand_in():
    batches = [[0, 1, 2, 3], [4, 5, 6], [7]]
    r0, r1 = shard(batches, 0, 2), shard(batches, 1, 2)
    assert [rows for rows, _ in r0] == [[0, 2], [4, 6], [7]]
    assert [rows for rows, _ in r1] == [[1, 3], [5], [7]]  # no row of the last batch: a stand-in
    assert [s for _, s in r0] == [0.5, 2 / 3, 1.0]
    assert [s for _, s in r1] == [0.5, 1 / 3, 0.0]
    units = [1, 1, 1, 5, 2, 2, 4, 1]  # e.g. target tokens per row
    assert [s for _, s in shard(batches, 1, 2, units)] == [6 / 8, 2 / 8, 0.0]
    assert {i for rows, s in r0 + r1 if s for i in rows} == set(range(8))  # every row once


def test_init_from_env_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == {}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() == {}


def test_world_size_without_process_group_is_refused(tmp_path):
    with pytest.raises(SftdpoError, match="torchrun"):  # QQP files written here: no data directory needed
        Run(RunConfig(task="paraphrase", **qqp_files(tmp_path, 16, 8), **COMMON), tmp_path / "r", rank=0, world_size=2)


def test_resume_with_another_world_size_is_refused(tmp_path):
    out = tmp_path / "r"
    run = Run(RunConfig(task="paraphrase", **qqp_files(tmp_path, 16, 8), **COMMON), out)
    run.write_config()
    blob = json.loads((out / "config.json").read_text())
    assert (blob["world_size"], blob["effective_batch_size"]) == (1, 8)
    blob["world_size"] = 2
    (out / "config.json").write_text(json.dumps(blob))
    (out / "checkpoints" / "last").mkdir(parents=True)  # a trained epoch to resume (an untrained directory is started over)
    (out / "checkpoints" / "last" / "training_state.pt").write_bytes(b"")
    with pytest.raises(SftdpoError, match="same number of processes"):
        run.write_config()


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("task,stage,n,bs", [("paraphrase", "sft", 11, 4), ("sonnet", "sft", 5, 2), ("paraphrase", "dpo", 9, 4)])
def test_shares_sum_to_the_global_batch_gradient(_needs_data, tmp_path, monkeypatch, task, stage, n, bs):
    """Per global batch of 2 x bs rows: the sum over 2 ranks of grad(share_r x loss_r) is grad(loss of
    the whole batch), for a last batch of 3 rows (2 + 1) and of 1 row (rank 1 a stand-in); sonnet
    SFT's loss is a mean over tokens (rows of different lengths), the others over rows."""
    no_dropout(monkeypatch)
    run = Run(RunConfig(task=task, batch_size=bs, max_train_examples=n, **COMMON), tmp_path / "r")
    run.build()
    model, t = run.model, run.task
    model.eval()
    if stage == "sft":
        obj = SFTObjective(t)
    else:
        ps = label_pair_set(t)
        g = torch.Generator().manual_seed(0)
        obj = DPOObjective(run.cfg, t, ps, -10 + torch.rand(len(ps), generator=g), -10 + torch.rand(len(ps), 1, generator=g), {})

    t.world_size = 1  # one process with batch 2 x bs: the global batches
    t.cfg.batch_size = 2 * bs
    whole = [b for step in obj.steps(1) for b in step]
    t.world_size = 2
    t.cfg.batch_size = bs
    per_rank = []
    for r in (0, 1):
        t.rank = r
        per_rank.append([b for step in obj.steps(1) for b in step])
    assert sorted(len(b.batch.index if stage == "dpo" else b.index) for b in whole) == [n - 2 * bs, 2 * bs]
    if task == "sonnet":
        assert len({len(s) for s in t.train_ids}) == n
    assert len(per_rank[0]) == len(per_rank[1]) == len(whole) == obj.n_steps()
    for i, full in enumerate(whole):
        model.zero_grad()
        obj.loss(model, full)[0].backward()
        expected = _grads(model)
        model.zero_grad()
        for r in (0, 1):
            b = per_rank[r][i]
            (obj.loss(model, b)[0] * b.share).backward()
        # fp32 sums over other padding widths and in another order: the gradients agree to float
        # rounding of their own size (norm-wise 1e-5 ~ 84 x fp32's epsilon; measured ~1e-7), not to a
        # fixed absolute step that near-zero elements of one CPU's rounding may cross
        got = _grads(model)
        assert (got - expected).norm() <= 1e-5 * expected.norm(), float((got - expected).norm() / expected.norm())


# -- torchrun: 2 gloo ranks against one process ----------------------------------------------

def _epochs_and_steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compare(single: Path, multi: Path) -> dict[str, float]:
    """Assert the two metrics.jsonl agree (see the module docstring); the largest differences."""
    a, b = _epochs_and_steps(single), _epochs_and_steps(multi)
    assert len(a) == len(b)
    worst = {"loss_rel": 0.0, "reward_abs": 0.0}
    for x, y in zip(a, b):
        assert (x["kind"], x["stage"], x["epoch"], x.get("step")) == (y["kind"], y["stage"], y["epoch"], y.get("step"))
        assert set(x) == set(y)
        for k, v in x.items():
            if k.endswith("_s") or k in ("kind", "stage", "epoch", "step"):
                continue
            w = y[k]
            if "rewards/accuracies" in k:  # share of pairs with margin > 0: at DPO's start every margin is 0 +- rounding
                assert 0 <= w <= 1
            elif k.startswith("dev/") or k in ("train_tokens", "lr"):
                assert w == pytest.approx(v, rel=1e-12, abs=1e-12), k
            elif "rewards/" in k:
                worst["reward_abs"] = max(worst["reward_abs"], abs(w - v))
                assert abs(w - v) <= 1e-5, (k, v, w)
            else:  # loss, train/loss, logps
                rel = abs(w - v) / max(abs(v), 1e-12)
                worst["loss_rel"] = max(worst["loss_rel"], rel)
                assert rel <= 1e-4, (k, v, w)
    return worst


def torchrun(tmp_path: Path, args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = {**os.environ, "SFTDPO_CACHE_DIR": str(tmp_path / "cache-ddp"), **(env_extra or {})}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(entry), "-q", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def cli_args(cfg: dict, out: Path) -> list[str]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    return [*args, f"--out={out}"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_torchrun_two_ranks_match_one_process(_needs_data, tmp_path, monkeypatch):
    """SFT (29 examples, batches of 2 x 2: the last global batch has one row, rank 1 a stand-in) and
    SFT@1->DPO (31 examples, grad-accum 2, interrupted after the SFT epoch and resumed) on paraphrase."""
    no_dropout(monkeypatch)
    runs = {
        "sft": dict(task="paraphrase", regime="sft", epochs=2, max_train_examples=29, batch_size=2, **COMMON),
        "sft-dpo": dict(task="paraphrase", regime="sft-dpo", epochs=2, handoff_epoch=1, max_train_examples=31,
                        batch_size=2, grad_accum=2, **COMMON),
    }
    worst = {}
    for name, cfg in runs.items():
        single = RunConfig(**{**cfg, "batch_size": 2 * cfg["batch_size"]})
        training.train(single, tmp_path / f"{name}-1")

        multi = tmp_path / f"{name}-2"
        if name == "sft-dpo":
            stopped = torchrun(tmp_path, cli_args(cfg, multi), {"STOP_AFTER_EPOCH": "1"})
            assert stopped.returncode != 0 and not (multi / "summary.json").exists(), stopped.stderr[-3000:]
            assert (multi / "checkpoints" / "last").exists()
        proc = torchrun(tmp_path, cli_args(cfg, multi))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(f"-> {multi}") == 1  # rank 0 alone prints the summary

        worst[name] = compare(tmp_path / f"{name}-1", multi)
        conf, summ = json.loads((multi / "config.json").read_text()), json.loads((multi / "summary.json").read_text())
        eff = cfg["batch_size"] * cfg.get("grad_accum", 1) * 2
        assert (conf["world_size"], conf["effective_batch_size"]) == (2, eff)
        assert (summ["world_size"], summ["effective_batch_size"]) == (2, eff)
        one = json.loads((tmp_path / f"{name}-1" / "summary.json").read_text())
        assert one["effective_batch_size"] == eff and one["world_size"] == 1
        assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in (tmp_path / f"{name}-1").iterdir())
        assert (multi / "predictions.csv").read_text() == (tmp_path / f"{name}-1" / "predictions.csv").read_text()
    dpo_state = json.loads((tmp_path / "sft-dpo-2" / "dpo" / "state.json").read_text())
    assert dpo_state["pairs"] == 31
    print("max differences, 2 ranks vs 1 process:", worst)
    assert all(math.isfinite(v) for w in worst.values() for v in w.values())
