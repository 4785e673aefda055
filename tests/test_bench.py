"""`sftdpo bench` and the optimised paths it measures: each optimisation gives the plain path's numbers.

Tolerances: fp32 paths agree to 1e-5 (relative) with the plain computation; bf16 autocast losses
agree with fp32 to 1e-2 (relative); greedy KV-cache generation equals the no-cache loop exactly;
the top-p nucleus from the top-k candidates keeps exactly HF's TopPLogitsWarper tokens
(tiny models, fp32). Tiny models and the fixture data only, except the smoke test of the bench
itself, which uses the data directory's files like the bench does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sftdpo import bench, dpo
from sftdpo.config import RunConfig
from sftdpo.models import autocast, load_model
from sftdpo.tasks import Batch, bucketed_batches, last_token_logits, make_task, pad_batch, target_logprobs

from conftest import require_tiny_gpt2, write_synthetic_qqp

FIX = Path(__file__).parent / "fixtures" / "data"
CPU = torch.device("cpu")
DATA: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def data_files(tmp_path_factory):
    """Twelve sonnets of 5 to 10 lines (so batches need padding) and 16 QQP pairs, written for these tests."""
    d = tmp_path_factory.mktemp("bench-data")
    lines = [ln.strip() for ln in (FIX / "sonnets" / "sonnets.txt").read_text().splitlines()
             if ln.strip() and not ln.strip().isdigit()][3:]
    chunks = []
    for i in range(12):
        n = 5 + (i * 7) % 6
        chunks.append(f"{i + 1}\n\n" + "\n".join(lines[(i + j) % len(lines)] for j in range(n)))
    (d / "sonnets.txt").write_text("Header\n\n" + "\n\n".join(chunks) + "\n")
    (d / "dev.txt").write_text("Header\n\n" + "\n\n".join(chunks[:3]) + "\n")
    write_synthetic_qqp(d / "train.csv", 16, seed=1)
    write_synthetic_qqp(d / "dev.csv", 8, seed=2)
    DATA["paraphrase"] = dict(train=str(d / "train.csv"), dev=str(d / "dev.csv"))
    DATA["sonnet"] = dict(train=str(d / "sonnets.txt"), dev=str(d / "dev.txt"))
    return d


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny(request, cache):
    if request.param == "tiny-gpt2":
        require_tiny_gpt2()
    model, tok = load_model(request.param, seed=1)
    model.eval()  # dropout off: the paths are compared on the same function
    return request.param, model, tok


def make(task: str, model: str, tok, **kw):
    cfg = RunConfig(task=task, model=model, batch_size=4, max_train_examples=12, max_dev_examples=4, device="cpu",
                    precision="fp32", **{**DATA[task], **kw})
    return cfg, make_task(cfg, tok)


def plain_token_logps(model, batch: Batch) -> torch.Tensor:
    """The plain path: the model's full forward, fp32 log-softmax over every position, (B, L-1), 0 where ignored."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    target = batch.labels[:, 1:]
    mask = target != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return lp * mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ------------------------------------------------------------------------------------------------
# The LM head on target positions only (sonnet SFT loss, DPO sequence log-probs)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_target_logprobs_loss_and_gradients_equal_the_plain_forward(tiny, precision):
    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    batch = task.collate([0, 1, 2])
    batch.labels[:, :5] = -100  # a prompt part, as DPO responses have
    grads = {}
    losses = {}
    for path in ("plain", "optimised"):
        with autocast(CPU, precision):
            if path == "plain":
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1), ignore_index=-100)
            else:
                loss = -target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)[0].mean()
        loss.backward()
        losses[path] = loss.detach()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    # bf16: both paths round the logits' gradient to bf16; an element may land one bf16 step apart
    tol, gtol = (1e-5, 1e-5) if precision == "fp32" else (1e-4, 5e-3)
    assert rel(losses["optimised"], losses["plain"]) < tol
    for n, g in grads["plain"].items():
        assert rel(grads["optimised"][n], g) < gtol, n


