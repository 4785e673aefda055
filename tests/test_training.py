"""Tasks and the training loop on tiny models: prompts, metrics, losses, checkpoints, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from sacrebleu.metrics import CHRF
from sklearn.metrics import accuracy_score, f1_score

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.data import ParaphraseExample, read_cs224n_sonnets
from sftdpo.ops.batching import bucketed_batches
from sftdpo.tasks import CS224N_PROMPT
from sftdpo.train.loop import Run, evaluate_run, train

from conftest import SONNET_FILES, write_synthetic_qqp


@pytest.fixture
def qqp(tmp_path):
    train_f = write_synthetic_qqp(tmp_path / "train.csv", 48, seed=0)
    dev_f = write_synthetic_qqp(tmp_path / "dev.csv", 16, seed=1)
    return dict(train=str(train_f), dev=str(dev_f))


def cfg_for(task, files, **kw):
    base = dict(task=task, model="tiny-llama", device="cpu", precision="fp32", batch_size=8, lr=3e-3,
                epochs=2, eval_batch_size=8, log_every=1, max_new_tokens=12, **files)
    return RunConfig(**{**base, **kw})


def test_cs224n_prompt_and_label_token_check(qqp, cache, tmp_path):
    run = Run(cfg_for("paraphrase", qqp), tmp_path / "r")
    run.build()
    e = ParaphraseExample("1", "Is it?", "Was it?", 1)
    assert run.task.prompt(e) == 'Question 1: "Is it?"\nQuestion 2: "Was it?\nAre these questions asking the same thing?\n'
    assert CS224N_PROMPT.count("{q1}") == 1
    assert run.task.label_id(e) == run.task.yes_id != run.task.no_id
    bad = cfg_for("paraphrase", qqp, label_words="absolutely-yes,no")
    with pytest.raises(SftdpoError, match="single tokens"):
        Run(bad, tmp_path / "bad").build()


def test_bucketed_batches_cover_every_row_once_and_are_seeded():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 6, 4, 10, 1]
    a = bucketed_batches(lengths, 4, seed=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert a == bucketed_batches(lengths, 4, seed=1) and a != bucketed_batches(lengths, 4, seed=2)


def test_paraphrase_loss_decreases_and_metrics_match_sklearn(qqp, cache, tmp_path):
    out = tmp_path / "run"
    summary = train(cfg_for("paraphrase", qqp, epochs=3), out)
    losses = [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch" and r["stage"] == "sft"]
    assert losses[-1] < losses[0]
    rows = [json.loads(x) for x in (out / "dev_outputs.jsonl").read_text().splitlines()]
    pred = [int(r["prediction"]) for r in rows]
    ref = [int(r["reference"]) for r in rows]
    assert summary["dev/accuracy"] == pytest.approx(accuracy_score(ref, pred))
    assert summary["dev/macro_f1"] == pytest.approx(f1_score(ref, pred, average="macro"))
    assert summary["dev/f1_positive"] == pytest.approx(f1_score(ref, pred, pos_label=1, zero_division=0))
    head = (out / "predictions.csv").read_text().splitlines()
    assert head[0] == "id,prediction,label" and len(head) == len(rows) + 1
    for key in ("wall_clock_s", "wall_clock_per_epoch_s", "train_tokens_per_s", "peak_memory_mb", "trainable_params", "total_params"):
        assert summary[key] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hash"] == summary["run_hash"] and "torch" in cfg["versions"]


def test_checkpoint_reload_gives_identical_predictions(qqp, cache, tmp_path):
    out = tmp_path / "run"
    train(cfg_for("paraphrase", qqp, epochs=1), out)
    final = [json.loads(x)["prediction"] for x in (out / "dev_outputs.jsonl").read_text().splitlines()]
    again = evaluate_run(out, "last")
    assert [p for _, p, _ in again["outputs"]] == final


def test_sonnet_sft_loss_masks_padding_and_chrf_matches_sacrebleu(cache, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for("sonnet", SONNET_FILES, epochs=1, num_samples=2, temperature=0.8)
    run = Run(cfg, out)
    run.build()
    # loss over a padded batch == mean of the per-sequence losses weighted by token count
    b = run.task.collate([0, 1])
    with torch.no_grad():
        padded, _ = run.task.sft_loss(run.model, b)
        tot = n = 0
        for i in (0, 1):
            ids = torch.tensor([run.task.train_ids[i]])
            loss = run.model(input_ids=ids, labels=ids).loss
            tot, n = tot + loss * (ids.size(1) - 1), n + ids.size(1) - 1
    torch.testing.assert_close(padded, tot / n, atol=1e-5, rtol=1e-5)
    summary = train(cfg, out)
    gens = read_cs224n_sonnets(out / "generations.txt")
    refs = {s.number: s.text for s in read_cs224n_sonnets(SONNET_FILES["dev"])}
    s0 = CHRF().corpus_score([g.text for g in gens], [[refs[g.number] for g in gens]]).score
    gens1 = read_cs224n_sonnets(out / "generations_sample1.txt")
    s1 = CHRF().corpus_score([g.text for g in gens1], [[refs[g.number] for g in gens1]]).score
    assert summary["dev/chrf"] == pytest.approx((s0 + s1) / 2, abs=1e-6)
    assert all(g.text.startswith(refs[g.number].split("\n")[0]) for g in gens)  # prompt lines included
    assert 0 <= summary["dev/chrf_continuation"] <= 100


def test_batched_kv_cache_generation_equals_one_prompt_at_a_time(cache, tmp_path):
    run = Run(cfg_for("sonnet", SONNET_FILES), tmp_path / "r")
    run.build()
    prompts = [run.task.prompt_text(s) for s in run.task.dev] + ["Shall I\n"]
    kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=10)
    batched = run.task.generate(run.model, prompts, run.device, "fp32", **kw)
    single = [run.task.generate(run.model, [p], run.device, "fp32", **kw)[0] for p in prompts]
    assert batched == single


def test_run_dir_with_another_config_is_refused(qqp, cache, tmp_path):
    out = tmp_path / "run"
    train(cfg_for("paraphrase", qqp, epochs=1), out)
    with pytest.raises(SftdpoError, match="another run"):
        train(cfg_for("paraphrase", qqp, epochs=1, lr=1e-4), out)


def test_contradictory_configs_are_rejected():
    with pytest.raises(SftdpoError, match="handoff"):
        RunConfig(regime="sft-dpo", epochs=3).validate()
    with pytest.raises(SftdpoError, match="handoff"):
        RunConfig(regime="sft-dpo", epochs=3, handoff_epoch=3).validate()
    with pytest.raises(SftdpoError, match="only applies"):
        RunConfig(regime="sft", handoff_epoch=1, epochs=3).validate()


def _final(out):
    s = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in s.items() if k.startswith(("dev/", "best/"))}, \
        [{k: v for k, v in r.items() if k.startswith(("dev/", "train/"))}
         for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]


def test_kill_mid_epoch_then_resume_matches_uninterrupted(qqp, cache, tmp_path):
    cfg = cfg_for("paraphrase", qqp, epochs=3, batch_size=4, lora_dropout=0.1, param="lora", lr=5e-3)
    ref_dir = tmp_path / "ref"
    train(cfg, ref_dir)
    out = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "sftdpo.cli", "-q", "train", "--config", str(cfg_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 inside epoch 2, after its third step was logged
        if metrics.exists() and '"epoch": 2, "step": 3' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    subprocess.run(cmd, check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _final(out) == _final(ref_dir)
