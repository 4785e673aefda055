"""Tasks and the training loop on tiny models: prompts, metrics, losses, checkpoints, resume."""

import json
import math
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

from conftest import SONNET_FILES, qqp_files, require_tiny_gpt2


@pytest.fixture
def qqp(tmp_path):
    return qqp_files(tmp_path, 48, 16)


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


# -- the science of the loop: schedule, shared trajectory, best checkpoint, resume, accumulation -------

def test_schedule_warms_up_then_decays_as_transformers_defines_it():
    """The learning rate at every step of make_scheduler, against the values transformers' schedules
    define (TRL's trainers use them): warm-up from 0 over ceil(ratio x total) steps, then linear decay
    to 0, cosine decay to 0, or constant. Catches a flat schedule, a warm-up of round() steps or one
    that starts at the peak, decay that never reaches 0, and a cosine taken for a linear decay."""
    from sftdpo.train.step import make_scheduler

    def lrs(schedule: str, total: int = 20, ratio: float = 0.12) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, total, ratio, schedule)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])  # the rate the next optimizer step uses
            opt.step()
            sched.step()
        return out

    # 20 x 0.12 = 2.4 -> 3 warm-up steps (transformers rounds up: TrainingArguments.get_warmup_steps)
    assert lrs("linear") == pytest.approx([0, 1 / 3, 2 / 3] + [(20 - s) / 17 for s in range(3, 20)])
    assert lrs("cosine") == pytest.approx([0, 1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * (s - 3) / 17))
                                                              for s in range(3, 20)])
    assert lrs("constant") == pytest.approx([0, 1 / 3, 2 / 3] + [1.0] * 17)
    assert lrs("linear", ratio=0.0)[0] == 1.0


