"""DPO contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles are closed forms written from the papers (IPO's length-normalised square) or plain
probability arithmetic on transformers' own logits (WPO's Σ p²), never the module's own helpers.
"""

import contextlib
import math
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


def test_the_hardest_rejection_is_the_wrong_label_the_model_rates_highest_and_ties_go_to_the_earlier():
    """`--pairs hardest` (pairs.hardest_rejections): per example, the wrong label with the highest log-prob;
    on a tie the label listed first (the docstring's rule, so a rerun builds the same pairs). Catches the
    tie broken towards the later label, the gold label picked, or the lowest wrong label."""
    from sftdpo.objectives.dpo.pairs import hardest_rejections

    task = SimpleNamespace(label_ids=[11, 22, 33, 44], train_labels=[11, 22, 44, 33])
    logps = torch.tensor([[0.0, -2.0, -1.0, -3.0],     # gold 11 is highest: the best wrong one is 33
                          [-1.0, -0.1, -1.0, -5.0],    # 11 and 33 tie: the earlier, 11
                          [-4.0, -2.0, -2.0, -0.5],    # 22 and 33 tie: 22
                          [-3.0, -6.0, -9.0, -3.0]])   # 11 and 44 tie: 11
    assert hardest_rejections(task, logps) == [[33], [11], [22], [11]]


