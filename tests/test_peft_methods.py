"""Every `--param` method in the same harness (issue 26 §1), on tiny-gpt2 and tiny-llama: each trains
(its loss falls), only its own weights move, its DPO reference is the right model, an interrupted run
resumes exactly, and its export loads in PEFT / transformers and gives the run's logits. Plus what the
methods need of the rest of sftdpo: virtual tokens in the cloze, the sequence log-probs, decoding and
the token counts; GPT-2's Conv1D converted to nn.Linear exactly; LoRA+'s learning rates and AdaLoRA's
regulariser and rank allocation as PEFT defines them; --peft-set typed by the method's PEFT config;
the run hashes of FFT and LoRA runs unchanged."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftdpo.config import DISABLED_ADAPTER_REFERENCE_PARAMS, PARAMS, VIRTUAL_TOKEN_PARAMS, RunConfig, SftdpoError
from sftdpo.models import load_model
from sftdpo.objectives.dpo.pairs import label_pair_set
from sftdpo.peft_methods import METHODS, adalora_orth_reg, apply_param, conv1d_to_linear, linear_to_conv1d
from sftdpo.train.loop import Run

from conftest import qqp_files, rel, require_tiny_gpt2

MODELS = ("tiny-gpt2", "tiny-llama")
# fft is held by test_training.py, test_dpo.py and test_export.py
METHODS_UNDER_TEST = [p for p in PARAMS if p != "fft"]
CASES = [pytest.param(p, m, id=f"{p}-{m}") for p in METHODS_UNDER_TEST for m in MODELS
         if (p, m) != ("bitfit", "tiny-llama")]  # Llama has no biases: test_bitfit_refuses_a_model_without_biases
# learning rates that move each method within 6 steps on a random tiny model (not the study's rates: METHODS[p].lr)
TEST_LR = {"lora": 2e-2, "dora": 2e-2, "rslora": 1e-2, "pissa": 1e-2, "olora": 1e-2, "lora-plus": 5e-3, "ia3": 1e-1,
           "vera": 1e-1, "loha": 1e-2, "lokr": 3e-2, "adalora": 1e-1, "oft": 3e-2, "boft": 3e-2, "prefix": 1e-1,
           "prompt": 1e-1, "bitfit": 3e-2, "ln": 1e-1}
ADAPTER_WEIGHT = re.compile(r"\.default(\.|$)")  # PEFT names an adapter's weights after the adapter
# weights compared across two paths that compute the same sums in another order (README: fp32 ~1e-5)
TOL = 1e-5


class _Stop(Exception):
    pass


def cfg_for(param: str, model: str, files: dict, **kw) -> RunConfig:
    base = dict(task="paraphrase", model=model, param=param, device="cpu", precision="fp32", batch_size=4, epochs=2,
                lr=TEST_LR[param], eval_batch_size=8, eval_init=False, num_virtual_tokens=4, log_every=1, **files)
    return RunConfig(**{**base, **kw})


def built(cfg: RunConfig, out: Path) -> Run:
    run = Run(cfg, out)
    run.build()
    return run


@torch.no_grad()
def sft_loss(run: Run) -> float:
    """The SFT loss over every training row, dropout off (what training lowers, measured the same way before and after)."""
    run.model.eval()
    rows = list(range(len(run.task.train_ids)))
    return float(run.task.sft_loss(run.model, run.task.collate(rows))[0])


@torch.no_grad()
def last_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """The oracle: each sequence alone (no padding) through the model's own forward, logits at its last position."""
    model.eval()
    return torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1].float() for s in seqs])


def label_logps(model, task) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of every paraphrase pair (one wrong label each) by the oracle forward."""
    ps = label_pair_set(task)
    logp = torch.log_softmax(last_logits(model, ps.prompt), dim=-1)
    rows = torch.arange(len(ps))
    return logp[rows, torch.tensor([c[0] for c in ps.chosen])], logp[rows, torch.tensor([r[0] for r in ps.rejected])]


def perturb(model, seed: int = 1, scale: float = 0.3) -> None:
    """Move every trainable weight (stands in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _final(out: Path) -> tuple[dict, list[dict]]:
    s = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in s.items() if k.startswith(("dev/", "best/"))}, \
        [{k: v for k, v in r.items() if k.startswith(("dev/", "train/")) or k in ("train_tokens",)}
         for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]


