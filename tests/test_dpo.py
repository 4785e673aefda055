"""DPO: loss values, the start-of-DPO invariant, the reference model, caches, pair selection,
the SFT->DPO hand-off and resuming mid-DPO. Tiny models (tiny-gpt2) and the fixture data only."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sftdpo.bench import sonnet_bench_pairs
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.models import autocast, load_model
from sftdpo.objectives import StageContext
from sftdpo.objectives.dpo import build_dpo_objective, dpo_loss, loss as dpo_loss_module, pairs as dpo_pairs
from sftdpo.objectives.dpo import reference as dpo_reference
from sftdpo.objectives.dpo.pairs import (collate_sequence_pairs, label_pair_set, prompt_batch, read_pairs,
                                         select_top_k, sequence_pair_set, unique_prompts)
from sftdpo.objectives.dpo.reference import compute_reference_logps
from sftdpo.ops.batching import pad_batch
from sftdpo.ops.logprobs import next_token_logps, sequence_logps
from sftdpo.models import weights_fingerprint
from sftdpo.tasks import make_task
from sftdpo.train.checkpoint import trainable_state
from sftdpo.train.loop import Run

from conftest import make_tiny_task, plain_token_logps, rel

CPU = torch.device("cpu")

FIX = Path(__file__).parent / "fixtures" / "data"
DATA = {
    "paraphrase": dict(train=str(FIX / "qqp" / "quora-train.csv"), dev=str(FIX / "qqp" / "quora-dev.csv")),
    "sonnet": dict(train=str(FIX / "sonnets" / "sonnets.txt"), dev=str(FIX / "sonnets" / "TRUE_sonnets_held_out_dev.txt"),
                   max_new_tokens=12),
}
LN2 = math.log(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module", autouse=True)
def _needs_tiny_gpt2():
    try:
        load_model("tiny-gpt2")
    except SftdpoError as e:
        pytest.skip(f"tiny-gpt2 unavailable (set SFTDPO_DATA_DIR to a folder with gpt2-tokenizer/): {e}")


def make_cfg(task="paraphrase", **kw) -> RunConfig:
    base = dict(task=task, model="tiny-gpt2", regime="dpo", batch_size=2, device="cpu", precision="fp32",
                eval_batch_size=8, **DATA[task])
    return RunConfig(**{**base, **kw})


def built(cfg: RunConfig, out: Path) -> Run:
    run = Run(cfg, out)
    run.build()
    return run


def first_batch(run, obj):
    run.model.train(obj.train_mode)
    (batch,) = next(iter(obj.steps(1)))
    batch = batch.to(run.device)
    with autocast(run.device, run.precision):
        return obj.loss(run.model, batch)


def perturb_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def all_pair_logps(model, task):
    """Paraphrase (chosen, rejected) log-probs of every training pair, in pair order."""
    ps = label_pair_set(task)
    b, chosen, rejected, _ = prompt_batch(task, ps, list(range(len(ps))))
    with torch.no_grad():
        model.eval()
        return next_token_logps(model, b, chosen, rejected[:, 0])  # two labels: one rejected label each


# -- the loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_loss_matches_hand_computation(loss_type):
    """Each pair's loss and the logged rewards, computed by hand from TRL's formulas, on four pairs whose
    margins differ in size and sign (2.5, -0.5, -1.0, -4.0: no two cancel, their mean is not 0) and whose
    references differ between chosen and rejected. Catches a flipped margin (rejected - chosen, or the
    chosen and rejected log-probs swapped: a margin set that is not symmetric gives other losses), the
    reference subtracted with the wrong sign or left out, β applied twice or not at all, the pair
    losses summed instead of averaged, rewards with the wrong sign or without β."""
    pc = torch.tensor([-1.0, -4.0, -2.0, -6.0])  # policy log-probs of the chosen responses
    pr = torch.tensor([-3.0, -2.0, -3.5, -1.0])  # ... and of the rejected ones
    rc = torch.tensor([-2.0, -3.0, -1.5, -4.0])  # reference log-probs, chosen
    rr = torch.tensor([-1.5, -1.5, -4.0, -3.0])  # reference log-probs, rejected
    beta, eps = 0.5, 0.2
    # delta = (pc - rc) - (pr - rr), by hand: (1 - (-1.5)), (-1 - (-0.5)), (-0.5 - 0.5), (-2 - 2)
    deltas = [2.5, -0.5, -1.0, -4.0]
    assert ((pc - rc) - (pr - rr)).tolist() == deltas
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    per = {
        "sigmoid": [-math.log(sig(beta * d)) for d in deltas],
        "ipo": [(d - 1 / (2 * beta)) ** 2 for d in deltas],
        "hinge": [max(0.0, 1 - beta * d) for d in deltas],
        "robust": [(-(1 - eps) * math.log(sig(beta * d)) + eps * math.log(sig(-beta * d))) / (1 - 2 * eps) for d in deltas],
    }[loss_type]
    smoothing = eps if loss_type == "robust" else 0.0
    losses = dpo_loss_module.dpo_losses(pc, pr, rc, rr, beta, loss_type, smoothing)
    assert losses.tolist() == pytest.approx(per, abs=1e-6)
    loss, m = dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
    assert loss.item() == pytest.approx(sum(per) / 4, abs=1e-6)
    # swapping chosen and rejected gives another loss: the margins are not symmetric
    swapped = dpo_loss(pr, pc, rr, rc, beta, loss_type, smoothing)[0].item()
    assert abs(swapped - loss.item()) > 0.1
    # rewards: beta * (policy - reference); chosen 0.5, -0.5, -0.25, -1.0; rejected -0.75, -0.25, 0.25, 1.0
    assert m["rewards/chosen"].item() == pytest.approx(-1.25 / 4)
    assert m["rewards/rejected"].item() == pytest.approx(0.25 / 4)
    assert m["rewards/margins"].item() == pytest.approx(beta * sum(deltas) / 4)
    assert m["rewards/accuracies"].item() == pytest.approx(0.25)  # only the first pair's chosen reward is higher
    assert m["logps/chosen"].item() == pytest.approx(-13.0 / 4)
    assert m["logps/rejected"].item() == pytest.approx(-9.5 / 4)
    assert set(m) == set(dpo_loss_module.METRIC_NAMES)


def test_label_smoothing_only_for_robust():
    x = torch.zeros(1)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, 0.1, "sigmoid", 0.1)


# -- the start-of-DPO invariant ----------------------------------------------------------------

@pytest.mark.parametrize("task", ["paraphrase", "sonnet"])
@pytest.mark.parametrize("param", ["fft", "lora"])
def test_start_of_dpo_is_ln2_with_zero_rewards(task, param, tmp_path):
    run = built(make_cfg(task, param=param, lora_dropout=0.3), tmp_path / "run")
    obj = run.objective("dpo")
    assert obj.train_mode is False
    loss, logs = first_batch(run, obj)
    assert abs(loss.item() - LN2) < 1e-5
    assert abs(float(logs["rewards/chosen"])) < 1e-6 and abs(float(logs["rewards/rejected"])) < 1e-6
    assert obj.describe()["reference"] == ("adapter-disabled base" if param == "lora" else "pretrained backbone (FFT)")
    assert (tmp_path / "run" / "dpo" / "state.json").exists() and (tmp_path / "run" / "dpo" / "pairs.jsonl").exists()


# -- the single-forward paraphrase path --------------------------------------------------------

def test_paraphrase_single_forward_equals_two_forwards(tmp_path):
    run = built(make_cfg("paraphrase", batch_size=3), tmp_path / "run")
    task, model = run.task, run.model
    with torch.no_grad():  # move away from init so the numbers are not special
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    ps = label_pair_set(task)
    rows = list(range(len(ps)))
    b, chosen, rejected, _ = prompt_batch(task, ps, rows)
    rejected = rejected[:, 0]  # two labels: one rejected label each
    calls = []
    hook = model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    pc, pr = next_token_logps(model, b, chosen, rejected)
    hook.remove()
    assert len(calls) == 1  # one decoder pass gives both responses' log-probs
    # two separate full forwards: prompt + chosen token, prompt + rejected token
    two = []
    for resp in (ps.chosen, ps.rejected):
        lp = []
        for i in rows:
            ids = torch.tensor([ps.prompt[i] + resp[i]])
            logits = model(input_ids=ids).logits[0, -2].float()
            lp.append(torch.log_softmax(logits, -1)[resp[i][0]])
        two.append(torch.stack(lp))
    torch.testing.assert_close(pc, two[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pr, two[1], atol=1e-5, rtol=0)
    # and through sequence_logps (the sonnet path) on the concatenated rows
    seq = sequence_logps(model, collate_sequence_pairs(ps, rows, task.pad_id), "sum")
    torch.testing.assert_close(seq, torch.cat(two), atol=1e-5, rtol=0)
    ref_c, ref_r = torch.randn(len(rows)), torch.randn(len(rows))
    one_loss, _ = dpo_loss(pc, pr, ref_c, ref_r, 0.1)
    two_loss, _ = dpo_loss(two[0], two[1], ref_c, ref_r, 0.1)
    assert one_loss.item() == pytest.approx(two_loss.item(), abs=1e-6)


# -- the LoRA reference ------------------------------------------------------------------------

def test_lora_dpo_only_reference_is_the_adapter_disabled_base(tmp_path):
    run = built(make_cfg("paraphrase", param="lora"), tmp_path / "run")
    perturb_adapter(run.model)
    obj = run.objective("dpo")
    base_model, _ = load_model("tiny-gpt2", seed=run.cfg.seed)
    base = all_pair_logps(base_model, run.task)
    enabled = all_pair_logps(run.model, run.task)
    torch.testing.assert_close(obj.ref_chosen, base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(obj.ref_rejected[:, 0], base[1], atol=1e-6, rtol=0)
    assert (obj.ref_chosen - enabled[0]).abs().max() > 1e-3  # the perturbed adapter does change the model
    assert obj.describe()["reference"] == "adapter-disabled base"


def test_sft_lora_dpo_reference_is_the_adapter_at_handoff(tmp_path):
    run = built(make_cfg("paraphrase", param="lora", regime="sft-dpo", epochs=2, handoff_epoch=1), tmp_path / "run")
    perturb_adapter(run.model)  # stands in for the SFT epoch
    obj = run.objective("dpo")
    enabled = all_pair_logps(run.model, run.task)
    base_model, _ = load_model("tiny-gpt2", seed=run.cfg.seed)
    base = all_pair_logps(base_model, run.task)
    torch.testing.assert_close(obj.ref_chosen, enabled[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(obj.ref_rejected[:, 0], enabled[1], atol=1e-6, rtol=0)
    assert (obj.ref_chosen - base[0]).abs().max() > 1e-3
    assert obj.describe()["reference"] == "SFT adapter at hand-off epoch 1"
    loss, logs = first_batch(run, obj)  # policy == reference at the hand-off
    assert abs(loss.item() - LN2) < 1e-5


# -- caches ------------------------------------------------------------------------------------

def test_reference_logps_cache_hit_and_invalidation(tmp_path, monkeypatch):
    calls = []
    real = dpo_reference.label_logps  # what computes a classification task's reference log-probs
    monkeypatch.setattr(dpo_reference, "label_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = make_cfg("paraphrase")
    a = built(cfg, tmp_path / "a").objective("dpo")
    assert len(calls) == 1 and not a.describe()["reference_cache_hit"]
    b = built(cfg, tmp_path / "b").objective("dpo")  # same weights, same data, another run
    assert len(calls) == 1 and b.describe()["reference_cache_hit"]
    torch.testing.assert_close(a.ref_chosen, b.ref_chosen, atol=0, rtol=0)
    lora = built(make_cfg("paraphrase", param="lora"), tmp_path / "lora").objective("dpo")  # adapter-disabled base
    assert len(calls) == 1 and lora.describe()["reference_cache_hit"]  # == the FFT backbone's reference
    run = built(cfg, tmp_path / "c")  # different weights
    with torch.no_grad():
        next(run.model.parameters()).add_(0.01)
    c = run.objective("dpo")
    assert len(calls) == 2 and c.describe()["reference_key"] != a.describe()["reference_key"]
    d = built(make_cfg("paraphrase", max_train_examples=2), tmp_path / "d").objective("dpo")  # different data
    assert len(calls) == 3 and d.describe()["reference_key"] != a.describe()["reference_key"]
    # a later call in the same run dir reuses the run's saved reference, whatever the model is now
    with torch.no_grad():
        next(run.model.parameters()).add_(1.0)
    again = run.objective("dpo")
    assert len(calls) == 3 and again.describe()["reused_from_run_dir"]
    torch.testing.assert_close(again.ref_chosen, c.ref_chosen, atol=0, rtol=0)


def test_sonnet_pairs_are_cached_and_v3_reuses_v2_generations(tmp_path, monkeypatch):
    run = built(make_cfg("sonnet", pairs="v3", pairs_n=3, pairs_top_k=4, pairs_temperatures=(0.7, 1.3)), tmp_path / "run")
    calls = []
    real = run.task.generate
    monkeypatch.setattr(run.task, "generate", lambda *a, **k: calls.append(k["temperature"]) or real(*a, **k))
    build = lambda cfg: dpo_pairs.build_generation_pairs(run.task, run.model, cfg, run.device, run.precision,  # noqa: E731
                                                      fingerprint=weights_fingerprint(run.model, cfg))
    pairs, path = build(run.cfg)
    assert calls == [0.7, 1.3]  # samples 0, 2 at 0.7 and sample 1 at 1.3
    assert len(pairs) == 4 and path.exists() and path.parent == Path(tmp_path / "cache" / "pairs")
    header, stored = read_pairs(path, "generating them again")
    assert stored == pairs and header["version"] == "v3" and header["top_k"] == 4 and header["generated_pairs"] == 9
    assert header["unique_prompts"] == unique_prompts(pairs) and header["fingerprint"]
    gaps = [p["gap"] for p in pairs]
    assert gaps == sorted(gaps, reverse=True)
    again, path2 = build(run.cfg)
    assert path2 == path and again == pairs and len(calls) == 2  # no generation the second time
    more = RunConfig.from_dict({**run.cfg.to_dict(), "pairs_top_k": 6})
    six, _ = build(more)
    assert len(six) == 6 and six[:4] == pairs and len(calls) == 2  # other K: v2's generations reused
    default_k, _ = build(RunConfig.from_dict({**run.cfg.to_dict(), "pairs_top_k": None}))
    assert len(default_k) == len(run.task.pair_examples) == 3 and default_k == pairs[:3]  # default K: one per prompt
    v2 = RunConfig.from_dict({**run.cfg.to_dict(), "pairs": "v2"})
    all_pairs, _ = build(v2)
    assert len(all_pairs) == 9 and [p["temperature"] for p in all_pairs[:3]] == [0.7, 1.3, 0.7]
    with torch.no_grad():  # other generating weights: generate again
        next(run.model.parameters()).add_(0.01)
    build(run.cfg)
    assert len(calls) == 4


# -- v3 selection ------------------------------------------------------------------------------

def test_v3_selection_order_and_unique_prompts():
    def pair(i, j, gap):
        return {"prompt": f"p{i}", "chosen": "c", "rejected": f"r{i}{j}", "number": 100 + i, "prompt_index": i,
                "sample_index": j, "gap": gap}

    pairs = [pair(0, 0, 50.0), pair(0, 1, 90.0), pair(1, 0, 90.0), pair(1, 1, 70.0), pair(2, 0, 90.0), pair(2, 1, 10.0)]
    order = [(p["prompt_index"], p["sample_index"]) for p in select_top_k(pairs, 6)]
    assert order == [(0, 1), (1, 0), (2, 0), (1, 1), (0, 0), (2, 1)]
    shuffled = [pairs[i] for i in (5, 3, 1, 0, 4, 2)]  # input order does not matter
    assert select_top_k(shuffled, 4) == select_top_k(pairs, 4)
    top2 = select_top_k(pairs, 2)
    assert unique_prompts(top2) == 2
    assert unique_prompts(select_top_k([pair(0, j, 99.0 - j) for j in range(4)] + [pair(1, 0, 1.0)], 3)) == 1
    assert select_top_k(pairs, 10) == select_top_k(pairs, 6)


# -- the hand-off and resuming mid-DPO ---------------------------------------------------------

class _Interrupt(Exception):
    pass


def _epoch_records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "epoch"]


def _results(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith(("train/", "dev/")) or k in ("stage", "epoch")}


def test_handoff_and_resume_mid_dpo(tmp_path, monkeypatch, caplog):
    cfg = make_cfg("paraphrase", regime="sft-dpo", epochs=3, handoff_epoch=1, lr=1e-3, dpo_lr=1e-3, beta=0.5)
    full = tmp_path / "full"
    summary = Run(cfg, full).train()
    recs = _epoch_records(full)
    assert [(r["stage"], r["epoch"]) for r in recs] == [("init", 0), ("sft", 1), ("dpo", 2), ("dpo", 3)]
    assert abs(recs[3]["train/rewards/margins"]) > 1e-4  # DPO moved the policy away from the reference
    assert summary["stages"]["dpo"]["reference"] == "SFT model at hand-off epoch 1"
    assert summary["stages"]["dpo"]["pairs"] == 3 and Path(summary["stages"]["dpo"]["pairs_file"]).exists()

    # interrupt right after epoch 2 (the first DPO epoch) is checkpointed, then resume
    part = tmp_path / "part"

    def die(epoch):
        if epoch == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Run(cfg, part, on_checkpoint=die).train()
    assert not (part / "summary.json").exists()
    broken = tmp_path / "broken"  # the same interrupted run, but its saved DPO state lost
    shutil.copytree(part, broken)
    shutil.rmtree(broken / "dpo")

    calls = []
    real = dpo_reference.label_logps  # what computes a classification task's reference log-probs
    monkeypatch.setattr(dpo_reference, "label_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = Run(cfg, part).train()
    assert calls == []  # the reference came from the run directory, not from the current weights
    assert resumed["stages"]["dpo"]["reused_from_run_dir"]
    got, want = [_results(r) for r in _epoch_records(part)], [_results(r) for r in recs]
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        assert g == {k: pytest.approx(v, abs=1e-6) if isinstance(v, float) else v for k, v in w.items()}
    assert {k: v for k, v in resumed.items() if k.startswith("dev/")} == {k: v for k, v in summary.items() if k.startswith("dev/")}
    # its saved DPO inputs lost: they came from the model at the hand-off and cannot be rebuilt from the
    # weights now, so the run starts again from its beginning (one line) and ends as the uninterrupted run
    caplog.clear()
    with caplog.at_level("WARNING", logger="sftdpo"):
        again = Run(cfg, broken).train()
    assert "inside the preference stage" in caplog.text and "starts again" in caplog.text
    assert {k: v for k, v in again.items() if k.startswith("dev/")} == {k: v for k, v in summary.items() if k.startswith("dev/")}


def test_dpo_lr_zero_leaves_weights_bit_identical(tmp_path):
    cfg = make_cfg("paraphrase", param="lora", epochs=1, dpo_lr=0.0, weight_decay=0.1, eval_init=False)
    before = trainable_state(built(cfg, tmp_path / "ref").model)
    Run(cfg, tmp_path / "run").train()
    from safetensors.torch import load_file

    after = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "weights.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)), k


# -- optimised DPO paths against full forwards (tiny-gpt2 and tiny-llama) ---------------------------

def test_single_forward_paraphrase_pair_logps_equal_two_full_forwards(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "paraphrase", name, tok)
    ps = label_pair_set(task)
    rows = list(range(len(ps)))
    batch, chosen, rejected, _ = prompt_batch(task, ps, rows)
    rejected = rejected[:, 0]
    with torch.no_grad():
        c1, r1 = next_token_logps(model, batch, chosen, rejected)
        for j, i in enumerate(rows):
            for resp, got in ((ps.chosen[i], c1[j]), (ps.rejected[i], r1[j])):
                seq = pad_batch([ps.prompt[i] + resp], task.pad_id, [i])
                seq.labels = torch.tensor([[-100] * len(ps.prompt[i]) + resp])
                full = plain_token_logps(model, seq).sum()  # a full forward of prompt + response
                assert rel(got, full) < 1e-5


def test_bucketed_sonnet_pair_batches_equal_per_pair_full_forwards(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    ps = sequence_pair_set(task, sonnet_bench_pairs(task))
    ref_c, ref_r = compute_reference_logps(model, task, ps, cfg, CPU, "fp32", adapter_disabled=False)
    with torch.no_grad():
        for i in range(len(ps)):
            b = collate_sequence_pairs(ps, [i], task.pad_id)
            lp = plain_token_logps(model, b).sum(-1)
            assert rel(ref_c[i], lp[0]) < 1e-5 and rel(ref_r[i], lp[1]) < 1e-5


def test_mean_reduction_matches_the_plain_path(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    ps = sequence_pair_set(task, sonnet_bench_pairs(task))
    b = collate_sequence_pairs(ps, [0, 1, 2], task.pad_id)
    with torch.no_grad():
        got = sequence_logps(model, b, "mean")
        lp = plain_token_logps(model, b)
        expected = lp.sum(-1) / (b.labels[:, 1:] != -100).sum(-1)
    assert rel(got, expected) < 1e-5


def test_cached_reference_logps_equal_recomputed_ones(tiny, tiny_data, tmp_path, monkeypatch):
    name, model, tok = tiny
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RunConfig(task="paraphrase", model=name, regime="dpo", batch_size=4, max_train_examples=12, max_dev_examples=4,
                    device="cpu", precision="fp32", **tiny_data["paraphrase"])
    task = make_task(cfg, tok)
    first = build_dpo_objective(StageContext(cfg, task, model, CPU, "fp32", tmp_path / "run1"))
    second = build_dpo_objective(StageContext(cfg, task, model, CPU, "fp32", tmp_path / "run2"))
    assert not first.info["reference_cache_hit"] and second.info["reference_cache_hit"]
    fresh_c, fresh_r = compute_reference_logps(model, task, second.ps, cfg, CPU, "fp32", adapter_disabled=False)
    torch.testing.assert_close(second.ref_chosen, fresh_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second.ref_rejected, fresh_r, rtol=1e-6, atol=1e-6)
    # and the first DPO batch's loss starts at ln 2 (policy == reference) with the cached values
    obj = second
    (batch,) = next(iter(obj.steps(1)))
    with torch.no_grad():
        loss, _ = obj.loss(model, batch)
    assert abs(loss.item() - 0.6931471805599453) < 1e-5


# -- the science: signs, beta, the hand-off reference, which tokens count, TRL's units ------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_loss_and_rewards_on_asymmetric_margins(loss_type):
    """Margins of different sizes and signs, so a flipped sign or a beta applied twice (or not at all)
    changes the numbers (with symmetric margins some of those mistakes cancel out)."""
    pc, pr = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -2.5, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0, -2.0]), torch.tensor([-2.0, -2.0, -2.0])
    beta, eps = 0.3, 0.1
    deltas = [(c - a) - (r - b) for c, a, r, b in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist())]
    assert deltas == [3.0, 0.5, -2.0]
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731  log sigmoid
    per = {
        "sigmoid": [-ls(beta * d) for d in deltas],
        "ipo": [(d - 1 / (2 * beta)) ** 2 for d in deltas],
        "hinge": [max(0.0, 1 - beta * d) for d in deltas],
        "robust": [(-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps) for d in deltas],
    }[loss_type]
    loss, m = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps if loss_type == "robust" else 0.0)
    assert loss.item() == pytest.approx(sum(per) / 3, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (1 + 0 - 1) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(beta * (-2 - 0.5 + 1) / 3)
    assert m["rewards/margins"].item() == pytest.approx(beta * sum(deltas) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)


def test_dpo_training_moves_the_policy_toward_the_chosen_answers(tmp_path):
    """A few DPO epochs from the pretrained model: the policy's margin log pi(chosen) - log pi(rejected)
    grows past the reference's on the training pairs, and the logged rewards say so. (No warm-up: one
    step per epoch here, and a warm-up step at learning rate 0 would leave epoch 2 where epoch 1 was.)"""
    cfg = make_cfg("paraphrase", epochs=4, dpo_lr=1e-3, beta=0.5, batch_size=3, log_every=1, eval_init=False,
                   warmup_ratio=0.0)
    run = Run(cfg, tmp_path / "run")
    run.train()
    ref = built(cfg, tmp_path / "ref")
    ref_c, ref_r = all_pair_logps(ref.model, ref.task)
    from safetensors.torch import load_file

    run.build()
    run.model.load_state_dict(load_file(str(tmp_path / "run" / "checkpoints" / "last" / "weights.safetensors")), strict=False)
    pol_c, pol_r = all_pair_logps(run.model, run.task)
    assert ((pol_c - pol_r) - (ref_c - ref_r)).mean() > 0.1
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    margins = [r["train/rewards/margins"] for r in epochs]
    assert margins[0] == pytest.approx(0, abs=1e-6) and all(a < b for a, b in zip(margins, margins[1:]))
    last = epochs[-1]
    assert last["train/rewards/chosen"] > last["train/rewards/rejected"] and last["train/rewards/accuracies"] > 0.5
    assert last["train/loss"] < epochs[0]["train/loss"]


def test_sft_fft_dpo_reference_is_the_model_at_handoff(tmp_path):
    run = built(make_cfg("paraphrase", param="fft", regime="sft-dpo", epochs=2, handoff_epoch=1), tmp_path / "run")
    with torch.no_grad():  # stands in for the SFT epoch
        for p in run.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    obj = run.objective("dpo", resumed_epoch=1)
    now = all_pair_logps(run.model, run.task)
    base_model, _ = load_model("tiny-gpt2", seed=run.cfg.seed)
    base = all_pair_logps(base_model, run.task)
    torch.testing.assert_close(obj.ref_chosen, now[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(obj.ref_rejected[:, 0], now[1], atol=1e-6, rtol=0)
    assert (obj.ref_chosen - base[0]).abs().max() > 1e-3
    assert obj.describe()["reference"] == "SFT model at hand-off epoch 1"


def test_sequence_logps_count_only_the_response_tokens(tiny, tiny_data):
    """The response log-prob of prompt + response rows of different lengths (right padding) equals the
    sum of log p(response token | everything before it), each pair alone, from the prompt and response
    token lists themselves (not from the batch's label mask)."""
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    ps = sequence_pair_set(task, sonnet_bench_pairs(task))
    rows = [0, 1, 2, 3]
    assert len({len(ps.prompt[i]) + len(ps.chosen[i]) for i in rows}) > 1  # the rows are padded
    with torch.no_grad():
        got = sequence_logps(model, collate_sequence_pairs(ps, rows, task.pad_id), "sum")
        for j, i in enumerate(rows):
            for k, resp in ((j, ps.chosen[i]), (len(rows) + j, ps.rejected[i])):
                ids = torch.tensor([ps.prompt[i] + resp])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                start = len(ps.prompt[i])
                want = sum(logp[start - 1 + t, tok_id] for t, tok_id in enumerate(resp))
                assert rel(got[k], want) < 1e-5


def test_ipo_follows_trl_and_metrics_are_in_trl_units(tmp_path):
    """ipo (logp_reduction auto) divides each log-ratio by its response length, as TRL; the logged
    rewards and log-probs are sums, as TRL logs them, whatever the reduction."""
    run = built(make_cfg("sonnet", loss_type="ipo", beta=0.5), tmp_path / "run")
    obj = run.objective("dpo")
    assert run.cfg.loss_logp_reduction == "mean" and obj.describe()["logp_reduction"] == "mean"
    (batch,) = next(iter(obj.steps(1)))
    run.model.eval()
    with torch.no_grad():
        lp = obj.policy_logps(run.model, batch)
        pc, pr = lp.chosen + 0.3, lp.rejected - 0.2  # as if the policy had moved away from the reference
        obj.policy_logps = lambda model, b: dataclasses.replace(lp, chosen=pc, rejected=pr)
        loss, logs = obj.loss(run.model, batch)
    nc, nr = batch.chosen_len, batch.rejected_len
    assert (nc > 1).all() and not torch.equal(nc, nr)
    delta = (pc - batch.ref_chosen) / nc - (pr - batch.ref_rejected) / nr
    assert loss.item() == pytest.approx(((delta - 1 / (2 * 0.5)) ** 2).mean().item(), rel=1e-5)
    assert logs["rewards/chosen"].item() == pytest.approx(0.5 * 0.3, abs=1e-5)  # beta x summed log-ratio
    assert logs["rewards/rejected"].item() == pytest.approx(0.5 * -0.2, abs=1e-5)
    assert logs["logps/chosen"].item() == pytest.approx(pc.mean().item(), rel=1e-5)
    summed = RunConfig.from_dict({**run.cfg.to_dict(), "logp_reduction": "sum"})
    assert summed.loss_logp_reduction == "sum" and make_cfg("sonnet").loss_logp_reduction == "sum"