def test_v3_ties_follow_sample_order_and_absent_indices_follow_the_list():
    """select_top_k's tie-breaks as its docstring states them: equal gaps go by prompt_index, then by
    sample_index (whatever order the list holds them in); a pair without prompt_index takes its list
    position, one without sample_index counts as sample 0; k = 0 keeps nothing. Catches a tie-break
    dropped (the list order decides instead), a changed default, or a floor of one pair."""
    from sftdpo.objectives.dpo.pairs import select_top_k

    def pair(i, j, gap):
        return {"prompt": f"p{i}", "chosen": "c", "rejected": f"r{i}{j}", "prompt_index": i, "sample_index": j, "gap": gap}

    listed = [pair(1, 2, 40.0), pair(1, 0, 40.0), pair(0, 1, 40.0), pair(1, 1, 40.0), pair(0, 0, 40.0)]
    assert [(p["prompt_index"], p["sample_index"]) for p in select_top_k(listed, 5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    no_prompt_index = [{"prompt": "a", "sample_index": 1, "gap": 5.0}, {"prompt": "b", "sample_index": 0, "gap": 5.0}]
    assert [p["prompt"] for p in select_top_k(no_prompt_index, 2)] == ["a", "b"]  # list position before sample order
    mixed = [pair(0, 1, 5.0), {"prompt": "p0", "prompt_index": 0, "gap": 5.0}, pair(0, 0, 5.0)]
    assert [p.get("sample_index", "absent") for p in select_top_k(mixed, 3)] == ["absent", 0, 1]  # absent = sample 0, list order
    assert select_top_k(listed, 0) == []


def test_sampled_rejections_use_the_documented_seeds_temperatures_and_the_run_precision():
    """pairs._generate_pairs (v2/v3): sample j of each prompt is drawn at temperature temps[j mod len] in one
    generate call per temperature, with seed cfg.seed + 1000·g (what the pair file's header records), in the
    run's precision; gap = 100 - sentence chrF (sacrebleu) of the rejection against the gold completion.
    Catches another seed rule or the seed not passed (the header then names seeds nobody drew with), the
    precision dropped (a bf16 run's pairs sampled in fp32), or samples filed under the wrong temperature."""
    import sacrebleu

    from sftdpo.config import RunConfig
    from sftdpo.objectives.dpo.pairs import PAIR_SEED_STRIDE, _generate_pairs

    calls = []

    def generate(model, prompts, device, precision, *, temperature, top_p, max_new_tokens, num_samples=1, seed=0, batch_size=None):
        calls.append(dict(precision=precision, temperature=temperature, num_samples=num_samples, seed=seed))
        return [[f"{p} at {temperature} draw {k}" for k in range(num_samples)] for p in prompts]

    examples = [SimpleNamespace(id="a", prompt="shall I compare", completion="thee to a summer's day"),
                SimpleNamespace(id="b", prompt="when forty winters", completion="shall besiege thy brow"),
                SimpleNamespace(id="c", prompt="an empty gold", completion="")]  # gap 100: chrF against nothing is 0
    task = SimpleNamespace(pair_examples=examples, generate=generate)
    cfg = RunConfig(task="sonnet", regime="dpo", pairs="v2", pairs_n=5, pairs_temperatures=(0.5, 1.0), seed=7)
    pairs, seeds = _generate_pairs(task, None, cfg, torch.device("cpu"), "bf16", [0.5, 1.0], 5)
    assert PAIR_SEED_STRIDE == 1000 and seeds == [7, 1007]
    assert calls == [dict(precision="bf16", temperature=0.5, num_samples=3, seed=7),
                     dict(precision="bf16", temperature=1.0, num_samples=2, seed=1007)]
    assert [(p["id"], p["sample_index"], p["temperature"], p["rejected"]) for p in pairs[:5]] == [
        ("a", 0, 0.5, "shall I compare at 0.5 draw 0"), ("a", 1, 1.0, "shall I compare at 1.0 draw 0"),
        ("a", 2, 0.5, "shall I compare at 0.5 draw 1"), ("a", 3, 1.0, "shall I compare at 1.0 draw 1"),
        ("a", 4, 0.5, "shall I compare at 0.5 draw 2")]
    assert [p["prompt_index"] for p in pairs] == [0] * 5 + [1] * 5 + [2] * 5
    assert [p["gap"] for p in pairs[10:]] == [100.0] * 5 and all(p["gap"] < 100.0 for p in pairs[:10])
    for p in pairs:
        want = 100.0 - sacrebleu.sentence_chrf(p["rejected"], [p["chosen"]]).score
        assert p["gap"] == pytest.approx(want, abs=1e-9)


def test_sampled_pairs_are_cached_per_precision_and_the_header_says_how_they_were_made(tmp_path):
    """build_generation_pairs: the cache key holds the run's precision (bf16 and fp32 samples differ, so
    a bf16 run must not reuse fp32 pairs), the second ask of the same construction reads the file
    instead of sampling, the header counts what the file holds and names the generator, and the model
    is left in the training mode it came in (a model left in eval mode trains without dropout).
    Catches the precision left out of the key, a cache that never hits, or a wrong header count."""
    from sftdpo.config import RunConfig, cache_dir_at
    from sftdpo.objectives.dpo.pairs import build_generation_pairs, read_pairs

    calls, modes = [], []

    def generate(model, prompts, device, precision, *, temperature, top_p, max_new_tokens, num_samples=1, seed=0,
                 batch_size=None):
        calls.append(precision)
        return [[f"{p} in {precision}" for _ in range(num_samples)] for p in prompts]

    class Model:
        training = True

        def train(self, mode=True):
            modes.append(mode)
            self.training = mode

        def disable_adapter(self):
            modes.append("adapter off")
            return contextlib.nullcontext()

    examples = [SimpleNamespace(id=str(i), prompt=f"line {i}", completion=f"gold {i}") for i in range(3)]
    task = SimpleNamespace(pair_examples=examples, generate=generate)
    cfg = RunConfig(task="sonnet", regime="dpo", pairs="v1", seed=5)
    cpu = torch.device("cpu")
    with cache_dir_at(tmp_path):
        bf16, path_bf16 = build_generation_pairs(task, Model(), cfg, cpu, "bf16", fingerprint="w")
        fp32, path_fp32 = build_generation_pairs(task, Model(), cfg, cpu, "fp32", fingerprint="w")
        again, path_again = build_generation_pairs(task, Model(), cfg, cpu, "bf16", fingerprint="w")
        base, path_base = build_generation_pairs(task, Model(), cfg, cpu, "fp16", fingerprint="w", adapter_disabled=True)
    assert calls == ["bf16", "fp32", "fp16"] and path_bf16 != path_fp32 and path_again == path_bf16 and again == bf16
    assert [p["rejected"] for p in bf16] == ["line 0 in bf16", "line 1 in bf16", "line 2 in bf16"]
    header, stored = read_pairs(path_bf16, "x")
    assert stored == bf16 and header["precision"] == "bf16" and header["pairs"] == 3 == header["train_prompts"]
    assert header["unique_prompts"] == 3 and header["seeds"] == [5] and header["generator"] == "policy at hand-off"
    assert read_pairs(tmp_path / "pairs" / f"{header['key']}.jsonl", "x")[1] == bf16
    assert modes == [True, True, "adapter off", True]  # each build left the model training
    assert [p["rejected"] for p in base] == ["line 0 in fp16", "line 1 in fp16", "line 2 in fp16"]
    assert read_pairs(path_base, "x")[0]["generator"] == "adapter-disabled base"


def test_the_loss_functions_defaults_are_plain_dpo_and_trl_s_alpha():
    """f_scores and dpo_losses called with their defaults: reverse KL (the log-ratios unchanged), the sigmoid
    loss -log σ(βΔ) without label smoothing, and for the alpha divergence α = 0.5 (TRL's
    f_alpha_divergence_coef default): f'(t) = (t^(α-1) - 1)/(α-1) in closed form. Catches another default
    divergence, loss type, smoothing or α for callers that leave them out."""
    from sftdpo.objectives.dpo.loss import dpo_losses, f_scores

    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([-3.0, -8.0], [-6.0, -5.0], [-4.5, -7.0], [-5.0, -6.0]))
    want = [-math.log(1 / (1 + math.exp(-0.5 * float(pc[i] - rc[i] - pr[i] + rr[i])))) for i in range(2)]
    assert dpo_losses(pc, pr, rc, rr, 0.5).tolist() == pytest.approx(want, rel=1e-12)
    assert dpo_losses(pc, pr, rc, rr, 0.5, "robust").tolist() == pytest.approx(want, rel=1e-12)  # ε = 0: rDPO is DPO
    d = [float(pc[i] - rc[i] - pr[i] + rr[i]) for i in range(2)]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pop = [-math.log(sig(0.5 * x)) * (1 - sig(0.5 * x / 0.05)) + math.exp(-0.5 * x) * sig(0.5 * x / 0.05) for x in d]
    assert dpo_losses(pc, pr, rc, rr, 0.5, "discopop").tolist() == pytest.approx(pop, rel=1e-12)  # TRL's τ = 0.05
    f = lambda lr: (math.exp(-0.5 * lr) - 1.0) / -0.5  # noqa: E731  α = 0.5
    fa = [-math.log(sig(0.5 * (f(float(pc[i] - rc[i])) - f(float(pr[i] - rr[i]))))) for i in range(2)]
    assert dpo_losses(pc, pr, rc, rr, 0.5, f_divergence_type="alpha_divergence").tolist() == pytest.approx(fa, rel=1e-5)

    c, r = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([-0.7, 2.0], dtype=torch.float64)
    sc, sr = f_scores(c, r)
    assert torch.equal(sc, c) and torch.equal(sr, r)
    ac, ar = f_scores(c, r, "alpha_divergence")
    for got, lr in ((ac, c), (ar, r)):
        want = [(math.exp(-0.5 * float(x)) - 1.0) / -0.5 for x in lr]
        assert got.tolist() == pytest.approx(want, rel=1e-5)  # computed in float32 (the clamp path), exp(x) - 1 cancels


def test_alpha_divergence_limits_are_trl_s():
    """The alpha divergence at its edges, as TRL 1.16's DPOTrainer computes it: α = 1 is the limit f'(t) = log t
    (the log-ratios themselves, not 0/0), and the exponent (α-1)·log-ratio is capped at 11 in float16 and 80 in
    float32 so that exp stays finite. Catches the limit case tested at another α (NaN scores at α = 1), or
    another cap (inf in float16, another constant in float32)."""
    from sftdpo.objectives.dpo.loss import f_scores

    c, r = torch.tensor([0.3, -1.2]), torch.tensor([-0.7, 2.0])
    sc, sr = f_scores(c, r, "alpha_divergence", 1.0)
    assert torch.equal(sc, c) and torch.equal(sr, r)
    for dtype, cap in ((torch.float16, 11.0), (torch.float32, 80.0)):
        lr = torch.tensor([100.0, 0.0], dtype=dtype)  # α = 3: (α-1)·lr = 200, past every cap; 1/(α-1) keeps it finite
        got, _ = f_scores(lr, lr, "alpha_divergence", 3.0)
        want = (torch.tensor(math.exp(cap) - 1.0, dtype=dtype) / 2.0).item()
        assert got.dtype == dtype and math.isfinite(got[0].item()) and got[0].item() == pytest.approx(want, rel=1e-3)
        assert got[1].item() == 0.0


def test_combined_loss_reads_loss_type_text_and_defaults_to_trls_plain_dpo():
    """combined_loss as dpo_loss hands it --loss-type's text: "sigmoid,bco_pair" is the sum of the two loss
    types' batch means (TRL's multi-loss, weights 1), each in closed form here; called without a loss type
    or smoothing it is TRL's default DPO loss, the mean of -log σ(βΔ). Catches the text split on anything
    but commas, another default loss type or a default label smoothing."""
    from sftdpo.objectives.dpo.loss import combined_loss

    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([-3.0, -8.0], [-6.0, -5.0], [-4.5, -7.0], [-5.0, -6.0]))
    beta = 0.3
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    cw, cl = [float(pc[i] - rc[i]) for i in range(2)], [float(pr[i] - rr[i]) for i in range(2)]
    sigmoid = sum(-logsig(beta * (w - lo)) for w, lo in zip(cw, cl)) / 2
    bco = sum(-logsig(beta * w) - logsig(-beta * lo) for w, lo in zip(cw, cl)) / 2
    assert float(combined_loss(pc, pr, rc, rr, beta)) == pytest.approx(sigmoid, rel=1e-12)
    assert float(combined_loss(pc, pr, rc, rr, beta, "sigmoid,bco_pair")) == pytest.approx(sigmoid + bco, rel=1e-12)


def test_the_sft_term_averages_over_whichever_chosen_tokens_it_is_given():
    """The sft loss type is minus the batch's chosen log-prob per chosen token: sft_logps over sft_tokens
    when given (DPOObjective's plain sums and counts), else policy_chosen over chosen_len, else over one
    per response; the same value for every pair. Catches a fallback that ignores what it is given (the
    counts of one source with the log-probs of another, or 1 per response when lengths are known)."""
    from sftdpo.objectives.dpo.loss import dpo_losses

    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([-3.0, -8.0], [-6.0, -5.0], [-4.5, -7.0], [-5.0, -6.0]))
    nc = torch.tensor([2.0, 5.0], dtype=torch.float64)
    plain, tokens = torch.tensor([-2.5, -9.0], dtype=torch.float64), torch.tensor([3.0, 6.0], dtype=torch.float64)
    for kw, want in (({}, 11.0 / 2), (dict(chosen_len=nc), 11.0 / 7),
                     (dict(chosen_len=nc, sft_logps=plain, sft_tokens=tokens), 11.5 / 9)):
        assert dpo_losses(pc, pr, rc, rr, 0.3, "sft", **kw).tolist() == pytest.approx([want, want], rel=1e-12), kw