# -- one trained run per method and model, shared by the tests below --------------------------------

class Trained:
    """A method's run (2 epochs, 6 steps), its untrained start, and the same run interrupted after epoch 1 and resumed."""

    def __init__(self, param: str, model: str, root: Path) -> None:
        self.files = qqp_files(root, 12, 4)
        self.cfg = cfg = cfg_for(param, model, self.files)
        start = built(cfg, root / "start")
        self.init_state = {n: t.clone() for n, t in start.model.state_dict().items()}
        self.trainable = {n for n, p in start.model.named_parameters() if p.requires_grad}
        self.init_loss = sft_loss(start)
        self.run = Run(cfg, root / "full")
        self.summary = self.run.train()
        self.final_loss = sft_loss(self.run)

        def stop(epoch: int) -> None:
            if epoch == 1:
                raise _Stop

        with pytest.raises(_Stop):
            Run(cfg, root / "resumed", on_checkpoint=stop).train()
        self.resumed = Run(cfg, root / "resumed")
        self.resumed.train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    runs: dict[tuple[str, str], Trained] = {}

    def get(param: str, model: str) -> Trained:
        if model == "tiny-gpt2":
            require_tiny_gpt2()
        if (param, model) not in runs:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("SFTDPO_CACHE_DIR", str(shared_cache))
                runs[param, model] = Trained(param, model, tmp_path_factory.mktemp(f"{param}-{model}"))
        return runs[param, model]

    return get


def expected_trainable(param: str, names: list[str]) -> set[str]:
    """The weights a method trains, by name: an adapter's (named after it), the biases (bitfit), the
    normalisation layers' (ln: GPT-2's ln_*, Llama's *norm)."""
    if param == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    if param == "ln":
        return {n for n in names if re.search(r"(^|\.)ln_|norm", n)}
    return {n for n in names if ADAPTER_WEIGHT.search(n) and ".ranknum." not in n}  # (AdaLoRA's ranknum: a constant)


@pytest.mark.parametrize("param,model", CASES)
def test_trains_and_only_its_weights_move(param, model, trained):
    """Six optimizer steps lower the SFT loss (dropout off, all training rows), the trainable weights
    are exactly the method's (its adapter, the biases, the norms), and every other tensor of the model
    (weights and buffers: the base under the adapter, VeRA's projections, PiSSA's residual) is
    bit-identical to the start. Catches a method that does not train (a frozen adapter, virtual tokens
    bypassed by the fast path), a base left trainable, weight decay or a merge touching frozen weights."""
    t = trained(param, model)
    names = [n for n, _ in t.run.model.named_parameters()]
    assert t.trainable == expected_trainable(param, names) and t.trainable
    assert t.final_loss < t.init_loss - 1e-3, (t.init_loss, t.final_loss)
    final = t.run.model.state_dict()
    assert final.keys() == t.init_state.keys()
    moved = {n for n, v in final.items() if not torch.equal(v, t.init_state[n])}
    assert moved and moved <= t.trainable, sorted(moved - t.trainable)[:5]
    s = t.summary
    assert s["trainable_params"] == sum(p.numel() for n, p in t.run.model.named_parameters() if n in t.trainable)
    assert s["trainable_pct"] == pytest.approx(100 * s["trainable_params"] / s["total_params"])
    weights = t.run.ckpt("last") / "weights.safetensors"
    assert s["adapter_mb"] == pytest.approx(weights.stat().st_size / 2**20)


