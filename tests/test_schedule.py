"""Running a study's runs side by side (study/schedule.py, `--jobs N`) and estimating them
(study/rates.py, study/cost.py): prefix producers first, capacity, ETA, measured rates."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from sftdpo.cli import main
from sftdpo.config import RunConfig
from sftdpo.data import load_task_data, subsample
from sftdpo.store import Store
from sftdpo.study import expand, run_study
from sftdpo.study import rates as rates_mod
from sftdpo.study.cost import data_sizes, estimate_flops, estimate_seconds, flop_seconds, study_flops, study_seconds
from sftdpo.system import format_duration
from sftdpo.study.local import gpu_slots, threads_per_run
from sftdpo.study.rates import Rates, length_groups, padding_factor, rate_key, study_rates
from sftdpo.study.schedule import Progress, after_failure, calibrated_eta, dispatch, plan_prefix_waits

from conftest import qqp_files


def test_prefix_producers_go_first():
    spec = {"name": "p", "defaults": {"epochs": 3, "model": "tiny-gpt2"},
            "grid": {"regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1},
                                {"regime": "sft-dpo", "handoff_epoch": 2}, {"regime": "dpo"}],
                     "param": [{"param": "fft"}, {"param": "lora", "lora_rank": 4}],
                     "beta": [0.1, 0.5]}}
    runs = expand(spec)
    by = {(c.regime, c.handoff_epoch, c.param, c.beta): n for n, c in runs}
    waits = plan_prefix_waits(runs)
    for p in ("fft", "lora"):
        producer = by[("sft", None, p, 0.1)]  # beta is reset for SFT-only runs
        for h in (1, 2):
            for b in (0.1, 0.5):
                assert waits[by[("sft-dpo", h, p, b)]] == producer
    assert not any(c.regime in ("sft", "dpo") and n in waits for n, c in runs)
    # without the SFT-only run the staged run with the latest hand-off produces the prefix
    staged = [(n, c) for n, c in runs if c.regime == "sft-dpo" and c.param == "fft"]
    waits = plan_prefix_waits(staged)
    producer = next(n for n, c in staged if c.handoff_epoch == 2)
    assert set(waits.values()) == {producer} and len(waits) == 3
    # that producer fails: the next-longest staged run produces the prefix, the others wait for it
    after_failure(waits, producer, [nc for nc in staged if nc[0] != producer])
    producer2 = next(n for n, c in staged if c.handoff_epoch == 2 and n != producer)
    assert waits == {n: producer2 for n, c in staged if c.handoff_epoch == 1}
    # the SFT-only run finished in an earlier study run: its prefixes are on disk, nobody waits
    done = [c for _, c in runs if c.regime == "sft"]
    assert plan_prefix_waits([nc for nc in runs if nc[1].regime != "sft"], done) == {}



class FakeExecutor:
    """Runs finish when `wait_any` is called, the most recently started first (the order a real
    executor could pick that is hardest on the waits); records how many ran at once."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.inflight: list[str] = []
        self.started: list[str] = []
        self.finished: list[str] = []
        self.most = 0
        self.fail = fail

    def submit(self, name: str) -> str:
        self.inflight.append(name)
        self.started.append(name)
        self.most = max(self.most, len(self.inflight))
        return name

    def wait_any(self, handles: list[str]) -> list[str]:
        name = self.inflight.pop()
        self.finished.append(name)
        return [name]

    def result(self, name: str) -> tuple[bool, str | None]:
        return (False, "boom") if name in self.fail else (True, None)


def _dispatch(todo, ex: FakeExecutor, capacity: int, capsys) -> None:
    waits = plan_prefix_waits(todo)
    dispatch(todo, waits, submit=ex.submit, wait_any=ex.wait_any, result=ex.result, on_done=lambda n, ok, e: (ok, e),
             progress=Progress(todo, {}, capacity), capacity=capacity)
    capsys.readouterr()