def test_sonnet_sft_loss_is_the_mean_token_cross_entropy(tiny):
    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    batch = task.collate([3, 1, 4])
    with torch.no_grad():
        loss, _ = task.sft_loss(model, batch)
        lp = plain_token_logps(model, batch)
        expected = -lp.sum() / (batch.labels[:, 1:] != -100).sum()
    assert rel(loss, expected) < 1e-5


# ------------------------------------------------------------------------------------------------
# Bucketing: an example's loss does not depend on the batch it is in
# ------------------------------------------------------------------------------------------------


def per_example_sonnet_losses(model, task, batches) -> dict[int, float]:
    out = {}
    with torch.no_grad():
        for rows in batches:
            b = task.collate(rows)
            lp, r = target_logprobs(model, b.input_ids, b.attention_mask, b.labels)
            for j, i in enumerate(rows):
                out[i] = -lp[r == j].mean()
    return out


def test_bucketed_and_unbucketed_batches_give_the_same_per_example_losses(tiny):
    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    n = len(task.train_ids)
    bucketed = bucketed_batches(task.train_lengths(), 4, seed=7)
    unbucketed = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    alone = [[i] for i in range(n)]
    a, b, c = (per_example_sonnet_losses(model, task, x) for x in (bucketed, unbucketed, alone))
    assert sorted(a) == sorted(b) == list(range(n))
    assert len({len(task.train_ids[i]) for i in range(n)}) > 1  # the batches really are padded
    for i in range(n):
        assert rel(a[i], c[i]) < 1e-5 and rel(b[i], c[i]) < 1e-5


def test_bucketed_paraphrase_batches_give_the_same_per_example_logits(tiny):
    name, model, tok = tiny
    cfg, task = make("paraphrase", name, tok)
    n = len(task.train_ids)
    with torch.no_grad():
        alone = {i: last_token_logits(model, task.collate([i]))[0] for i in range(n)}
        for rows in bucketed_batches(task.train_lengths(), 4, seed=3):
            logits = last_token_logits(model, task.collate(rows))
            for j, i in enumerate(rows):
                assert rel(logits[j], alone[i]) < 1e-5


# ------------------------------------------------------------------------------------------------
# DPO: single-forward label pairs, bucketed pair batches, cached reference log-probs
# ------------------------------------------------------------------------------------------------


def test_single_forward_paraphrase_pair_logps_equal_two_full_forwards(tiny):
    name, model, tok = tiny
    cfg, task = make("paraphrase", name, tok)
    ps = dpo.paraphrase_pair_set(task)
    rows = list(range(len(ps)))
    batch, chosen_is_yes = dpo._paraphrase_batch(task, ps, rows)
    with torch.no_grad():
        c1, r1 = dpo.paraphrase_pair_logps(model, batch, task.yes_id, task.no_id, chosen_is_yes)
        for j, i in enumerate(rows):
            for resp, got in ((ps.chosen[i], c1[j]), (ps.rejected[i], r1[j])):
                seq = pad_batch([ps.prompt[i] + resp], task.pad_id, [i])
                seq.labels = torch.tensor([[-100] * len(ps.prompt[i]) + resp])
                full = plain_token_logps(model, seq).sum()  # a full forward of prompt + response
                assert rel(got, full) < 1e-5


def sonnet_pairs(task) -> dpo.PairSet:
    return dpo.sonnet_pair_set(task, bench.sonnet_bench_pairs(task))


def test_bucketed_sonnet_pair_batches_equal_per_pair_full_forwards(tiny):
    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    ps = sonnet_pairs(task)
    ref_c, ref_r = dpo.compute_reference_logps(model, task, ps, cfg, CPU, "fp32", adapter_disabled=False)
    with torch.no_grad():
        for i in range(len(ps)):
            b = dpo.collate_sequence_pairs(ps, [i], task.pad_id)
            lp = plain_token_logps(model, b).sum(-1)
            assert rel(ref_c[i], lp[0]) < 1e-5 and rel(ref_r[i], lp[1]) < 1e-5