@pytest.mark.parametrize("param,model", CASES)
def test_resume_after_epoch_one_is_exact(param, model, trained):
    """Interrupted after epoch 1's checkpoint, then resumed: the same logged losses, dev metrics and
    token counts, and bit-identical trained weights as the uninterrupted run. Catches a method's weights
    missing from the checkpoint (saved by name), AdaLoRA's importance scores or rank pattern not restored,
    LoRA+'s per-weight learning rates lost in the optimizer state."""
    t = trained(param, model)
    assert _final(t.resumed.out) == _final(t.run.out)
    a = load_file(str(t.run.ckpt("last") / "weights.safetensors"))
    b = load_file(str(t.resumed.ckpt("last") / "weights.safetensors"))
    assert a.keys() == b.keys() == t.trainable
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("param,model", CASES)
def test_export_loads_and_gives_the_runs_logits(param, model, trained, tmp_path):
    """`sftdpo export` (and `--merge` where the method merges), loaded by PEFT / transformers alone
    (PeftModel.from_pretrained on the base as sftdpo loads it, AutoModelForCausalLM.from_pretrained),
    gives the trained run's next-token logits on the dev prompts, which the untrained model does not.
    Catches an adapter saved without its trained weights, PiSSA/OLoRA's adapter saved against the
    residual base, a merged GPT-2 left with Linear layers it cannot load, virtual tokens lost."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftdpo.export import export_run

    t = trained(param, model)
    prompts = t.run.task.dev_ids
    want = last_logits(t.run.model, prompts)
    untrained, _ = load_model(model, seed=t.cfg.seed)
    assert rel(last_logits(untrained, prompts), want) > 1e-4  # the export must carry the training
    kinds = ["adapter", "merged"] if METHODS[param].config is not None and METHODS[param].merges else [
        "adapter" if METHODS[param].config is not None else "full"]
    for kind in kinds:
        out = export_run(t.run.out, tmp_path / kind, checkpoint="last", merge=kind == "merged")
        if kind == "adapter":
            assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
            base, _ = load_model(model, seed=t.cfg.seed)
            if METHODS[param].linear_only:
                conv1d_to_linear(base)  # as the model card says: PEFT's method takes nn.Linear only
            loaded = PeftModel.from_pretrained(base, out)
        else:
            assert not (out / "adapter_config.json").exists()
            loaded = AutoModelForCausalLM.from_pretrained(out)
            assert type(loaded).__name__ == type(untrained).__name__
            if model == "tiny-gpt2":  # converted back: a plain GPT-2
                assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        # merged weights and PiSSA's converted adapter (a difference of two LoRAs) round in another order
        assert rel(last_logits(loaded, prompts), want) < 1e-4, kind


# -- the DPO reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("param,model", CASES)
def test_dpo_only_reference_is_the_pretrained_model(param, model, tmp_path, cache):
    """DPO-only: the reference log-probs are the pretrained model's (loaded afresh; the oracle runs each
    prompt alone through its forward), whatever the adapter holds: trained-looking adapter weights and
    virtual tokens are disabled; PiSSA/OLoRA, whose disabled adapter leaves the residual base, use the
    model at its start (the pretrained weights split in two); BitFit/LN's untouched model. Catches the
    adapter left on, PiSSA's residual taken for the pretrained model, the Conv1D conversion changing the
    function."""
    if model == "tiny-gpt2":
        require_tiny_gpt2()
    run = built(cfg_for(param, model, qqp_files(tmp_path, 8, 4), regime="dpo"), tmp_path / "run")
    if param in DISABLED_ADAPTER_REFERENCE_PARAMS:
        perturb(run.model)  # the reference must not see it
    obj = run.objective("dpo")
    pretrained, _ = load_model(model, seed=run.cfg.seed)
    chosen, rejected = label_logps(pretrained, run.task)
    # PiSSA/OLoRA: W = (W - BA) + BA in fp32, a few roundings per weight
    tol = 1e-4 if param in ("pissa", "olora") else TOL
    assert rel(obj.ref_chosen, chosen) < tol and rel(obj.ref_rejected[:, 0], rejected) < tol
    if param in DISABLED_ADAPTER_REFERENCE_PARAMS:  # the adapter does change the model: the test can fail
        assert rel(label_logps(run.model, run.task)[0], chosen) > 10 * tol


@pytest.mark.parametrize("param,model", CASES)
def test_staged_reference_is_the_model_at_the_handoff(param, model, tmp_path, cache):
    """SFT@1->DPO: the reference log-probs are the hand-off model's, its adapter (or biases, norms)
    as SFT left them, not the pretrained model's. Catches a staged run that disables the adapter or
    reloads the backbone for its reference."""
    if model == "tiny-gpt2":
        require_tiny_gpt2()
    cfg = cfg_for(param, model, qqp_files(tmp_path, 8, 4), regime="sft-dpo", epochs=2, handoff_epoch=1)
    run = built(cfg, tmp_path / "run")
    perturb(run.model)  # stands in for the SFT epoch
    obj = run.objective("dpo")
    chosen, rejected = label_logps(run.model, run.task)
    assert rel(obj.ref_chosen, chosen) < TOL and rel(obj.ref_rejected[:, 0], rejected) < TOL
    pretrained, _ = load_model(model, seed=cfg.seed)
    assert rel(label_logps(pretrained, run.task)[0], chosen) > 10 * TOL
    assert obj.describe()["reference"] == ("SFT adapter at hand-off epoch 1" if METHODS[param].config
                                           else "SFT model at hand-off epoch 1")


# -- virtual tokens ---------------------------------------------------------------------------------

def _virtual_model(param: str, model: str, files: dict, tmp_path: Path) -> Run:
    if model == "tiny-gpt2":
        require_tiny_gpt2()
    run = built(cfg_for(param, model, files), tmp_path / "run")
    # a random tiny model's logits hardly depend on its input (it repeats the last token): larger weights give
    # a model whose predictions its virtual tokens (moved far from PEFT's init) do change
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (3.0 if p.requires_grad else 0.1))
    return run


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("param", VIRTUAL_TOKEN_PARAMS)
def test_virtual_tokens_cloze_and_sequence_logps_equal_the_peft_forward(param, model, tiny_data, tmp_path, cache):
    """The cloze logits (last_token_logits, what SFT, DPO and evaluation read) of a right-padded batch
    equal the PeftModel's own forward on each row alone at its last real position, and the sequence
    log-probs (sonnet SFT and DPO) equal log-softmax of that forward at each target token. Catches
    the decoder fast path (which bypasses the virtual tokens), a last position not shifted by prompt
    tuning's virtual tokens, padding read as the last position."""
    from sftdpo.ops.batching import pad_batch
    from sftdpo.ops.logprobs import last_token_logits, sequence_logps

    run = _virtual_model(param, model, tiny_data["paraphrase"], tmp_path)
    model_, task = run.model.eval(), run.task
    rows = list(range(6))
    batch = task.collate(rows)
    assert len({len(task.train_ids[i]) for i in rows}) > 1  # rows of several lengths: padding in the batch
    with torch.no_grad():
        got = last_token_logits(model_, batch)
    want = last_logits(model_, [task.train_ids[i] for i in rows])
    assert rel(got, want) < TOL
    # sequences: prompt + answer token, the answer's log-prob
    seqs = [task.train_ids[i] + [task.label_ids[0]] for i in rows]
    b = pad_batch(seqs, task.pad_id, rows)
    labels = torch.full_like(b.input_ids, -100)
    for j, s in enumerate(seqs):
        labels[j, len(s) - 1] = s[-1]
    b.labels = labels
    with torch.no_grad():
        lp = sequence_logps(model_, b, "sum")
    want_lp = torch.log_softmax(last_logits(model_, [s[:-1] for s in seqs]), -1)[:, task.label_ids[0]]
    assert rel(lp, want_lp) < TOL


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("param", VIRTUAL_TOKEN_PARAMS)
def test_virtual_tokens_decode_as_the_peft_forward(param, model, tiny_data, tmp_path, cache):
    """Greedy decoding of left-padded prompts (sftdpo's KV-cache loop) gives the tokens of greedy
    decoding by the PeftModel's own forward (the function training optimises) on each prompt alone,
    re-run on the growing sequence. (PEFT 0.21's generate is no oracle for prefix tuning on transformers
    5.25: its first token already disagrees with its forward's argmax.) Catches virtual tokens dropped
    from decoding, put again at every step, or given the wrong positions, and a first step that leaves
    the KV cache to the model's config (here `use_cache: false`)."""
    from sftdpo.ops.generation import generate_ids

    run = _virtual_model(param, model, tiny_data["paraphrase"], tmp_path)
    m, task, tok = run.model.eval(), run.task, run.tok
    m.get_base_model().config.use_cache = False  # as some hub configs say: decoding must ask for its cache itself
    prompts = [task.train_ids[i][-12 + i:] for i in (0, 1, 2)]  # several lengths: left padding
    got = generate_ids(m, prompts, torch.device("cpu"), "fp32", pad_id=tok.pad_token_id, eos_id=-1, temperature=0.0,
                       top_p=1.0, max_new_tokens=5)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(5):
            seq.append(int(last_logits(m, [seq])[0].argmax()))
        assert g == seq[len(p):]
    with m.disable_adapter():  # the virtual tokens do change what is decoded: the test can fail
        assert generate_ids(m, prompts, torch.device("cpu"), "fp32", pad_id=tok.pad_token_id, eos_id=-1,
                            temperature=0.0, top_p=1.0, max_new_tokens=5) != got