def _records(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_logged_learning_rate_follows_the_schedule_over_the_whole_budget(qqp, cache, tmp_path):
    """The lr logged after every optimizer step of a 3-epoch run: one schedule over all 18 steps (not
    one per epoch, not constant). Logged as TRL logs it, after the scheduler's step: the next step's rate."""
    cfg = cfg_for("paraphrase", qqp, epochs=3, batch_size=8, log_every=1, warmup_ratio=0.2, lr=1e-3, eval_init=False)
    train(cfg, tmp_path / "run")
    lrs = [r["lr"] for r in _records(tmp_path / "run")]
    assert len(lrs) == 18  # 3 epochs x 48 / 8 steps; warm-up ceil(18 x 0.2) = 4 steps
    want = [i / 4 if i < 4 else (18 - i) / 14 for i in range(1, 19)]
    assert lrs == [pytest.approx(1e-3 * w) for w in want] and lrs[-1] == 0.0


def test_staged_runs_sft_epochs_are_the_sft_only_runs_first_epochs(qqp, cache, tmp_path):
    """No shared prefix here: both runs train their own SFT epochs, and SFT@1->DPO's first epoch must be
    the SFT-only run's first epoch (same schedule over the whole budget), step for step."""
    common = dict(epochs=3, batch_size=8, log_every=1, lr=2e-3, dpo_lr=1e-3, eval_init=False)
    train(cfg_for("paraphrase", qqp, **common), tmp_path / "sft")
    train(cfg_for("paraphrase", qqp, regime="sft-dpo", handoff_epoch=1, **common), tmp_path / "staged")
    sft = [(r["lr"], r["loss"]) for r in _records(tmp_path / "sft") if r["epoch"] == 1]
    staged = [(r["lr"], r["loss"]) for r in _records(tmp_path / "staged") if r["epoch"] == 1]
    assert staged == sft and len(sft) == 6
    assert _records(tmp_path / "staged", "epoch")[0]["dev/accuracy"] == _records(tmp_path / "sft", "epoch")[0]["dev/accuracy"]


def test_best_is_the_highest_dev_metric():
    from sftdpo.train.checkpoint import RunState

    state = RunState()
    assert [state.update_best(e, v) for e, v in enumerate([0.5, 0.9, 0.7, 0.9], 1)] == [True, True, False, False]
    assert (state.best_epoch, state.best_value) == (2, 0.9)


class _Stop(Exception):
    pass


def test_resume_after_an_epoch_equals_the_uninterrupted_run(qqp, cache, tmp_path):
    """In-process interruption after epoch 1's checkpoint, then resume: the optimizer state (AdamW
    moments) and the RNG (dropout masks: tiny-gpt2 and the LoRA adapter have dropout) must come back."""
    require_tiny_gpt2()
    cfg = cfg_for("paraphrase", qqp, model="tiny-gpt2", epochs=3, batch_size=8, param="lora", lora_dropout=0.2,
                  lr=5e-3, eval_init=False)
    ref = train(cfg, tmp_path / "ref")

    def stop(epoch):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        Run(cfg, tmp_path / "part", on_checkpoint=stop).train()
    resumed = Run(cfg, tmp_path / "part").train()
    assert _final(tmp_path / "part") == _final(tmp_path / "ref")
    assert resumed["dev/accuracy"] == ref["dev/accuracy"]


@pytest.mark.parametrize("task", ["paraphrase", "sonnet"])
def test_grad_accum_equals_the_larger_batch(task, qqp, tiny_data, cache, tmp_path):
    """batch 2 x accum 3 == batch 6 (fp32, no dropout in tiny-llama), SFT and DPO stages, with a
    short last step (13 pairs, 9 sonnets): the loss of a step is its examples' (token-weighted for
    the sonnet LM loss), however the step is split into micro-batches."""
    from safetensors.torch import load_file

    files = qqp if task == "paraphrase" else tiny_data["sonnet"]
    kw = dict(regime="sft-dpo", epochs=2, handoff_epoch=1, lr=3e-3, dpo_lr=2e-3, max_train_examples=13,
              temperature=0.0, max_new_tokens=8, eval_init=False, log_every=1)
    runs = {}
    for name, (bs, accum) in {"accum": (2, 3), "big": (6, 1)}.items():
        out = tmp_path / name
        train(cfg_for(task, files, batch_size=bs, grad_accum=accum, **kw), out)
        runs[name] = (_records(out), _records(out, "epoch"), load_file(str(out / "checkpoints" / "last" / "weights.safetensors")))
    (steps_a, epochs_a, w_a), (steps_b, epochs_b, w_b) = runs["accum"], runs["big"]
    n = json.loads((tmp_path / "big" / "summary.json").read_text())["train_examples"]
    assert n % 6 and len(steps_a) == len(steps_b) == 2 * math.ceil(n / 6) >= 4  # the last step of an epoch is short
    for a, b in zip(steps_a, steps_b):
        assert (a["stage"], a["step"], a["lr"]) == (b["stage"], b["step"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert [e["train/loss"] for e in epochs_a] == pytest.approx([e["train/loss"] for e in epochs_b], rel=1e-5)
    # The updates agree to 1e-4 of their own size (norm-wise). Element-wise AdamW divides a near-zero
    # gradient by sqrt(v) + eps, which turns fp32 summation-order differences (~1e-7 of the summed
    # terms) into update differences of up to ~1e-3 of lr on a few such elements; a wrong weighting
    # (e.g. a short last step scaled by 2/3) moves whole updates instead.
    run = Run(cfg_for(task, files, batch_size=6, **kw), tmp_path / "init")  # the same initial weights
    run.build()
    w0 = {n: p.detach() for n, p in run.model.named_parameters()}
    diff = torch.cat([(w_a[k] - w_b[k]).flatten() for k in w_b]).norm()
    update = torch.cat([(w_b[k] - w0[k]).flatten() for k in w_b]).norm()
    assert diff <= 1e-4 * update, (float(diff), float(update))


def test_train_step_over_micro_batches_equals_one_step_over_their_union(qqp, tiny_data, cache, tmp_path):
    import copy

    from sftdpo.objectives.sft import SFTObjective
    from sftdpo.train.step import make_scheduler, train_step

    for task, files in (("paraphrase", qqp), ("sonnet", tiny_data["sonnet"])):
        run = Run(cfg_for(task, files, batch_size=2, grad_accum=3, max_train_examples=5), tmp_path / task)
        run.build()
        obj = SFTObjective(run.task)
        window = next(iter(obj.steps(1)))  # 5 rows: micro-batches of 2, 2 and 1
        assert [len(b.index) for b in window] == [2, 2, 1] and sum(b.share for b in window) == pytest.approx(1.0)
        union = run.task.collate([i for b in window for i in b.index.tolist()])
        results = []
        for batches in (window, [union]):
            model = copy.deepcopy(run.model)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=1.0)  # the update is minus the gradient itself
            st = train_step(model, obj, batches, opt, make_scheduler(opt, 10, 0.0, "constant"), params,
                            device=run.device, precision="fp32", max_grad_norm=0.0)
            delta = torch.cat([(p.detach() - q.detach()).flatten() for p, q in zip(model.parameters(), run.model.parameters())])
            results.append((st.loss.item(), delta))
        (loss_a, g_a), (loss_b, g_b) = results
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        # fp32 sums in another order: the gradients agree to ~1e-7 of their norm; a wrong weighting is >1e-2 off
        assert (g_a - g_b).norm() <= 1e-5 * g_b.norm()


def test_paraphrase_sft_targets_are_the_gold_label_tokens(qqp, cache, tmp_path):
    run = Run(cfg_for("paraphrase", qqp), tmp_path / "r")
    run.build()
    t = run.task
    b = t.collate(list(range(len(t.train))))
    want = [t.yes_id if e.label == 1 else t.no_id for e in t.train]
    assert b.labels.tolist() == want and {e.label for e in t.train} == {0, 1}
    assert t.tok.decode([t.yes_id]) == "yes" and t.tok.decode([t.no_id]) == "no"


def test_dev_metrics_are_computed_on_the_dev_examples(qqp, cache, tmp_path):
    import csv

    run = Run(cfg_for("paraphrase", qqp), tmp_path / "r")
    run.build()
    ev = run.task.evaluate(run.model, run.device, "fp32")
    with open(qqp["dev"], newline="") as f:
        dev = {r["id"]: r["is_duplicate"] for r in csv.DictReader(f, delimiter="\t")}
    # every dev example the file holds that is not also a train pair (deduped), with the file's label
    assert len(ev.outputs) == len(run.task.dev) >= 8 and {i for i, _, _ in ev.outputs} <= set(dev)
    assert all(int(r) == int(float(dev[i])) for i, _, r in ev.outputs)
    preds, refs = [int(p) for _, p, _ in ev.outputs], [int(r) for _, _, r in ev.outputs]
    assert ev.metrics["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert ev.metrics["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro"))
