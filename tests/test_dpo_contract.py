"""DPO contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles are closed forms written from the papers (IPO's length-normalised square) or plain
probability arithmetic on transformers' own logits (WPO's Σ p²), never the module's own helpers.
"""

from types import SimpleNamespace

import pytest
import torch

from conftest import require_tiny_gpt2, write_jsonl
from sftdpo.objectives.dpo.loss import dpo_loss
from sftdpo.objectives.dpo.policy import wpo_means


def test_dpo_loss_hands_its_options_to_the_loss():
    """dpo_loss's keyword options (response lengths, WPO weights, f-divergence, ...) reach the loss:
    IPO divides each score by its response's length. Catches the options dropped on the way to
    combined_loss (the loss then divides by 1)."""
    pc, pr = torch.tensor([-3.0, -8.0]), torch.tensor([-6.0, -5.0])
    rc, rr = torch.tensor([-4.0, -7.0]), torch.tensor([-5.0, -6.0])
    nc, nr, beta = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 1.0]), 0.5
    loss, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_len=nc, rejected_len=nr)
    want = sum(((float(pc[i] - rc[i]) / float(nc[i]) - float(pr[i] - rr[i]) / float(nr[i]) - 1 / (2 * beta)) ** 2)
               for i in range(2)) / 2
    unnormalised = sum((float(pc[i] - rc[i] - pr[i] + rr[i]) - 1 / (2 * beta)) ** 2 for i in range(2)) / 2
    assert abs(want - unnormalised) > 0.5  # the lengths matter in this case
    assert float(loss) == pytest.approx(want, rel=1e-6)
    weighted, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_len=nc, rejected_len=nr, weights=torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(((float(pc[0] - rc[0]) / 2 - float(pr[0] - rr[0]) / 3 - 1.0) ** 2) / 2, rel=1e-6)


def test_wpo_means_are_the_mean_log_ratio_to_the_sum_of_squared_probabilities(cache):
    """WPO's per-response weight exponent (Zhou et al. 2024, Eq. 2): the mean over response tokens of
    log p(y_t) - log Σ_v p(v)², here from transformers' logits in float64 with the squares summed
    directly. Catches a flipped sign or a wrong factor in the log Σ p² term (2·logits, the 2 on the
    normaliser), a mean over the prompt's tokens, or the padded positions counted."""
    require_tiny_gpt2()
    from sftdpo.models import load_model

    model, _ = load_model("tiny-gpt2", seed=3)
    model.eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # a padded row
    labels = torch.full_like(input_ids, -100)
    starts, ends = [4, 2, 6], [9, 7, 9]
    for r, (s, e) in enumerate(zip(starts, ends)):
        labels[r, s:e] = input_ids[r, s:e]
    got = wpo_means(model, SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask, labels=labels))

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    p = torch.softmax(logits, -1)
    want = []
    for r, (s, e) in enumerate(zip(starts, ends)):
        terms = [torch.log(p[r, t - 1, input_ids[r, t]]) - torch.log((p[r, t - 1] ** 2).sum()) for t in range(s, e)]
        want.append(float(torch.stack(terms).mean()))
    # each term is a difference of two ~11-nat float32 log-sum-exps over GPT-2's 50,257 tokens; against
    # float64 they differ by about a float32 ulp of 11 (9.5e-7; measured 3.6e-7 here): 1e-4 is far above that
    # and below what each wrong term of tests/mutation-killed.yaml moves (all four fail it)
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3  # rows differ: a constant would not pass


def test_a_micro_batchs_share_of_a_dpo_step_counts_its_pairs(cache, tmp_path):
    """With gradient accumulation, each micro-batch's share of its optimizer step is its pairs over the
    step's pairs (a cloze prompt holds one pair per rejected label, here 1 or 2), so that batch B x
    accumulation k trains as batch kB. Catches shares counted in prompts (rows) instead of pairs."""
    from sftdpo.config import RunConfig
    from sftdpo.models import load_model
    from sftdpo.objectives.dpo import DPOObjective
    from sftdpo.objectives.dpo.pairs import PairSet
    from sftdpo.tasks import make_task

    rows = [{"text": f"{w} {i}", "label": i % 3} for i, w in enumerate(["dog", "coin", "rain"] * 4)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    write_jsonl(tmp_path / "d.jsonl", [dict(r, text=r["text"] + "!") for r in rows[:3]])
    _, tok = load_model("tiny-llama")
    cfg = RunConfig(task="classify", template="Topic of: {text}\nAnswer:", labels="0=animal,1=money,2=weather",
                    train=str(tmp_path / "t.jsonl"), dev=str(tmp_path / "d.jsonl"), model="tiny-llama", device="cpu",
                    precision="fp32", batch_size=2, grad_accum=3, regime="dpo")
    task = make_task(cfg, tok)
    ids = list(task.label_ids)
    n = len(task.train_ids)
    gold = [task.train_labels[i] for i in range(n)]
    rejected = [[t for t in ids if t != gold[i]][: 1 + i % 2] for i in range(n)]  # 1 or 2 pairs per prompt
    ps = PairSet([list(p) for p in task.train_ids], [[g] for g in gold], rejected)
    obj = DPOObjective(cfg, task, ps, torch.zeros(n), torch.zeros(n, 2), {})
    steps = list(obj.steps(0))
    assert any(len(step) > 1 for step in steps)
    unequal = 0
    for step in steps:
        pairs = [int(pb.mask.sum()) for pb in step]
        assert [pb.batch.share for pb in step] == pytest.approx([p / sum(pairs) for p in pairs])
        assert pairs == [sum(len(rejected[int(r)]) for r in pb.batch.index) for pb in step]
        unequal += len({p / len(pb.batch.index) for p, pb in zip(pairs, step)}) > 1
    assert unequal  # some step mixes micro-batches of different pairs per prompt: rows would give other shares