def _grid():
    spec = {"name": "g", "defaults": {"epochs": 3, "model": "tiny-gpt2"},
            "grid": {"regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1},
                                {"regime": "sft-dpo", "handoff_epoch": 2}, {"regime": "dpo"}],
                     "param": [{"param": "fft"}, {"param": "lora", "lora_rank": 4}]}}
    runs = expand(spec)
    order = {"sft": 0, "sft-dpo": 1, "dpo": 2}  # StudyDir.pending's order
    return sorted(runs, key=lambda nc: order[nc[1].regime])


def test_dispatch_runs_n_at_once_and_never_before_the_prefix_producer(capsys):
    todo = _grid()
    ex = FakeExecutor()
    _dispatch(todo, ex, 3, capsys)
    assert sorted(ex.finished) == sorted(n for n, _ in todo) and ex.most == 3
    waits = plan_prefix_waits(todo)
    for waiter, producer in waits.items():  # a staged run starts only after its SFT-only run finished
        assert ex.finished.index(producer) < ex.started.index(waiter)
    ex1 = FakeExecutor()
    _dispatch(todo, ex1, 1, capsys)
    assert ex1.most == 1 and ex1.started == ex1.finished


def test_a_failed_producer_hands_the_prefix_to_one_waiting_run(capsys):
    todo = [nc for nc in _grid() if nc[1].param == "fft" and nc[1].regime != "dpo"]
    producer = next(n for n, c in todo if c.regime == "sft")
    ex = FakeExecutor(fail={producer})
    _dispatch(todo, ex, 3, capsys)
    late = next(n for n, c in todo if c.handoff_epoch == 2)  # the longest SFT stage takes over
    early = next(n for n, c in todo if c.handoff_epoch == 1)
    assert ex.finished.index(late) < ex.started.index(early)


def test_eta_scales_the_estimates_by_what_finished_runs_took():
    assert calibrated_eta([("done", 10.0, 20.0), ("pending", 30.0, None), ("running", 5.0, None)]) == (
        pytest.approx(70.0), "the estimates x 2.00, actual/estimated of 1 finished run(s)")
    assert calibrated_eta([("pending", 30.0, None)])[0] == 30.0
    assert calibrated_eta([("pending", None, None)]) is None and calibrated_eta([("done", 1.0, 1.0)]) is None


def test_threads_and_gpu_slots_share_the_machine():
    assert threads_per_run(1) is None and threads_per_run(2, cpus=2) == 1 and threads_per_run(4, cpus=16) == 4
    assert threads_per_run(3, cpus=2) == 1
    assert gpu_slots(0.25, 2) == ["0", "1"] * 4 and gpu_slots(1.0, 1) == ["0"]
    with pytest.raises(Exception, match="has none"):
        gpu_slots(0.5, 0)
    with pytest.raises(Exception, match="0 < F <= 1"):
        gpu_slots(2, 4)


RATES = Rates(load_s=5.0, sft_s=0.1, eval_s=0.02, dpo_prep_s=0.3, dpo_s=0.2, n_train=1000, n_dev=400, source="test")


def test_estimate_counts_every_stage_once_and_shared_work_once():
    c = RunConfig(regime="sft-dpo", epochs=3, handoff_epoch=1, max_train_examples=100, max_dev_examples=50).validate()
    # load + 1 SFT epoch + DPO preparation + 2 DPO epochs + 4 evaluations (untrained model included)
    assert estimate_seconds(c, RATES) == pytest.approx(5 + 100 * 0.1 + 100 * (0.3 + 2 * 0.2) + 4 * 50 * 0.02)
    assert estimate_seconds(c, RATES, reused_sft_epochs=1, init_eval=False) == pytest.approx(5 + 100 * 0.7 + 2 * 50 * 0.02)
    sft = RunConfig(regime="sft", epochs=3, max_train_examples=100, max_dev_examples=50).validate()
    whole = RunConfig(regime="sft", epochs=3).validate()  # the data's size when no cut is set
    assert estimate_seconds(whole, RATES) == pytest.approx(5 + 1000 * 3 * 0.1 + 4 * 400 * 0.02)
    table = {rate_key(c): RATES}
    got = study_seconds([sft, c], table)
    # the staged run reuses the SFT-only run's first epoch and its untrained evaluation
    assert got == [pytest.approx(estimate_seconds(sft, RATES)), pytest.approx(estimate_seconds(c, RATES, 1, False))]
    assert study_seconds([c], {}) == [None]


