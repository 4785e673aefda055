"""Whole runs equal TRL's (issue 23 §1): the same examples, batches and hyper-parameters trained by
sftdpo and by TRL 1.16 (`SFTTrainer` with completion-only loss, `DPOTrainer`) on tiny-llama (no
dropout) in fp32, compared at every optimizer step (loss, learning rate, pre-clip gradient norm) and
on the final trainable weights.

Bounds, from fp32 as README's Development section derives them: the two sides compute the same sums
in another order (TRL's chunked LM head, two forward rows per DPO pair instead of one), so per-step
losses and gradient norms agree to 1e-5 relative (observed ~1e-7; differences grow with the weights'
divergence over steps, which stays ~1e-7 over these 6-18 steps); the learning rate is the same
arithmetic (1e-12); the final weights agree to 1e-4 of the whole update's norm (AdamW divides
near-zero gradients by sqrt(v) + eps, which turns rounding into larger element-wise differences; a
wrong weighting, decay or schedule moves whole updates).

What each side is given, and where sftdpo deliberately differs from TRL (mapped here, one comment each):
- the batches: TRL reads exactly sftdpo's length-bucketed batches (`SameBatches`), epoch by epoch;
- the paraphrase cloze: pre-tokenized rows (prompt ids, completion = the label token, no EOS);
- DPO: pre-tokenized pairs for the cloze (TRL 1.16's DPOTrainer re-tokenizes text and appends EOS to
  every response, so `_prepare_dataset` passes token ids through); TRL's own tokenization of text
  pairs for `generate`, checked equal to sftdpo's;
- the staged run's SFT schedule over the whole budget (SFTTrainer stopped after k of the budget's
  epochs); the DPO micro-batch weighting with accumulation (rescaled in the DPO subclass).

The full matrix (SFT FFT/LoRA x paraphrase/generate, DPO-only and SFT@k->DPO FFT/LoRA, accumulation
1 and 2) is `scripts/trl_matrix.py`, which prints the largest difference per quantity and case.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PrinterCallback, TrainerCallback

from sftdpo.config import RunConfig
from sftdpo.models import load_model
from sftdpo.ops.batching import bucketed_batches, epoch_seed
from sftdpo.train.loop import Run, train

from conftest import write_synthetic_qqp

# fp32 bounds (module docstring)
REL_STEP = 1e-5  # per-step loss and pre-clip gradient norm, relative
ABS_LR = 1e-12  # learning rate
REL_UPDATE = 1e-4  # final weights: |w_ours - w_trl| <= REL_UPDATE x |w_trl - w_start| (norm-wise)

# the CS224N cloze prompt, written here rather than imported: sftdpo's prompt is part of what is compared
PROMPT = 'Question 1: "{q1}"\nQuestion 2: "{q2}\nAre these questions asking the same thing?\n'
N_TRAIN = 22  # batch 4 x accumulation 2: steps of 8, 8 and 6 rows; the short one is split 4 + 2


# -- the cases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One configuration trained by both sides. `clip` sits inside the range of the case's gradient
    norms, so that clipping acts on some steps and not on others (checked)."""

    task: str  # paraphrase (the cloze) | generate (prompt-completion)
    param: str  # fft | lora
    regime: str  # sft | dpo | sft-dpo
    grad_accum: int = 1
    epochs: int = 3
    handoff: int = 1  # sft-dpo: SFT epochs
    clip: float = 1.0
    lora_targets: str = "attention"  # sftdpo's --lora-targets preset; TRL is given the modules (TARGETS)

    @property
    def name(self) -> str:
        regime = f"sft@{self.handoff}->dpo" if self.regime == "sft-dpo" else self.regime
        return f"{regime} {self.param} {self.task} accum{self.grad_accum}"


# shared hyper-parameters (both sides; LoRA dropout 0: dropout off everywhere). Warm-up: 0.3 of 18, 12 or 9
# steps is 6, 4 or 3 steps (ceil, transformers' rule).
HP = dict(batch_size=4, lr=3e-3, lora_lr=1e-2, dpo_lr=1e-3, warmup_ratio=0.3, weight_decay=0.1, beta=0.1,
          lora_rank=4, lora_alpha=8.0, seed=0)