def test_virtual_tokens_are_counted_in_the_logged_tokens(tmp_path, cache):
    """A prefix-tuning run logs as trained tokens the real tokens plus the virtual tokens each row ran
    through (rows x epochs x --num-virtual-tokens). Catches a token count (tokens/s) that ignores them."""
    files = qqp_files(tmp_path, 8, 4)
    lora = Run(cfg_for("lora", "tiny-llama", files, epochs=1), tmp_path / "lora")
    lora.train()
    prefix = Run(cfg_for("prefix", "tiny-llama", files, epochs=1, num_virtual_tokens=5), tmp_path / "prefix")
    prefix.train()
    tokens = lambda r: [json.loads(x) for x in (r.out / "metrics.jsonl").read_text().splitlines()][-1]["train_tokens"]  # noqa: E731
    real = sum(len(s) for s in lora.task.train_ids)
    assert tokens(lora) == real and tokens(prefix) == real + 5 * len(prefix.task.train_ids)


def test_virtual_tokens_must_fit_the_positions(tmp_path, cache):
    """--num-virtual-tokens beyond GPT-2's learned positions: one line naming the limit, before
    anything is written (an index error deep in the embedding otherwise)."""
    require_tiny_gpt2()
    run = Run(cfg_for("prompt", "tiny-gpt2", qqp_files(tmp_path, 8, 4), num_virtual_tokens=600), tmp_path / "run")
    with pytest.raises(SftdpoError, match="virtual tokens .* positions"):
        run.train()
    assert not (tmp_path / "run" / "config.json").exists()