def test_flop_fallback_counts_the_data_the_run_reads(cache, tmp_path, capsys):
    """Without measured rates the FLOP count uses the real sizes of a run's data (own tasks, --train
    files), not a table's guess; measured rates bring their own sizes; the paper's tasks on their
    default data assume the CS224N splits."""
    def own(n: int) -> RunConfig:
        rows = [json.dumps({"prompt": f"Count from {i}:", "completion": f" {i + 1} {i + 2}"}) for i in range(n + 3)]
        (tmp_path / f"train{n}.jsonl").write_text("\n".join(rows[:n]) + "\n")
        (tmp_path / "dev.jsonl").write_text("\n".join(rows[n:]) + "\n")
        return RunConfig(task="generate", model="tiny-llama", regime="sft", epochs=1, max_new_tokens=4,
                         train=str(tmp_path / f"train{n}.jsonl"), dev=str(tmp_path / "dev.jsonl")).validate()

    small, big = own(8), own(32)
    qqp = RunConfig(**qqp_files(tmp_path, 40, 12)).validate()
    default = RunConfig().validate()
    sizes = data_sizes([small, big, qqp, default], {})
    assert sizes[:2] == [(8, 3), (32, 3)] and sizes[2] == (40, len(load_task_data(qqp).dev)) and sizes[3] is None
    assert data_sizes([default], {rate_key(default): RATES}) == [(1000, 400)]  # the probe counted them
    # training dominates: four times the rows, about four times the FLOPs (3 dev prompts in both)
    assert estimate_flops(big, 0, sizes[1]) / estimate_flops(small, 0, sizes[0]) == pytest.approx(4, rel=0.15)
    assert study_flops([default]) == [estimate_flops(default, 0, (283_003, 40_429))]
    # the dry-run without a probe prints that count (not the 10,000-row guess of a table)
    spec = {"name": "own", "defaults": {**{k: getattr(big, k) for k in ("task", "model", "regime", "epochs",
                                                                        "max_new_tokens", "train", "dev")}},
            "grid": {"seed": [0]}}
    run_study(spec, tmp_path / "dry", dry_run=True, probe=False)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("generate-"))
    assert line.split()[-2] == format_duration(flop_seconds(estimate_flops(big, 0, (32, 3)), "cpu"))


def test_probe_rows_are_padded_like_the_real_batches():
    """The probe times a few batches; picked at random they would be padded to the longest of a random
    draw, while a run's evaluation sorts all rows by length (and training buckets them): length
    groups at evenly spaced quantiles cost per row what the whole sorted set does."""
    rng = random.Random(0)
    lengths = [5 + int(rng.lognormvariate(3.5, 0.5)) for _ in range(5000)]  # long-tailed, as QQP prompts

    def padded_per_row(rows, size):  # sorted and cut into batches, as evaluation does
        ls = sorted(lengths[i] for i in rows)
        return sum(max(ls[i:i + size]) * len(ls[i:i + size]) for i in range(0, len(ls), size)) / len(ls)

    real = padded_per_row(range(len(lengths)), 128)
    rows = length_groups(lengths, 128, 3)
    assert len(rows) == 384 and padded_per_row(rows, 128) == pytest.approx(real, rel=0.1)
    assert padded_per_row(random.Random(1).sample(range(len(lengths)), 128), 128) > 1.5 * real  # why: a random batch
    assert length_groups([5, 1, 3], 8, 3) == [0, 1, 2]  # fewer rows than the groups: all of them
    # what padding remains scales the time per row: a run evaluating 200 of these rows in batches of 64
    # pads each batch to the longest of a quarter of the lengths, ~30% more than the probe's batches
    small = length_groups(lengths, 64, 3)
    factor = padding_factor(lengths, 200, 64, small, shuffle=False)
    run_rows = subsample(list(range(len(lengths))), 200)  # the rows a run with --max-dev-examples 200 reads
    assert factor > 1.2 and padded_per_row(small, 64) * factor == pytest.approx(padded_per_row(run_rows, 64))
    assert padding_factor(lengths, 5000, 128, rows, shuffle=False) == pytest.approx(1, abs=0.1)
    # training sorts windows of 50 shuffled batches, not all rows: a little more padding than sorted batches
    assert 1 < padding_factor(lengths, 5000, 64, length_groups(lengths, 64, 3), shuffle=True) < 1.2