# Llama's modules for sftdpo's LoRA presets, as PEFT names them (written out: the preset is part of what is compared)
TARGETS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def write_data(folder: Path) -> dict[str, Any]:
    """The runs' data, written for this test: a synthetic QQP split (paraphrase), prompt-completion rows
    (generate) and preference rows over the same prompts (generate DPO). Completions start with a space
    and prompts end on a token boundary, so tokenizing prompt and completion apart (sftdpo) and together
    (TRL) gives the same ids (checked)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_qqp(folder / "qqp-train.csv", N_TRAIN, seed=3)
    write_synthetic_qqp(folder / "qqp-dev.csv", 4, seed=4)
    with open(folder / "qqp-train.csv") as f:
        qqp = [(r["sentence1"], r["sentence2"], int(float(r["is_duplicate"]))) for r in csv.DictReader(f, delimiter="\t")]
    words = ["cat", "dog", "sun", "tree", "blue", "fish", "road", "king", "milk", "rain", "song"]
    gen, prefs = [], []
    for i in range(N_TRAIN):
        a, n = 3 + 7 * i % 40, 2 + i % 5
        if i % 2:
            prompt, completion = f"Count on from {a}:", " " + " ".join(str(a + j) for j in range(1, n + 1))
            rejected = " " + " ".join(str(a - j) for j in range(1, n % 3 + 2))
        else:
            w = words[i % len(words)]
            prompt, completion = f"Repeat the word {w}:", " " + " ".join([w] * n)
            rejected = " " + " ".join([words[(i + 3) % len(words)]] * (1 + n % 2))
        gen.append({"id": f"g{i}", "prompt": prompt, "completion": completion})
        prefs.append({"prompt": prompt, "chosen": completion, "rejected": rejected})
    dev = [{"id": "d0", "prompt": "Count on from 5:", "completion": " 6 7 8"},
           {"id": "d1", "prompt": "Repeat the word sun:", "completion": " sun sun"}]
    for name, rows in (("gen-train", gen), ("gen-dev", dev), ("prefs", prefs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"qqp": qqp, "gen": gen, "prefs": prefs,
            "paraphrase": dict(train=str(folder / "qqp-train.csv"), dev=str(folder / "qqp-dev.csv")),
            "generate": dict(train=str(folder / "gen-train.jsonl"), dev=str(folder / "gen-dev.jsonl")),
            "pairs": f"file:{folder / 'prefs.jsonl'}"}


# -- sftdpo's side ------------------------------------------------------------------------------

def sftdpo_config(case: Case, data: dict) -> RunConfig:
    lora = case.param == "lora"
    return RunConfig(
        task=case.task, model="tiny-llama", device="cpu", precision="fp32", **data[case.task],
        param=case.param, lora_rank=HP["lora_rank"], lora_alpha=HP["lora_alpha"], lora_dropout=0.0,
        lora_targets=case.lora_targets, regime=case.regime, epochs=case.epochs,
        handoff_epoch=case.handoff if case.regime == "sft-dpo" else None,
        lr=HP["lora_lr"] if lora else HP["lr"], dpo_lr=HP["dpo_lr"], batch_size=HP["batch_size"],
        grad_accum=case.grad_accum, weight_decay=HP["weight_decay"], warmup_ratio=HP["warmup_ratio"],
        schedule="linear", max_grad_norm=case.clip, beta=HP["beta"], loss_type="sigmoid",
        pairs=data["pairs"] if case.task == "generate" else "v1", seed=HP["seed"],
        temperature=0.0, max_new_tokens=4, eval_batch_size=8, log_every=1, eval_init=False)


def run_sftdpo(case: Case, data: dict, out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(every optimizer step's training record, the final trainable weights) of sftdpo's run."""
    from safetensors.torch import load_file

    train(sftdpo_config(case, data), out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r for r in records if r["kind"] == "train"],
            load_file(str(out / "checkpoints" / "last" / "weights.safetensors")))


# -- TRL's side ---------------------------------------------------------------------------------