# -- GPT-2's Conv1D ---------------------------------------------------------------------------------

def test_conv1d_to_linear_is_exact_and_converts_back(cache):
    """GPT-2's Conv1D layers as nn.Linear (LoHa, LoKr, OFT, BOFT, OLoRA take nothing else): the converted
    model's logits equal the original's to fp32 rounding (x W + b in another kernel), and converting back
    restores bit-identical weights of the original types. Catches an untransposed weight, a lost bias."""
    from transformers.pytorch_utils import Conv1D

    require_tiny_gpt2()
    model, _ = load_model("tiny-gpt2", seed=3)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        names = conv1d_to_linear(model)
        got = model(input_ids=ids).logits
    assert len(names) == 4 * 2 and not any(isinstance(m, Conv1D) for m in model.modules())
    assert rel(got, want) < TOL
    linear_to_conv1d(model)
    assert sum(isinstance(m, Conv1D) for m in model.modules()) == 8
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- LoRA+ and AdaLoRA as PEFT defines them -----------------------------------------------------------

def test_loraplus_learning_rates_are_peft_create_loraplus_optimizers(tmp_path, cache):
    """Each weight's learning rate (and weight decay) in sftdpo's optimizer for --param lora-plus equals
    PEFT's create_loraplus_optimizer's (lora_B at ratio x lr). Catches the ratio applied to lora_A, or not at all."""
    from peft.optimizers import create_loraplus_optimizer

    from sftdpo.peft_methods import MethodHooks
    from sftdpo.train.step import make_optimizer

    cfg = cfg_for("lora-plus", "tiny-llama", qqp_files(tmp_path, 8, 4), loraplus_lr_ratio=8.0, weight_decay=0.1,
                  use_dora=True)
    run = built(cfg, tmp_path / "run")
    ours = make_optimizer(run.model, 1e-3, 0.1, MethodHooks(run.model, cfg).lr_factor)
    theirs = create_loraplus_optimizer(run.model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0,
                                       loraplus_weight_decay=0.1)
    lr = lambda opt: {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}  # noqa: E731
    assert lr(ours) == lr(theirs) and len(set(lr(ours).values())) == 2


