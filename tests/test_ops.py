"""The model-level operations (sftdpo/ops): each optimised path gives the plain path's numbers.

The LM head on target positions only (target_logprobs) against the model's full forward, bucketed
and padded batches against one example at a time, batched KV-cache decoding against the no-cache
loop, top-p from the top-k candidates against HF's warper, merged-LoRA decoding against the adapter.
Tolerances: fp32 paths agree to 1e-5 (relative) with the plain computation; bf16 paths are held
against an fp32 reference (see test_target_logprobs_loss_and_gradients_equal_the_plain_forward).
Tiny models and data written for the tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sftdpo.bench import cs224n_generate, sftdpo_generate_ids, sonnet_bench_pairs
from sftdpo.models import apply_lora, autocast
from sftdpo.objectives.dpo.pairs import collate_sequence_pairs, sequence_pair_set
from sftdpo.ops import logprobs
from sftdpo.ops.batching import bucketed_batches
from sftdpo.ops.generation import TOP_P_CANDIDATES, decode, merged_for_decoding, nucleus
from sftdpo.ops.logprobs import last_token_logits, sequence_logps, target_logprobs

from conftest import make_tiny_task, plain_token_logps, rel

CPU = torch.device("cpu")


# Numeric bounds, from the dtype and the size of what is compared, not from one CPU's rounding:
#   fp32 paths: relative (Frobenius) difference <= 1e-5, ~84 x fp32's epsilon 2^-23: the same sums in
#     another order over at most a few thousand terms (measured ~3e-7 on an AMD EPYC).
#   bf16 autocast: u = 2^-8, bf16's epsilon. Held against the fp32 computation: each bf16 path's
#     gradient is within 4u of it (the operands of every matmul are rounded to bf16; measured 1.5-1.7u
#     on AMD EPYC with AVX2 only, where bf16 is emulated), and the optimised path is at most one
#     rounding (u) less accurate than the plain one: it keeps the logits' gradient in bf16, which
#     autocast's own matmul backward also rounds it to. CPUs with AVX512-BF16 or AMX round in
#     different places (the 0.0069 element-wise gap seen on AMX is 1.8u), which these bounds allow.
FP32_REL = 1e-5
BF16_U = 2.0 ** -8


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the Frobenius norm (0 when both are 0)."""
    return float((a - b).float().norm() / b.float().norm().clamp(min=1e-30)) if b.norm() > 0 else float((a - b).norm())