def test_probe_measures_the_real_pipeline_once_and_caches_it(cache, tmp_path, monkeypatch, capsys):
    train, dev = qqp_files(tmp_path, 40, 12).values()
    c = RunConfig(model="tiny-llama", batch_size=4, eval_batch_size=8, train=str(train), dev=str(dev),
                  device="cpu", precision="fp32").validate()
    got = study_rates([c], say=print)[rate_key(c)]
    data = load_task_data(c)  # the sizes of the data the study reads (dev pairs seen in train dropped), not a table's
    assert (got.n_train, got.n_dev) == (40, len(data.dev)) and "measured" in got.source and "cpu" in got.source
    assert all(v > 0 for v in (got.load_s, got.sft_s, got.eval_s, got.dpo_prep_s, got.dpo_s))
    assert "measuring paraphrase tiny-llama fft" in capsys.readouterr().out
    monkeypatch.setattr(rates_mod, "probe", lambda c: pytest.fail("probed twice"))
    assert study_rates([dataclasses.replace(c, lr=1.0, seed=3, epochs=5)])[rate_key(c)] == got  # same kind of run: the cache
    assert study_rates([dataclasses.replace(c, batch_size=2)], measure=False) == {rate_key(dataclasses.replace(c, batch_size=2)): None}


def test_probe_figures_are_timed_seconds_times_padding_over_the_rows_timed(cache, tmp_path, monkeypatch):
    """With every timing fixed at 2 s (0.5 s more on the first pass) and known padding factors, the
    rates are exactly: seconds x factor / rows timed (3 length groups of a batch); the run's sizes are
    the data's (--balance-labels: what a balanced run keeps; --pairs file: every pair of the file)."""
    monkeypatch.setattr(rates_mod, "_timed", lambda device, fn: (fn(), (2.0, 0.5))[1])
    factors = {"train": 1.5, "prep": 1.25, "dev": 1.1}
    monkeypatch.setattr(rates_mod, "padding_factor", lambda lengths, n, size, rows, *, shuffle, micro=None:
                        factors["train" if shuffle else "prep" if size == 8 and len(lengths) > 20 else "dev"])
    lines = qqp_files(tmp_path, 40, 12)
    rows = Path(lines["train"]).read_text().splitlines()
    no = [r for r in rows[1:] if r.endswith("0.0")]
    Path(lines["train"]).write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.endswith("1.0")] + no[:5]) + "\n")
    c = RunConfig(model="tiny-llama", batch_size=4, eval_batch_size=8, device="cpu", precision="fp32",
                  balance_labels=True, **lines).validate()
    r = rates_mod.probe(c)
    n_dev = len(load_task_data(c).dev)
    assert (r.n_train, r.n_dev, r.n_pairs) == (10, n_dev, None)  # 20 yes, 5 no: a balanced run keeps 5 of each
    assert r.sft_s == pytest.approx(2.0 * 1.5 / 12) and r.dpo_s == pytest.approx(2.0 * 1.5 / 12)
    assert r.eval_s == pytest.approx(2.0 * 1.1 / min(n_dev, 24)) and r.load_s > 0.5 and r.dpo_prep_s > 0

    prompts = [{"prompt": f"Count from {i}:", "completion": f" {i + 1} {i + 2}"} for i in range(20)]
    for name, part in (("train", prompts[:16]), ("dev", prompts[16:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"Say {i}:", "chosen": f" {i}", "rejected": " no"})
                                                  + "\n" for i in range(30)))
    g = RunConfig(task="generate", model="tiny-llama", batch_size=4, eval_batch_size=8, max_new_tokens=4, device="cpu",
                  precision="fp32", train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"),
                  pairs=f"file:{tmp_path / 'prefs.jsonl'}").validate()
    r = rates_mod.probe(g)
    assert (r.n_train, r.n_dev, r.n_pairs) == (16, 4, 30)
    assert r.dpo_s == pytest.approx(2.0 * 1.5 / 12)  # per pair: the probe trained on the file's first 12
    dpo = dataclasses.replace(g, regime="dpo", epochs=1, eval_init=False).validate()
    assert estimate_seconds(dpo, r) == pytest.approx(r.load_s + 30 * (r.dpo_prep_s + r.dpo_s) + 4 * r.eval_s)