def test_adalora_regulariser_is_pefts(tmp_path, cache):
    """AdaLoRA's orthogonal regulariser (added by sftdpo once per step, since its losses bypass
    AdaLoraModel.forward) equals what PEFT's forward adds to a loss: PEFT's loss with labels minus
    the same forward's plain loss, over the weight orth_reg_weight. Catches a missing or misweighted term."""
    import torch.nn.functional as F

    run = built(cfg_for("adalora", "tiny-llama", qqp_files(tmp_path, 8, 4)), tmp_path / "run")
    perturb(run.model)
    ids = torch.tensor([run.task.train_ids[0]])
    with torch.no_grad():
        out = run.model(input_ids=ids, labels=ids)
        plain = F.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
        reg = adalora_orth_reg(run.model)
    weight = run.model.peft_config["default"].orth_reg_weight
    assert float((out.loss - plain) / weight) == pytest.approx(float(reg), rel=1e-4) and float(reg) > 0


def test_adalora_allocates_its_rank_budget_during_training(trained):
    """After an AdaLoRA run, PEFT's update_and_allocate has run every step: the rank pattern is set
    and the pruned singular values (lora_E) are zero, within the target budget. Catches the hook never called."""
    t = trained("adalora", "tiny-llama")
    pc = t.run.model.peft_config["default"]
    assert pc.rank_pattern
    kept = sum(int(p.count_nonzero()) for n, p in t.run.model.named_parameters() if "lora_E" in n)
    total = sum(p.numel() for n, p in t.run.model.named_parameters() if "lora_E" in n)
    assert kept < total


# -- options, refusals, identity ------------------------------------------------------------------------

def test_peft_set_options_are_typed_by_the_methods_config(tmp_path, cache):
    """--peft-set reaches the method's PEFT config with its field types (int rank, a list of target
    modules, a float), and is part of the run hash; an unknown key or one sftdpo sets itself is one line
    naming the config class / the flag to use instead. Catches options dropped, left as strings, or
    ignored by the hash."""
    files = qqp_files(tmp_path, 8, 4)
    cfg = cfg_for("loha", "tiny-llama", files, peft_set=("r=4", "target_modules=q_proj,k_proj", "module_dropout=0.25"))
    run = built(cfg, tmp_path / "run")
    pc = run.model.peft_config["default"]
    assert pc.r == 4 and set(pc.target_modules) == {"q_proj", "k_proj"} and pc.module_dropout == 0.25
    assert {n.split(".")[-3] for n, _ in run.model.named_parameters() if "hada_w1_a" in n} == {"q_proj", "k_proj"}
    assert cfg.hash() != cfg_for("loha", "tiny-llama", files).hash()
    with pytest.raises(SftdpoError, match="LoHaConfig .* has no field 'rank'"):
        built(cfg_for("loha", "tiny-llama", files, peft_set=("rank=4",)), tmp_path / "bad")
    with pytest.raises(SftdpoError, match="set by --lora-rank"):
        built(cfg_for("dora", "tiny-llama", files, peft_set=("r=4",)), tmp_path / "bad2")


