"""Contracts of ops/ that mutmut's survivors showed untested (`make mutate`, docs/mutation.md)."""

import pytest
import torch

from sftdpo.ops.batching import bucketed_batches


def test_bucketed_batches_sort_windows_of_fifty_batches_and_shuffle_the_batches():
    """The documented order, step by step with torch's generator: a seeded permutation of the rows,
    sorted by length within windows of 50 batches, cut into batches, the batches permuted by the same
    generator. 230 rows in batches of 2 make two full windows and a short one. Catches another window
    size, a sort by row number instead of length, windows that skip or overlap rows, and batches left in
    length order (the order a run's batches, and so its numbers, follow from its seed)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randperm(1000, generator=g)[:230].tolist()  # distinct lengths: one sorted order
    got = bucketed_batches(lengths, 2, seed=5)
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(230, generator=g).tolist()
    batches = []
    for start in (0, 100, 200):
        window = sorted(perm[start:start + 100], key=lambda i: lengths[i])
        batches += [window[i:i + 2] for i in range(0, len(window), 2)]
    order = torch.randperm(len(batches), generator=g).tolist()
    assert got == [batches[i] for i in order]
    unshuffled = bucketed_batches(lengths, 2, seed=5, shuffle=False)
    by_length = sorted(range(230), key=lambda i: lengths[i])
    assert unshuffled == [by_length[i:i + 2] for i in range(0, 230, 2)]


def test_mean_sequence_logps_divide_by_each_rows_own_target_count():
    """`sequence_logps(reduction="mean")` (length-normalised preference losses) against transformers' own
    forward, one unpadded row at a time: rows with 3, 1 and 0 response tokens, the empty one last. Catches
    a count floored at 2 (the one-token row halved), a count without `minlength` (shorter than the batch
    when the last rows have no targets: a shape error or a broadcast over the wrong rows), and sums
    where means are asked. fp32 throughout: within 1e-5 relative (sums of three terms)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftdpo.ops.batching import pad_batch
    from sftdpo.ops.logprobs import sequence_logps

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    rows = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14]]
    targets = [3, 1, 0]  # response tokens at the end of each row
    batch = pad_batch(rows, 0, range(3))
    labels = torch.full_like(batch.input_ids, -100)
    for i, (r, t) in enumerate(zip(rows, targets)):
        if t:
            labels[i, len(r) - t:len(r)] = torch.tensor(r[len(r) - t:])
    batch.labels = labels
    with torch.no_grad():
        got = sequence_logps(model, batch, reduction="mean")
        want = []
        for r, t in zip(rows, targets):
            lp = model(input_ids=torch.tensor([r])).logits[0, :-1].float().log_softmax(-1)
            per_token = lp[torch.arange(len(r) - 1), torch.tensor(r[1:])][len(r) - 1 - t:]
            want.append(per_token.mean() if t else torch.tensor(0.0))
    want = torch.stack(want)
    assert got.shape == (3,) and got[2] == 0
    assert torch.allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("trainable", ["all", "hidden", "head"])
def test_target_logprob_gradients_equal_autograds_for_each_input_that_needs_one(trainable):
    """The hand-written backward of the LM head (`_TargetLogProb`) against autograd through
    `log_softmax(h @ W.T + b)`, in fp32 (within 1e-5 relative), with more rows (70) than vocabulary
    entries (24) and than one chunk (32), and a bias. `hidden`: the head frozen, as under LoRA, where
    only the decoder's gradient trains the adapters; `head`: only the head trains. Catches a chunk loop
    bounded by the vocabulary instead of the rows (rows left without gradient), a hidden-state gradient
    asked of the wrong input (LoRA's adapters silently untrained), and a bias gradient dropped."""
    from sftdpo.ops.logprobs import _TargetLogProb

    g = torch.Generator().manual_seed(0)
    h0, w0, b0 = torch.randn(70, 8, generator=g), torch.randn(24, 8, generator=g), torch.randn(24, generator=g)
    target, weights = torch.randint(0, 24, (70,), generator=g), torch.randn(70, generator=g)
    grads = {}
    for path in ("ours", "autograd"):
        h, w, b = h0.clone(), w0.clone(), b0.clone()
        for t, on in ((h, trainable in ("all", "hidden")), (w, trainable in ("all", "head")), (b, trainable in ("all", "head"))):
            t.requires_grad_(on)
        if path == "ours":
            out = _TargetLogProb.apply(h, w, b, target, torch.float32)
        else:
            out = torch.log_softmax(h @ w.t() + b, -1).gather(1, target[:, None]).squeeze(1)
        (out * weights).sum().backward()
        grads[path] = [t.grad for t in (h, w, b)]
    for ours, ref in zip(grads["ours"], grads["autograd"]):
        assert (ours is None) == (ref is None)
        if ref is not None:
            assert float((ours - ref).norm() / ref.norm()) < 1e-5


def test_decoding_keeps_its_kv_cache_when_the_models_config_turns_it_off():
    """Some hub checkpoints ship `use_cache: false` in their config. `decode` asks for the cache itself;
    its greedy tokens for left-padded prompts of different lengths equal transformers' own `generate`
    run one unpadded prompt at a time. Catches a prefill that leaves `use_cache` to the config (no cache
    comes back, and every later step sees only its own token)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftdpo.ops.batching import left_pad
    from sftdpo.ops.generation import decode

    torch.manual_seed(0)
    # large initial weights: the next token depends on the context, not only on the last token
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       initializer_range=0.5, use_cache=False)).eval()
    prompts = [[3, 9, 27, 5, 41], [12, 7]]
    ids, mask = left_pad(prompts, 0)
    got = decode(model, ids, mask, max_new_tokens=8, temperature=0.0, top_p=1.0, eos_id=63)
    for p, row in zip(prompts, got):
        hf = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=8,
                            do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert row == (hf[:hf.index(63)] if 63 in hf else hf)
    assert len(set(map(tuple, got))) == 2 and all(len(r) > 2 for r in got)


def test_sampling_at_top_p_one_draws_from_hf_s_tempered_softmax():
    """At top_p = 1 a sampled token is `torch.multinomial` over the softmax of transformers'
    TemperatureLogitsWarper output, draw for draw under the same seed (so seeded samples are the plain
    recipe's); at temperature 0 the argmax. Catches logits multiplied by the temperature (T = 0.5
    flattens instead of sharpening), and top_p = 1 sent through the nucleus path (another draw order,
    and a tail that float rounding of the cumulative sum can cut)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper

    from sftdpo.ops.generation import sample_next

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (0.5, 2.0):
        torch.manual_seed(7)
        got = sample_next(logits, temperature, 1.0)
        torch.manual_seed(7)
        want = torch.multinomial(TemperatureLogitsWarper(temperature)(None, logits.clone()).softmax(-1), 1).squeeze(-1)
        assert torch.equal(got, want)
    assert torch.equal(sample_next(logits, 0.0, 0.9), logits.argmax(-1))