def _spec(tmp_path: Path) -> dict:
    train, dev = qqp_files(tmp_path, 16, 8).values()
    return {"name": "jobs",
            "defaults": {"task": "paraphrase", "model": "tiny-llama", "epochs": 2, "batch_size": 8, "lr": 3e-3,
                         "dpo_lr": 1e-3, "precision": "fp32", "device": "cpu", "train": str(train), "dev": str(dev)},
            "grid": {"regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1}, {"regime": "dpo"}]}}


def test_jobs_2_gives_the_results_of_one_at_a_time_and_records_estimates(cache, tmp_path, capsys):
    spec = _spec(tmp_path)
    run_study({**spec, "name": "unmeasured"}, tmp_path / "flop", report=False, only=["regime=dpo"],
              overrides={"batch_size": 4})  # a kind of run no probe measured: said so
    assert "measured rates for 0 of 1 runs, a rough FLOP count for the rest" in capsys.readouterr().out
    run_study(spec, tmp_path / "dry", dry_run=True, probe=True)
    dry = capsys.readouterr().out
    assert "rates measured" in dry and re.search(r"total +\d+:\d\d", dry) and "H100-hours" in dry
    run_study(spec, tmp_path / "one", report=False)
    run_study(spec, tmp_path / "two", report=False, jobs=2)
    out = capsys.readouterr().out
    assert "local: 2 runs at once, 1 CPU thread(s) each; 1 wait for the shared SFT prefix" in out
    assert re.search(r"3 to run \(estimated \d+:\d\d one at a time; measured rates\)", out)  # the dry-run measured them
    assert re.search(r"done in \d+:\d\d, estimated \d+:\d\d", out)

    def results(d):
        with Store(d / "study.db") as st:
            return {r["name"]: [{k: v for k, v in e["metrics"].items() if not k.endswith("_s")}
                                for e in st.epochs(r["run_hash"])] for r in st.runs()}

    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert two.keys() == one.keys()
    for name in one:
        for a, b in zip(one[name], two[name], strict=True):
            assert {k: v for k, v in a.items() if k.startswith("dev/")} == {k: v for k, v in b.items() if k.startswith("dev/")}
            # 1 thread vs 2 sums in another order: fp32 rounding (eps 1.2e-7 x log-probs of a few nats)
            # shows in TRL's rewards, differences of two log-probs; everything else is equal
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    with Store(tmp_path / "two" / "study.db") as st:
        staged = next(r for r in st.runs() if r["config"]["regime"] == "sft-dpo")
        assert staged["summary"]["prefix_reused_epochs"] == 1  # waited for the SFT-only run's prefix
    for f in (tmp_path / "two" / "runs").glob("*/run.json"):
        assert json.loads(f.read_text())["estimated_s"] > 0
    assert main(["study", "status", str(tmp_path / "two")]) == 0
    status = capsys.readouterr().out
    assert "done 3" in status and re.search(r"\[\d+:\d\d, estimated \d+:\d\d\]", status)