class EpochBatches(torch.utils.data.Sampler):
    """sftdpo's batches, as micro-batches in step order: epoch e (transformers counts from 0) is global
    epoch offset + e + 1, ordered by ops/batching.py's bucketed_batches with that epoch's seed (a staged
    run's DPO stage numbers its epochs after the SFT ones), each step of batch x accum rows split into
    micro-batches of `batch` rows. transformers' Trainer groups consecutive micro-batches into optimizer
    steps, so every step must split into `accum` micro-batches (checked; N_TRAIN makes the short step of
    an epoch 4 + 2 rows at accumulation 2)."""

    def __init__(self, lengths: list[int], batch: int, accum: int, seed: int, offset: int = 0) -> None:
        self.lengths, self.batch, self.accum, self.seed, self.offset, self.epoch = lengths, batch, accum, seed, offset, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def micro_batches(self, epoch: int) -> list[list[int]]:
        steps = bucketed_batches(self.lengths, self.batch * self.accum, epoch_seed(self.seed, self.offset + epoch + 1))
        assert all(len(s) > self.batch * (self.accum - 1) for s in steps), "a step of fewer micro-batches than accum"
        return [s[i : i + self.batch] for s in steps for i in range(0, len(s), self.batch)]

    def __iter__(self):
        return iter(self.micro_batches(self.epoch))

    def __len__(self) -> int:
        return len(self.micro_batches(0))


class EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader whose batch sampler follows Trainer's set_epoch (which _run_epoch calls each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class SameBatches:
    """Trainer mixin: train on `self.batches` (an EpochBatches) instead of a RandomSampler's order. Not a
    difference in what is computed: sftdpo's order is a seeded permutation too, so both sides must
    simply see the same one. (And no usage report to the Hub from a test.)"""

    batches: EpochBatches

    def get_train_dataloader(self):
        ds = self._remove_unused_columns(self.train_dataset, description="training")
        return EpochLoader(ds, batch_sampler=self.batches, collate_fn=self.data_collator)

    def _send_telemetry(self) -> None:
        pass