def test_mean_reduction_matches_the_plain_path(tiny):
    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    ps = sonnet_pairs(task)
    b = dpo.collate_sequence_pairs(ps, [0, 1, 2], task.pad_id)
    with torch.no_grad():
        got = dpo.sequence_logps(model, b, "mean")
        lp = plain_token_logps(model, b)
        expected = lp.sum(-1) / (b.labels[:, 1:] != -100).sum(-1)
    assert rel(got, expected) < 1e-5


def test_cached_reference_logps_equal_recomputed_ones(tiny, tmp_path, monkeypatch):
    name, model, tok = tiny
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RunConfig(task="paraphrase", model=name, regime="dpo", batch_size=4, max_train_examples=12, max_dev_examples=4,
                    device="cpu", precision="fp32", **DATA["paraphrase"])
    task = make_task(cfg, tok)
    first = dpo.make_dpo_objective(SimpleNamespace(cfg=cfg, task=task, model=model, device=CPU, precision="fp32",
                                                   out=tmp_path / "run1", is_main=True))
    second = dpo.make_dpo_objective(SimpleNamespace(cfg=cfg, task=task, model=model, device=CPU, precision="fp32",
                                                    out=tmp_path / "run2", is_main=True))
    assert not first.info["reference_cache_hit"] and second.info["reference_cache_hit"]
    fresh_c, fresh_r = dpo.compute_reference_logps(model, task, second.ps, cfg, CPU, "fp32", adapter_disabled=False)
    torch.testing.assert_close(second.ref_chosen, fresh_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second.ref_rejected, fresh_r, rtol=1e-6, atol=1e-6)
    # and the first DPO batch's loss starts at ln 2 (policy == reference) with the cached values
    obj = second
    batch = next(iter(obj.batches(1)))
    with torch.no_grad():
        loss, _ = obj.loss(model, batch)
    assert abs(loss.item() - 0.6931471805599453) < 1e-5


# ------------------------------------------------------------------------------------------------
# bf16 autocast vs fp32
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_name", ["paraphrase", "sonnet"])
def test_bf16_autocast_loss_is_within_1e_2_of_fp32(tiny, task_name):
    name, model, tok = tiny
    cfg, task = make(task_name, name, tok)
    batch = task.collate(list(range(4)))
    with torch.no_grad():
        losses = {}
        for precision in ("fp32", "bf16"):
            with autocast(CPU, precision):
                losses[precision] = task.sft_loss(model, batch)[0].float()
    assert rel(losses["bf16"], losses["fp32"]) < 1e-2
    if task_name == "sonnet":
        ps = sonnet_pairs(task)
        b = dpo.collate_sequence_pairs(ps, [0, 1], task.pad_id)
        with torch.no_grad():
            lp = {}
            for precision in ("fp32", "bf16"):
                with autocast(CPU, precision):
                    lp[precision] = dpo.sequence_logps(model, b)
        assert rel(lp["bf16"], lp["fp32"]) < 1e-2


# ------------------------------------------------------------------------------------------------
# Generation: batched KV cache == CS224N loop (greedy, fp32)
# ------------------------------------------------------------------------------------------------


def test_kv_cache_greedy_generation_equals_the_no_cache_loop(tiny):
    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    prompts = [task.prompt_text(s) for s in task.train[:4]]
    prompts.append("Shall I compare thee\n")  # a much shorter prompt: left padding in the batch
    batched = bench.sftdpo_generate_ids(task, model, prompts, device=CPU, precision="fp32", max_new_tokens=16,
                                        batch_size=len(prompts))
    for p, got in zip(prompts, batched):
        ids = tok(p, add_special_tokens=False).input_ids
        loop = bench.cs224n_generate(model, ids, max_new_tokens=16, eos_token_id=tok.eos_token_id, device=CPU,
                                     precision="fp32")
        assert got == loop
        assert len(loop) > 0


