"""Backbones: offline errors, tokenizer handling, padding, LoRA freezing."""

import pytest
import torch

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.models import apply_lora, count_params, load_model, single_token_id
from sftdpo.ops.batching import pad_batch
from sftdpo.ops.logprobs import last_token_logits

from conftest import require_tiny_gpt2


def test_hub_id_offline_gives_one_clear_line(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftdpoError) as e:
        load_model("gpt2-definitely-not-cached-xyz")
    msg = str(e.value)
    assert "\n" not in msg and "smollm2-135m" in msg and "offline" in msg


def test_unknown_local_path_is_rejected(cache):
    with pytest.raises(SftdpoError, match="unknown model"):
        load_model("./no/such/model/dir")


def test_gpt2_label_tokens_and_pad():
    require_tiny_gpt2()
    _, tok = load_model("tiny-gpt2")
    assert single_token_id(tok, "yes") == 8505 and single_token_id(tok, "no") == 3919
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "right"
    with pytest.raises(SftdpoError, match="single tokens"):
        single_token_id(tok, "paraphrase-yes")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_right_padding_does_not_change_last_token_logits(name, cache):
    if name == "tiny-gpt2":
        require_tiny_gpt2()
    model, tok = load_model(name, seed=3)
    model.eval()
    seqs = [tok("Are these questions the same?", add_special_tokens=False).input_ids,
            tok("Short one", add_special_tokens=False).input_ids]
    batch = pad_batch(seqs, tok.pad_token_id, [0, 1])
    with torch.no_grad():
        batched = last_token_logits(model, batch)
        for i, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-4, rtol=1e-4)


def test_models_are_seeded(cache):
    a, _ = load_model("tiny-llama", seed=1)
    b, _ = load_model("tiny-llama", seed=1)
    c, _ = load_model("tiny-llama", seed=2)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("name,targets", [("tiny-gpt2", "attention"), ("tiny-llama", "attention"), ("tiny-llama", "all-linear")])
def test_lora_freezes_the_base(name, targets, cache):
    if name == "tiny-gpt2":
        require_tiny_gpt2()
    model, tok = load_model(name)
    cfg = RunConfig(param="lora", lora_rank=4, lora_targets=targets, seed=0)
    model = apply_lora(model, cfg)
    trainable, total = count_params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and trainable < total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tok("the quick brown fox jumps", add_special_tokens=False).input_ids])
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_lora_init_is_governed_by_the_seed(cache):
    def adapter(seed):
        m, _ = load_model("tiny-llama")
        m = apply_lora(m, RunConfig(param="lora", lora_rank=4, seed=seed))
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_A" in n}

    a, b, c = adapter(0), adapter(0), adapter(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