class StopAfter(TrainerCallback):
    """Ends training after `epochs` epochs (the SFT stage of a staged run: k of the budget's epochs)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kw):
        if round(state.epoch) >= self.epochs:
            control.should_training_stop = True


def trl_classes():
    from trl import DPOTrainer, SFTTrainer

    class SFT(SameBatches, SFTTrainer):
        pass

    class DPO(SameBatches, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Mapped difference (the cloze): TRL 1.16's DPOTrainer always tokenizes text responses and appends
            # EOS to each, so "yes"/"no" would become two-token responses. sftdpo's cloze pair is the one
            # label token read at the last prompt position (the CS224N cloze; one forward per prompt gives
            # both log-probs), so TRL is given the token ids as they are: prompt_ids, [gold], [other].
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
            self.step_pairs = sum(b["input_ids"].size(0) // 2 for b in batches)
            self.step_micro = len(batches)
            return batches, n

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Mapped difference (accumulation): Trainer divides each micro-batch's mean DPO loss by the step's
            # micro-batch count (a mean of means); sftdpo weights each by its pairs over the step's pairs, so
            # batch B x accum k trains exactly as batch kB also when a micro-batch is short (test_training.py::
            # test_grad_accum_equals_the_larger_batch). Equal when the micro-batches are equal; rescaled here.
            return loss * (inputs["input_ids"].size(0) // 2) * self.step_micro / self.step_pairs

    return SFT, DPO


def trl_common(case: Case, out: Path, lr: float, epochs: int) -> dict:
    """TrainingArguments shared by SFTConfig and DPOConfig: the case's hyper-parameters, fp32 on CPU
    (TRL's defaults are bf16 and activation checkpointing), AdamW fused (transformers' default with torch
    >= 2.8; betas 0.9/0.999, eps 1e-8), a log record per optimizer step, nothing saved."""
    return dict(output_dir=str(out), per_device_train_batch_size=HP["batch_size"],
                gradient_accumulation_steps=case.grad_accum, num_train_epochs=epochs, learning_rate=lr,
                lr_scheduler_type="linear", warmup_steps=HP["warmup_ratio"], weight_decay=HP["weight_decay"],
                max_grad_norm=case.clip, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                seed=HP["seed"], logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                activation_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=True)


def lora_config(case: Case):
    from peft import LoraConfig

    return LoraConfig(r=HP["lora_rank"], lora_alpha=HP["lora_alpha"], lora_dropout=0.0,
                      target_modules=TARGETS[case.lora_targets], bias="none", task_type="CAUSAL_LM")


def fresh_model():
    """The pretrained tiny-llama, as sftdpo loads it for seed HP['seed'], with eager attention: the kernel
    sftdpo uses on CPU (loop.choose_attention); SDPA computes the same function in another order."""
    model, tok = load_model("tiny-llama", seed=HP["seed"])
    model.set_attn_implementation("eager")
    return model, tok


def sft_rows(case: Case, data: dict, tok):
    """SFTTrainer's dataset and each row's length (what bucketed_batches orders by)."""
    from datasets import Dataset

    if case.task == "generate":  # text: TRL tokenizes prompt + completion and appends EOS itself
        ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in data["gen"]])
        return ds, None
    # Mapped difference (the cloze): a pre-tokenized prompt-completion row per example, the completion being
    # the label token alone. TRL adds no EOS to pre-tokenized rows (SFTTrainer._prepare_dataset); sftdpo's
    # cloze SFT is the label token's cross-entropy at the last prompt position, one forward per prompt (the
    # CS224N task: the answer is read at that position, an EOS after it is never asked for).
    ids, masks = [], []
    yes, no = (tok(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    for q1, q2, label in data["qqp"]:
        p = tok(PROMPT.format(q1=q1, q2=q2), add_special_tokens=False).input_ids
        ids.append(p + [yes if label else no])
        masks.append([0] * len(p) + [1])
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks}), [len(x) - 1 for x in ids]


def dpo_rows(case: Case, data: dict, tok):
    """DPOTrainer's dataset: pre-tokenized cloze pairs (gold label vs the other), or preference text."""
    from datasets import Dataset

    if case.task == "generate":
        return Dataset.from_list(data["prefs"])
    yes, no = (tok(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for q1, q2, label in data["qqp"]:
        rows["prompt_ids"].append(tok(PROMPT.format(q1=q1, q2=q2), add_special_tokens=False).input_ids)
        rows["chosen_ids"].append([yes if label else no])
        rows["rejected_ids"].append([no if label else yes])
    return Dataset.from_dict(rows)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def quiet():
    """TRL's and datasets' progress output and log lines off for the duration."""
    import datasets
    from transformers.utils import logging as hf_logging

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # DPOTrainer's reference log-prob bar reads it
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars_were_on:
            datasets.enable_progress_bars()
        if tqdm_disable is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable


def trainer_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "grad_norm" in h]


def run_trl(case: Case, data: dict, out: Path) -> dict:
    """TRL's run of the case: {"records": one log dict per optimizer step (both stages, in order), "weights":
    the final trainable weights, "start": the trainable weights before training, "sft_ids"/"dpo_ids":
    the token ids TRL trained on}."""
    from trl import DPOConfig, SFTConfig

    SFT, DPO = trl_classes()
    model, tok = fresh_model()
    lora = case.param == "lora"
    result: dict[str, Any] = {"records": []}
    sft_epochs = {"sft": case.epochs, "dpo": 0, "sft-dpo": case.handoff}[case.regime]
    with quiet():
        if sft_epochs:
            ds, lengths = sft_rows(case, data, tok)
            # The staged run's SFT schedule spans the whole epoch budget (sftdpo's definition: SFT@k->DPO's first k
            # epochs are exactly the SFT-only run's, so the hand-off is a point on that trajectory, and a study
            # trains the shared prefix once); on TRL's side: num_train_epochs = the budget, stopped after k epochs.
            args = SFTConfig(**trl_common(case, out / "sft", HP["lora_lr"] if lora else HP["lr"], case.epochs),
                             completion_only_loss=True)
            tr = SFT(model=model, args=args, train_dataset=ds, processing_class=tok,
                     peft_config=lora_config(case) if lora else None,
                     callbacks=[StopAfter(sft_epochs)] if sft_epochs < case.epochs else None)
            tr.remove_callback(PrinterCallback)
            prepared = tr.train_dataset
            lengths = lengths or [len(x) for x in prepared["input_ids"]]
            tr.batches = EpochBatches(lengths, HP["batch_size"], case.grad_accum, HP["seed"])
            result["sft_ids"] = [list(x) for x in prepared["input_ids"]]
            result["start"] = trainable(tr.model)
            tr.train()
            result["records"] += [{**h, "stage": "sft"} for h in trainer_logs(tr)]
            model = tr.model
        if sft_epochs < case.epochs:
            ds = dpo_rows(case, data, tok)
            # The reference, TRL's: its log-probs precomputed when the trainer is built (precompute_ref_log_probs), from
            # the model as it is then: FFT, the pretrained (DPO-only) or hand-off (staged) weights; LoRA DPO-only, the
            # new adapter disabled (given the base and a peft_config); LoRA staged, the SFT PeftModel, whose trained
            # adapter TRL 1.x copies into a frozen "ref" adapter.
            kw = {"peft_config": lora_config(case)} if lora and not sft_epochs else {}
            args = DPOConfig(**trl_common(case, out / "dpo", HP["dpo_lr"], case.epochs - sft_epochs),
                             beta=HP["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=True)
            tr = DPO(model=model, args=args, train_dataset=ds, processing_class=tok, **kw)
            tr.remove_callback(PrinterCallback)
            prepared = tr.train_dataset
            result["dpo_ids"] = [(list(p), list(c), list(r)) for p, c, r in
                                 zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])]
            # sftdpo's pair-row cost: the prompt for one-token responses, else prompt + the longer response
            lengths = [len(p) + (0 if case.task == "paraphrase" else max(len(c), len(r))) for p, c, r in result["dpo_ids"]]
            tr.batches = EpochBatches(lengths, HP["batch_size"], case.grad_accum, HP["seed"], offset=sft_epochs)
            result.setdefault("start", trainable(tr.model))
            tr.train()
            result["records"] += [{**h, "stage": "dpo"} for h in trainer_logs(tr)]
            model = tr.model
    result["weights"] = trainable(model)
    return result


# -- the comparison -----------------------------------------------------------------------------

def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(case: Case, ours: list[dict], weights: dict[str, torch.Tensor], trl: dict) -> dict[str, float]:
    """The largest difference per compared quantity, the steps on which clipping acted and the range of
    the gradient norms; asserts the step structure (stages, steps)."""
    theirs = trl["records"]
    assert [r["stage"] for r in ours] == [r["stage"] for r in theirs], (len(ours), len(theirs))
    assert [r["global_step"] for r in ours] == list(range(1, len(ours) + 1))
    norms = [r["grad_norm"] for r in theirs]
    diffs = {"steps": len(ours), "clipped": sum(g > case.clip for g in norms), "norm_min": min(norms), "norm_max": max(norms),
             "loss": max(_rel(a["loss"], b["loss"]) for a, b in zip(ours, theirs)),
             "grad_norm": max(_rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(ours, theirs)),
             "lr": max(abs(a["lr"] - b["learning_rate"]) for a, b in zip(ours, theirs))}
    if case.regime != "sft" and case.grad_accum == 1:
        # TRL's DPO metrics in the same units (summed log-probs); with accumulation TRL averages them over
        # micro-batches unweighted, so they are compared at accumulation 1 only
        dpo = [(a, b) for a, b in zip(ours, theirs) if a["stage"] == "dpo"]
        diffs["logps"] = max(_rel(a[k], b[k]) for a, b in dpo for k in ("logps/chosen", "logps/rejected"))
        scale = HP["beta"] * max(abs(b["logps/chosen"]) for _, b in dpo)  # rewards: beta x log-prob differences
        diffs["rewards"] = max(abs(a[k] - b[k]) / scale for a, b in dpo
                               for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert set(weights) <= set(trl["weights"]), sorted(set(weights) - set(trl["weights"]))[:3]
    assert set(trl["start"]) >= set(weights)
    diff = torch.cat([(weights[k] - trl["weights"][k]).flatten() for k in weights]).norm()
    update = torch.cat([(trl["weights"][k] - trl["start"][k]).flatten() for k in weights]).norm()
    diffs["weights"] = float(diff / update)
    return diffs


def check_tokens(case: Case, data: dict, trl: dict, tmp: Path) -> None:
    """TRL trained on the token ids sftdpo did: the SFT rows, and the DPO pairs."""
    run = Run(sftdpo_config(case, data), tmp)
    run.build()
    task = run.task
    if "sft_ids" in trl:
        if case.task == "paraphrase":
            assert [x[:-1] for x in trl["sft_ids"]] == task.train_ids
            assert [x[-1] for x in trl["sft_ids"]] == task.train_labels
        else:
            assert trl["sft_ids"] == task.train_ids
    if "dpo_ids" in trl:
        if case.task == "paraphrase":
            assert [p for p, _, _ in trl["dpo_ids"]] == task.train_ids
            assert [c for _, c, _ in trl["dpo_ids"]] == [[lab] for lab in task.train_labels]
        else:
            from sftdpo.data.preferences import load_preferences
            from sftdpo.objectives.dpo.pairs import file_pairs, sequence_pair_set

            ps = sequence_pair_set(task, file_pairs(task, load_preferences(data["pairs"].removeprefix("file:"), "train")))
            assert trl["dpo_ids"] == list(zip(ps.prompt, ps.chosen, ps.rejected))


def run_case(case: Case, data: dict, tmp: Path) -> dict[str, float]:
    """Train the case on both sides, check the tokens, compare; the largest differences and the seconds."""
    t0 = time.perf_counter()
    ours, weights = run_sftdpo(case, data, tmp / "sftdpo")
    t1 = time.perf_counter()
    theirs = run_trl(case, data, tmp / "trl")
    t2 = time.perf_counter()
    check_tokens(case, data, theirs, tmp / "probe")
    diffs = compare(case, ours, weights, theirs)
    return {**diffs, "sftdpo_s": t1 - t0, "trl_s": t2 - t1}


def assert_within_bounds(diffs: dict[str, float]) -> None:
    assert 0 < diffs["clipped"] < diffs["steps"], f"clipping must act on some steps, not all: {diffs}"
    assert diffs["loss"] <= REL_STEP, diffs
    assert diffs["grad_norm"] <= REL_STEP, diffs
    assert diffs["lr"] <= ABS_LR, diffs
    assert diffs["weights"] <= REL_UPDATE, diffs
    for k in ("logps", "rewards"):
        assert diffs.get(k, 0.0) <= REL_STEP, diffs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("trl-data"))


def _check(case: Case, data: dict, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    assert_within_bounds(run_case(case, data, tmp_path))


# -- the cases run: the full matrix (scripts/trl_matrix.py) and the small set (make test) ----------

# max_grad_norm per (task, param, regime): inside the range of that configuration's gradient norms
CLIP = {("paraphrase", "fft", "sft"): 9.0, ("paraphrase", "lora", "sft"): 2.0, ("generate", "fft", "sft"): 5.0,
        ("generate", "lora", "sft"): 0.9, ("paraphrase", "fft", "dpo"): 0.6, ("paraphrase", "lora", "dpo"): 0.1,
        ("generate", "fft", "dpo"): 2.0, ("generate", "lora", "dpo"): 0.3, ("paraphrase", "fft", "sft-dpo"): 1.0,
        ("paraphrase", "lora", "sft-dpo"): 0.5, ("generate", "fft", "sft-dpo"): 2.0, ("generate", "lora", "sft-dpo"): 0.5}


def case(task: str, param: str, regime: str, grad_accum: int = 1, **kw) -> Case:
    return Case(task, param, regime, grad_accum, clip=CLIP[task, param, regime],
                lora_targets="all-linear" if task == "generate" else "attention", **kw)


MATRIX = [case(t, p, r, a) for r in ("sft", "dpo", "sft-dpo") for p in ("fft", "lora")
          for t in ("paraphrase", "generate") for a in (1, 2)]
# the small set, one test each below (`scripts/trl_matrix.py --small` prints their differences)
SMALL = {"sft_fft_paraphrase": case("paraphrase", "fft", "sft"),
         "sft_lora_generate_accum2": case("generate", "lora", "sft", 2),
         "dpo_lora_generate": case("generate", "lora", "dpo", epochs=2),
         "staged_sft1_dpo_fft_paraphrase": case("paraphrase", "fft", "sft-dpo")}


def test_sft_fft_paraphrase_equals_trl(data, cache, tmp_path):
    """SFT FFT on the paraphrase cloze against SFTTrainer(SFTConfig(completion_only_loss=True, learning_rate=3e-3,
    lr_scheduler_type="linear", warmup_steps=0.3, weight_decay=0.1, max_grad_norm=9, optim="adamw_torch_fused",
    per_device_train_batch_size=4, num_train_epochs=3)) on pre-tokenized rows (prompt, completion = the label
    token): 18 steps, 6 of warm-up, clipping on some steps. Catches a schedule off by one step (or a warm-up
    of round() steps, or the lr logged after the scheduler's step), weight decay on norms (or none),
    other AdamW betas/eps, clipping that is skipped or a norm logged after clipping, a loss over the two
    label words instead of the vocabulary, a wrong label token or prompt, another batch order or epoch seed."""
    _check(SMALL["sft_fft_paraphrase"], data, tmp_path)


def test_sft_lora_generate_accum2_equals_trl(data, cache, tmp_path):
    """SFT LoRA (r 4, alpha 8, dropout 0, all linear layers) on prompt-completion rows, batch 4 x accumulation 2,
    against SFTTrainer(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=[q,k,v,o,gate,up,down]),
    SFTConfig(completion_only_loss=True, gradient_accumulation_steps=2, learning_rate=1e-2, ...)) on the
    text rows, which TRL tokenizes itself (EOS appended): 9 steps, the short step of each epoch split 4 + 2
    rows. Catches a missing EOS or prompt tokens in the loss (the token check, then the loss), micro-batches
    weighted by their mean instead of their target tokens, a wrong LoRA scaling (alpha/r) or target set,
    an adapter initialised from another seed, trainable base weights."""
    _check(SMALL["sft_lora_generate_accum2"], data, tmp_path)


def test_dpo_lora_generate_equals_trl(data, cache, tmp_path):
    """DPO-only LoRA (r 4, alpha 8, all linear layers) on preference text in TRL's explicit-prompt format
    (sftdpo: --pairs file:prefs.jsonl) against DPOTrainer(base model, peft_config=LoraConfig(...),
    DPOConfig(beta=0.1, loss_type=["sigmoid"], learning_rate=1e-3, precompute_ref_log_probs=True,
    num_train_epochs=2, max_grad_norm=0.3, ...)), which tokenizes the pairs itself (EOS after each response)
    and whose reference is the adapter-disabled base: 12 steps, 4 of warm-up. Catches a flipped margin
    (or chosen and rejected swapped), beta applied twice or not at all, the reference taken with the
    adapter enabled, prompt or padding tokens in a response's log-prob, a response without EOS, the DPO
    schedule or learning rate wrong."""
    _check(SMALL["dpo_lora_generate"], data, tmp_path)


def test_staged_sft1_dpo_fft_paraphrase_equals_trl(data, cache, tmp_path):
    """SFT@1->DPO FFT on the cloze (3 epochs: 1 SFT, 2 DPO) against SFTTrainer(num_train_epochs=3) stopped after
    epoch 1 by a TrainerCallback, then DPOTrainer(DPOConfig(num_train_epochs=2, precompute_ref_log_probs=True,
    beta=0.1, learning_rate=1e-3, ...)) on the hand-off model, which is then the reference. Catches an SFT
    schedule over the SFT epochs only, the pretrained model as the reference, the DPO stage's epochs numbered
    from 1 (another batch order), the SFT learning rate or optimizer state carried into DPO."""
    _check(SMALL["staged_sft1_dpo_fft_paraphrase"], data, tmp_path)