def test_flags_on_the_command_line(tmp_path, cache):
    """`train --param vera --peft-set r=16 --peft-set d_initial=0.2`: repeatable, merged into one
    canonical setting (the order of the flags does not change the hash)."""
    from sftdpo.cli import build_parser, config_from_args

    files = qqp_files(tmp_path, 8, 4)
    argv = ["train", "--task", "paraphrase", "--train", files["train"], "--dev", files["dev"], "--param", "vera"]
    a = config_from_args(build_parser().parse_args([*argv, "--peft-set", "r=16", "--peft-set", "d_initial=0.2"]))
    b = config_from_args(build_parser().parse_args([*argv, "--peft-set", "d_initial=0.2", "--peft-set", "r=16"]))
    assert a.peft_set == ("d_initial=0.2", "r=16") and a.hash() == b.hash()


def test_fft_and_lora_run_hashes_are_unchanged():
    """The run ids of FFT and LoRA runs are those sftdpo gave them before the other methods existed
    (the studies, caches and shared prefixes of earlier versions keep their hashes); the new options
    are irrelevant to them and leave the hash alone. Catches a new field entering every run's identity."""
    assert RunConfig().hash() == "b15d538046f8"
    assert RunConfig(param="lora").hash() == "67ada6c32992"
    assert RunConfig(param="lora", lora_rank=16, use_dora=True).hash() == "890dc36de687"
    assert RunConfig(param="lora", regime="sft-dpo", epochs=3, handoff_epoch=1).hash() == "62f69cb21757"
    assert RunConfig(param="lora", num_virtual_tokens=7, loraplus_lr_ratio=2.0).hash() == "67ada6c32992"
    assert RunConfig(peft_set=("r=4",)).hash() == RunConfig().hash()
    # and each method reads its own options only
    assert RunConfig(param="prefix", lora_rank=3).hash() == RunConfig(param="prefix").hash()
    assert RunConfig(param="prefix", num_virtual_tokens=7).hash() != RunConfig(param="prefix").hash()
    assert RunConfig(param="dora", use_dora=True).hash() == RunConfig(param="dora").hash()


def test_bitfit_refuses_a_model_without_biases(tmp_path, cache):
    """--param bitfit on Llama (no bias terms): one line that says so and what to use instead, nothing written."""
    run = Run(cfg_for("bitfit", "tiny-llama", qqp_files(tmp_path, 8, 4)), tmp_path / "run")
    with pytest.raises(SftdpoError, match="no bias terms"):
        run.train()
    assert not (tmp_path / "run" / "config.json").exists()


def test_merge_refused_for_virtual_tokens(trained, tmp_path):
    """`export --merge` of a prompt-tuning run: one line (virtual tokens fold into no weight), nothing written."""
    from sftdpo.export import export_run

    t = trained("prompt", "tiny-llama")
    with pytest.raises(SftdpoError, match="does not merge"):
        export_run(t.run.out, tmp_path / "x", merge=True)
    assert not (tmp_path / "x").exists()


def test_every_method_builds_with_peft_defaults_from_its_source():
    """Each --param names where its defaults and learning rate come from, and each PEFT default is a
    field of its config class (a renamed PEFT field would otherwise fail only at run time)."""
    import dataclasses

    assert set(METHODS) == set(PARAMS)
    for p, m in METHODS.items():
        assert m.source and m.lr > 0
        if m.config is not None:
            assert set(m.defaults) <= {f.name for f in dataclasses.fields(m.config)}, p


def test_apply_param_is_seeded(cache):
    """The same seed gives the same adapter initialisation (prompt tuning's random virtual tokens, VeRA's
    scaling vectors), another seed another one for randomly initialised methods."""
    def init(seed):
        model, _ = load_model("tiny-llama", seed=0)
        m = apply_param(model, RunConfig(model="tiny-llama", param="prompt", num_virtual_tokens=3, seed=seed))
        return next(p for n, p in m.named_parameters() if p.requires_grad).detach().clone()

    assert torch.equal(init(1), init(1)) and not torch.equal(init(1), init(2))