def loss_and_grads(model, batch, precision: str, path: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with autocast(CPU, precision):
        if path == "plain":
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            loss = -target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)[0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_target_logprobs_loss_and_gradients_equal_the_plain_forward(tiny, tiny_data, precision):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    batch = task.collate([0, 1, 2])
    batch.labels[:, :5] = -100  # a prompt part, as DPO responses have
    ref_loss, ref = loss_and_grads(model, batch, "fp32", "plain")
    plain_loss, plain = loss_and_grads(model, batch, precision, "plain")
    opt_loss, opt = loss_and_grads(model, batch, precision, "optimised")
    assert set(opt) == set(ref)
    if precision == "fp32":
        assert norm_rel(opt_loss, ref_loss) <= FP32_REL
        for n in ref:
            assert norm_rel(opt[n], ref[n]) <= FP32_REL, n
        return
    assert norm_rel(opt_loss, ref_loss) <= BF16_U and norm_rel(plain_loss, ref_loss) <= BF16_U
    for n in ref:
        e_plain, e_opt = norm_rel(plain[n], ref[n]), norm_rel(opt[n], ref[n])
        assert e_plain <= 4 * BF16_U and e_opt <= 4 * BF16_U, (n, e_plain, e_opt)
        assert e_opt <= e_plain + BF16_U, (n, e_plain, e_opt)


def test_sonnet_sft_loss_is_the_mean_token_cross_entropy(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    batch = task.collate([3, 1, 4])
    with torch.no_grad():
        loss, _ = task.sft_loss(model, batch)
        lp = plain_token_logps(model, batch)
        expected = -lp.sum() / (batch.labels[:, 1:] != -100).sum()
    assert rel(loss, expected) < 1e-5


def test_head_chunk_size_does_not_change_the_result(tiny, tiny_data, monkeypatch):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    batch = task.collate([0, 1, 2])
    out = []
    for chunk in (7, 4096):
        monkeypatch.setitem(logprobs._HEAD_CHUNK_ROWS, "cpu", chunk)
        loss = -target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)[0].mean()
        loss.backward()
        out.append((loss.detach(), model.get_output_embeddings().weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    assert rel(out[0][0], out[1][0]) < 1e-6 and rel(out[0][1], out[1][1]) < 1e-5


def per_example_sonnet_losses(model, task, batches) -> dict[int, float]:
    out = {}
    with torch.no_grad():
        for rows in batches:
            b = task.collate(rows)
            lp, r = target_logprobs(model, b.input_ids, b.attention_mask, b.labels)
            for j, i in enumerate(rows):
                out[i] = -lp[r == j].mean()
    return out


def test_bucketed_and_unbucketed_batches_give_the_same_per_example_losses(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    n = len(task.train_ids)
    bucketed = bucketed_batches(task.train_lengths(), 4, seed=7)
    unbucketed = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    alone = [[i] for i in range(n)]
    a, b, c = (per_example_sonnet_losses(model, task, x) for x in (bucketed, unbucketed, alone))
    assert sorted(a) == sorted(b) == list(range(n))
    assert len({len(task.train_ids[i]) for i in range(n)}) > 1  # the batches really are padded
    for i in range(n):
        assert rel(a[i], c[i]) < 1e-5 and rel(b[i], c[i]) < 1e-5


def test_bucketed_paraphrase_batches_give_the_same_per_example_logits(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "paraphrase", name, tok)
    n = len(task.train_ids)
    with torch.no_grad():
        alone = {i: last_token_logits(model, task.collate([i]))[0] for i in range(n)}
        for rows in bucketed_batches(task.train_lengths(), 4, seed=3):
            logits = last_token_logits(model, task.collate(rows))
            for j, i in enumerate(rows):
                assert rel(logits[j], alone[i]) < 1e-5


@pytest.mark.parametrize("task_name", ["paraphrase", "sonnet"])
def test_bf16_autocast_loss_is_within_1e_2_of_fp32(tiny, tiny_data, task_name):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, task_name, name, tok)
    batch = task.collate(list(range(4)))
    with torch.no_grad():
        losses = {}
        for precision in ("fp32", "bf16"):
            with autocast(CPU, precision):
                losses[precision] = task.sft_loss(model, batch)[0].float()
    assert rel(losses["bf16"], losses["fp32"]) < 1e-2
    if task_name == "sonnet":
        ps = sequence_pair_set(task, sonnet_bench_pairs(task))
        b = collate_sequence_pairs(ps, [0, 1], task.pad_id)
        with torch.no_grad():
            lp = {}
            for precision in ("fp32", "bf16"):
                with autocast(CPU, precision):
                    lp[precision] = sequence_logps(model, b)
        assert rel(lp["bf16"], lp["fp32"]) < 1e-2


def test_kv_cache_greedy_generation_equals_the_no_cache_loop(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok)
    prompts = [task.prompt_text(s) for s in task.train[:4]]
    prompts.append("Shall I compare thee\n")  # a much shorter prompt: left padding in the batch
    batched = sftdpo_generate_ids(task, model, prompts, device=CPU, precision="fp32", max_new_tokens=16,
                                        batch_size=len(prompts))
    for p, got in zip(prompts, batched):
        ids = tok(p, add_special_tokens=False).input_ids
        loop = cs224n_generate(model, ids, max_new_tokens=16, eos_token_id=tok.eos_token_id, device=CPU,
                                     precision="fp32")
        assert got == loop
        assert len(loop) > 0


def test_lora_decodes_merged_with_the_same_tokens_and_leaves_the_model_untouched(tiny, tiny_data):
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "sonnet", name, tok, param="lora", lora_targets="all-linear")
    lora = apply_lora(copy.deepcopy(model), cfg).eval()
    with torch.no_grad():  # a non-zero adapter (B starts at zero)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    before = {n: p.clone() for n, p in lora.state_dict().items()}
    prompts = [task.prompt_text(s) for s in task.train[:4]]
    merged = task.generate_ids(lora, prompts, CPU, "fp32", temperature=0.0, top_p=1.0, max_new_tokens=12)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    unmerged = []
    for i in ids:  # the adapter applied layer by layer, one prompt at a time
        unmerged += decode(lora, torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long), max_new_tokens=12,
                           temperature=0.0, top_p=1.0, eos_id=tok.eos_token_id)
    assert merged == unmerged and any(merged)
    assert all(torch.equal(before[n], p) for n, p in lora.state_dict().items())  # no merge/unmerge drift
    assert merged_for_decoding(lora) is not lora
    with lora.disable_adapter():
        assert merged_for_decoding(lora) is lora  # adapter off: the base model decodes as is


@pytest.mark.parametrize("scale", [4.0, 0.01])  # peaked: the first candidates hold top_p; flat: more are needed
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_nucleus_keeps_the_same_tokens_as_hf_top_p(scale, top_p):
    """The nucleus against HF's TopPLogitsWarper: the same tokens, their softmax probabilities, and only as
    many candidate columns as the largest nucleus needs. Catches a token too many or too few at the edge,
    renormalised or tempered probabilities, and a candidate loop that never stops early (every step a full
    vocabulary sort: the same tokens, the cost the candidates exist to save)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale  # no ties at the edge
    p, idx = nucleus(logits, top_p)
    hf = TopPLogitsWarper(top_p)(None, logits.clone())
    for r in range(logits.size(0)):
        ours = set(idx[r][p[r] > 0].tolist())
        assert ours == set(torch.nonzero(hf[r] > -float("inf")).flatten().tolist())
        assert torch.allclose(p[r][p[r] > 0], logits[r].softmax(-1)[idx[r][p[r] > 0]])
    assert (p > 0).sum(-1).max() > TOP_P_CANDIDATES[0] if scale < 1 else (p > 0).sum(-1).max() < TOP_P_CANDIDATES[0]
    # the fast path: only as many candidates as the largest nucleus needs (not the full sort every time)
    largest = int((hf > -float("inf")).sum(-1).max())
    assert p.size(-1) == next(k for k in (*TOP_P_CANDIDATES, logits.size(-1)) if k >= largest)