def test_lora_decodes_merged_with_the_same_tokens_and_leaves_the_model_untouched(tiny):
    from sftdpo.models import apply_lora
    from sftdpo.tasks import decode, merged_for_decoding

    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok, param="lora", lora_targets="all-linear")
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
    from transformers.generation.logits_process import TopPLogitsWarper

    from sftdpo.tasks import TOP_P_CANDIDATES, nucleus

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale  # no ties at the edge
    p, idx = nucleus(logits, top_p)
    hf = TopPLogitsWarper(top_p)(None, logits.clone())
    for r in range(logits.size(0)):
        ours = set(idx[r][p[r] > 0].tolist())
        assert ours == set(torch.nonzero(hf[r] > -float("inf")).flatten().tolist())
        assert torch.allclose(p[r][p[r] > 0], logits[r].softmax(-1)[idx[r][p[r] > 0]])
    assert (p > 0).sum(-1).max() > TOP_P_CANDIDATES[0] if scale < 1 else (p > 0).sum(-1).max() < TOP_P_CANDIDATES[0]


# ------------------------------------------------------------------------------------------------
# The bench itself
# ------------------------------------------------------------------------------------------------


def test_bench_lines_table_and_json(tmp_path, cache, monkeypatch):
    require_tiny_gpt2()
    monkeypatch.setitem(bench.GEN, "cpu", dict(prompts=3, loop_prompts=1, new_tokens=6))
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["generate/sonnet"])
    lines = {ln["name"]: ln for ln in res["models"]["tiny-gpt2"]["lines"]}
    assert set(lines) == {"generate/sonnet"}
    g = lines["generate/sonnet"]
    assert g["sftdpo"] > 0 and g["peer"] > 0 and g["ratio"] == pytest.approx(g["sftdpo"] / g["peer"])
    assert g["target"] == 10.0 and g["met"] in (True, False)
    table = bench.format_table(res)
    assert "generate/sonnet" in table and "CS224N loop" in table
    json.dumps(res, default=str)
    assert "| `generate/sonnet` |" in bench.format_markdown(res)


def test_bench_against_trl_smoke(tmp_path, cache):
    require_tiny_gpt2()
    if bench.trl_available():
        pytest.skip("TRL is not installed (pip install -e .[bench])")
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["sft/paraphrase"])
    (line,) = res["models"]["tiny-gpt2"]["lines"]
    assert line["name"] == "sft/paraphrase" and line["peer"] > 0 and line["sftdpo"] > 0
    assert line["details"]["trl"]["completion_only_loss"] is True and line["details"]["trl"]["timed_steps"] == 1


def test_fft_and_lora_measurements(cache):
    require_tiny_gpt2()
    spec = dict(model="tiny-gpt2", device="cpu", precision="fp32", batch=2, n_train=4, warmup=1, steps=1)
    fft, lora = (bench._param_child({**spec, "param": p}) for p in ("fft", "lora"))
    assert fft["trainable"] == fft["total"] and lora["total"] > fft["total"] > 100 * lora["trainable"] > 0
    assert fft["summary"]["timed_steps"] == lora["summary"]["timed_steps"] == 1
    assert fft["peak_memory_mb"] > 0 and lora["peak_memory_mb"] > 0


def test_head_chunk_size_does_not_change_the_result(tiny, monkeypatch):
    import sftdpo.tasks as T

    name, model, tok = tiny
    cfg, task = make("sonnet", name, tok)
    batch = task.collate([0, 1, 2])
    out = []
    for chunk in (7, 4096):
        monkeypatch.setitem(T._HEAD_CHUNK_ROWS, "cpu", chunk)
        loss = -target_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)[0].mean()
        loss.backward()
        out.append((loss.detach(), model.get_output_embeddings().weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    assert rel(out[0][0], out[1][0]) < 1e-6 and rel(out[0][1], out[1][1]) < 1e-5
