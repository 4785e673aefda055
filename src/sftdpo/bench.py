"""`sftdpo bench`: sftdpo's training, DPO and generation speed beside TRL and a CS224N-style loop.

Every line of the table is one measurement: what was measured, sftdpo's figure, the peer's figure and
the ratio (sftdpo / peer; for the FFT-vs-LoRA lines FFT / LoRA, for the MFU lines achieved / peak).

  sft/paraphrase, sft/sonnet      train tokens/s (non-padding tokens) vs TRL SFTTrainer
  dpo/<task>/ref-model            pairs/s vs TRL DPOTrainer with a reference model (TRL's default handling)
  dpo/<task>/precomputed-ref      pairs/s vs TRL DPOTrainer(precompute_ref_log_probs=True)
  dpo/<task>/cached-ref           pairs/s with sftdpo's reference log-probs already cached (a study's later
                                  runs) vs TRL DPOTrainer with a reference model
  lora/step-time, lora/peak-memory, lora/trainable-params
                                  FFT vs LoRA r=8 (a finding, not a race)
  generate/sonnet                 generated tokens/s: batched KV-cache generation vs a CS224N-style loop
  mfu/bf16, mfu/fp32              training FLOP/s (6 x params x tokens/s) vs the measured matmul peak
  compile/sft-<task>              (with --compile) train tokens/s of `train --compile`'s step vs the eager step
  study/jobs                      runs/hour of a slice of the quick study with --jobs 2 vs one run at a time

Method (same for both sides of every line):
  * Same model weights (one load, deep-copied for each measurement), same tokenizer, same training
    examples (a fixed subset: batch x (warm-up + steps) examples from the data directory), same seed,
    same batch size, same precision (bf16 autocast with fp32 master weights where the hardware has it).
  * sftdpo's steps are the training loop's own step, `train.step.train_step` (autocast forward of the
    objective's loss, backward, gradient clipping, AdamW, LR schedule, zero_grad, the loss read back),
    over the real objectives: `SFTObjective` and `DPOObjective` with reference log-probs from
    `compute_reference_logps`.
  * TRL runs its own `train()`; a TrainerCallback times each step from on_step_begin to on_step_end, so
    data loading and setup are excluded on both sides. No eval, no saving, no logging. Gradient
    checkpointing off (TRL's default is on; sftdpo does not checkpoint).
  * The first steps are warm-up and are not timed; a figure is the median of the timed steps.
  * DPO with precomputed reference log-probs: the precompute pass over the whole pair set is timed
    once and counted in the throughput of one epoch on both sides:
    pairs/s = 1 / (median step time / batch + precompute time / pairs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import torch

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from .config import RunConfig, SftdpoError, cache_dir, cache_dir_at
from .data import load_paraphrase_data, load_sonnet_data
from .models import (apply_lora, autocast, count_params, load_model_for_timing, resolve_device,
                     resolve_precision, synchronize)
from .ops.logprobs import compile_decoder
from .objectives.dpo import DPOObjective
from .objectives.dpo.pairs import label_pair_set, sequence_pair_set
from .objectives.dpo.reference import compute_reference_logps
from .objectives.sft import SFTObjective
from .study import load_spec, run_study
from .study.local import result_line, threads_per_run
from .system import cpu_bf16, cpu_model, rss_mb
from .tasks import ParaphraseTask, SonnetTask
from .train.loop import choose_attention
from .train.step import make_optimizer, make_scheduler, train_step

log = logging.getLogger("sftdpo")

WARMUP_STEPS = {"cpu": 1, "cuda": 3}  # untimed first steps (allocator, kernel selection; CUDA: cuBLAS and caching)
# batch sizes per task and device type (GPUs get bigger batches, as a user would use)
BATCH = {"cpu": {"paraphrase": 8, "sonnet": 4, "dpo-sonnet": 3}, "cuda": {"paraphrase": 32, "sonnet": 8}}
GEN = {"cpu": dict(prompts=8, loop_prompts=2, new_tokens=48), "cuda": dict(prompts=32, loop_prompts=4, new_tokens=96)}
TARGETS = {
    "sft/paraphrase": 1.5, "sft/sonnet": 1.5,
    "dpo/paraphrase/ref-model": 4.0, "dpo/paraphrase/precomputed-ref": 2.0, "dpo/paraphrase/cached-ref": 4.0,
    "dpo/sonnet/precomputed-ref": 1.3,
    "generate/sonnet": 10.0,
    "mfu/bf16": 0.5, "mfu/fp32": 0.5,
}


# ================================================================================================
# Small helpers
# ================================================================================================


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass
class Line:
    """One row of the table."""

    name: str
    what: str
    unit: str
    sftdpo: float | None
    peer: float | None
    peer_name: str
    ratio: float | None = None
    target: float | None = None
    met: bool | None = None
    details: dict = field(default_factory=dict)

    def finish(self) -> "Line":
        if self.ratio is None and self.sftdpo is not None and self.peer:
            self.ratio = self.sftdpo / self.peer
        self.target = TARGETS.get(self.name) if self.target is None else self.target
        if self.target is not None and self.ratio is not None:
            self.met = bool(self.ratio >= self.target)
        return self


def machine_description(device: torch.device) -> dict:
    d: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "cpus": os.cpu_count(), "python": platform.python_version(), "cpu_model": cpu_model(),
                         "cpu_bf16": cpu_bf16()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    for name in ("transformers", "peft", "trl", "accelerate", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            d[name] = version(name)
    return d


# ================================================================================================
# Models and data
# ================================================================================================


def bench_config(task: str, model: str, batch: int, n_train: int, device: torch.device, precision: str) -> RunConfig:
    return RunConfig(task=task, model=model, batch_size=batch, max_train_examples=n_train, max_dev_examples=64,
                     device=device.type if device.type == "cpu" else str(device), precision=precision, seed=0).validate()


def build_task(cfg: RunConfig, tok, cache: dict):
    """Tasks built from the real data directory (data files read once per bench run)."""
    if cfg.task not in cache:
        cache[cfg.task] = load_paraphrase_data(cfg.train, cfg.dev) if cfg.task == "paraphrase" else load_sonnet_data(cfg.train, cfg.dev)
    data = cache[cfg.task]
    return ParaphraseTask(cfg, tok, data) if cfg.task == "paraphrase" else SonnetTask(cfg, tok, data)


def sonnet_bench_pairs(task) -> list[dict]:
    """Preference pairs for timing generation DPO without spending minutes sampling: prompt = a training
    prompt (a sonnet's first 3 lines), chosen = its gold completion, rejected = the next training
    prompt's completion (real text of realistic length; speed does not depend on which text is rejected)."""
    ex = task.pair_examples
    return [{"prompt": e.prompt, "chosen": e.completion, "rejected": ex[(i + 1) % len(ex)].completion, "id": e.id}
            for i, e in enumerate(ex)]


# ================================================================================================
# sftdpo's side: the training loop's step over an objective
# ================================================================================================


def sftdpo_steps(model, obj, *, device: torch.device, precision: str, lr: float, n_steps: int,
                 max_grad_norm: float = 1.0) -> list[dict]:
    """Time the objective's first `n_steps` batches of epoch 1, each one optimizer step of the training
    loop's `train_step` (the LR schedule of a run of n_steps steps, 10% warm-up). Returns one record
    per step: seconds, tokens, rows, loss."""
    model.train(obj.train_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, lr, 0.0)
    sched = make_scheduler(opt, max(n_steps, 1), 0.1, "linear")
    out: list[dict] = []
    for i, window in enumerate(obj.steps(1)):
        if i >= n_steps:
            break
        synchronize(device)
        t0 = time.perf_counter()
        st = train_step(model, obj, window, opt, sched, params, device=device, precision=precision,
                        max_grad_norm=max_grad_norm)
        loss = st.loss.item()  # the loop reads it back every --log-every steps; here every step is timed whole
        synchronize(device)
        rows = sum(b.ref_chosen.numel() if hasattr(b, "ref_chosen") else b.input_ids.size(0) for b in window)
        out.append({"s": time.perf_counter() - t0, "tokens": st.tokens, "rows": rows, "loss": loss})
    return out


def summarise_steps(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:]
    if not timed:  # --steps 0, or data that gives no more optimizer steps than the untimed warm-up ones
        raise SftdpoError(f"no timed steps: the data gave {len(steps)} optimizer step(s), {warmup} of them untimed "
                          "warm-up; use --steps >= 1, and a data directory ($SFTDPO_DATA_DIR) with more training examples")
    return {
        "timed_steps": len(timed), "warmup_steps": warmup,
        "median_step_s": median([s["s"] for s in timed]),
        "tokens_per_s": median([s["tokens"] / s["s"] for s in timed]),
        "rows_per_s": median([s["rows"] / s["s"] for s in timed]),
        "mean_tokens_per_step": sum(s["tokens"] for s in timed) / len(timed),
        "total_tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["s"] for s in timed),
        "step_s": [round(s["s"], 4) for s in timed],
    }


def sftdpo_dpo_objective(model, task, cfg: RunConfig, device: torch.device, precision: str):
    """(DPOObjective, precompute seconds): pairs as a DPO run builds them and the reference log-probs
    from compute_reference_logps (the pass a run makes once before its DPO stage)."""
    if task.name == "paraphrase":
        ps = label_pair_set(task)
    else:
        ps = sequence_pair_set(task, sonnet_bench_pairs(task))
    synchronize(device)
    t0 = time.perf_counter()
    ref_c, ref_r = compute_reference_logps(model, task, ps, cfg, device, precision, adapter_disabled=False)
    synchronize(device)
    pre_s = time.perf_counter() - t0
    return DPOObjective(cfg, task, ps, ref_c, ref_r, {"bench": True}), pre_s


# ================================================================================================
# TRL's side
# ================================================================================================


def trl_available() -> str | None:
    """None when TRL and datasets import, else why not."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"TRL not installed ({type(e).__name__}): pip install -e .[bench]"
    return None


def _trl_quiet():
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    for name in ("trl", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def _step_timer(device: torch.device):
    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            synchronize(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize(device)
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def _trl_args(device: torch.device, precision: str, batch: int, max_steps: int, lr: float, seed: int, out: str,
              compile: bool = False) -> dict:
    return dict(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=max_steps,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=precision == "bf16", fp16=False, use_cpu=device.type == "cpu", gradient_checkpointing=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=seed, data_seed=seed, dataloader_num_workers=0, torch_compile=compile,
    )


def _silence(trainer) -> None:
    """No end-of-training summary printed by the Trainer (logging is off; it prints one anyway)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _recording_collator(collator, counts: list[int]):
    def collate(examples):
        out = collator(examples)
        counts.append(int(out["attention_mask"].sum()) if "attention_mask" in out else int(out["input_ids"].numel()))
        return out

    return collate


def trl_sft(model, tok, task, *, device, precision, batch, n_steps, lr, seed, compile=False) -> dict:
    """TRL SFTTrainer on the same token ids: paraphrase as prompt+completion (completion-only loss: the
    answer token), sonnets as language modelling (loss on every token, as sftdpo's sonnet SFT)."""
    _trl_quiet()
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if task.name == "paraphrase":
        ids = [p + [lab] for p, lab in zip(task.train_ids, task.train_labels)]
        ds = Dataset.from_dict({"input_ids": ids, "completion_mask": [[0] * (len(i) - 1) + [1] for i in ids]})
        completion_only = True
    else:
        ds = Dataset.from_dict({"input_ids": [list(s) for s in task.train_ids]})
        completion_only = None
    timer = _step_timer(device)
    counts: list[int] = []
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = SFTConfig(**_trl_args(device, precision, batch, n_steps, lr, seed, out, compile),
                         completion_only_loss=completion_only, max_length=task.cfg.max_length, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
        trainer.data_collator = _recording_collator(trainer.data_collator, counts)
        _silence(trainer)
        trainer.train()
    steps = [{"s": s, "tokens": c, "rows": batch} for s, c in zip(timer.times, counts)]
    return {"steps": steps, "settings": {"completion_only_loss": completion_only, "gradient_checkpointing": False,
                                         "optim": args.optim, "bf16": args.bf16, "loss_type": args.loss_type}}


def trl_dpo(model, ref_model, tok, task, pairs: list[dict], *, device, precision, batch, n_steps, lr, beta, seed,
            precompute: bool, precompute_batch: int) -> dict:
    """TRL DPOTrainer on the same pairs (prompt/chosen/rejected text; TRL appends end-of-text to each
    response, as sftdpo's sonnet pairs have). With precompute, the precompute pass is timed as a whole."""
    _trl_quiet()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        precompute_s = 0.0

        def _precompute_ref_logps(self, dataset, name, batch_size):
            synchronize(device)
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            synchronize(device)
            TimedDPOTrainer.precompute_s += time.perf_counter() - t0
            return out

    ds = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    timer = _step_timer(device)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(**_trl_args(device, precision, batch, n_steps, lr, seed, out), beta=beta,
                         loss_type=["sigmoid"], max_length=task.cfg.max_length,
                         precompute_ref_log_probs=precompute, precompute_ref_batch_size=precompute_batch if precompute else None)
        trainer = TimedDPOTrainer(model=model, ref_model=None if precompute else ref_model, args=args, train_dataset=ds,
                                  processing_class=tok, callbacks=[timer])
        _silence(trainer)
        trainer.train()
    steps = [{"s": s, "tokens": 0, "rows": batch} for s in timer.times]
    return {"steps": steps, "precompute_s": TimedDPOTrainer.precompute_s if precompute else 0.0,
            "settings": {"precompute_ref_log_probs": precompute, "precompute_ref_batch_size": precompute_batch if precompute else None,
                         "reference": "precomputed" if precompute else "separate frozen copy of the initial model (ref_model)",
                         "gradient_checkpointing": False, "optim": args.optim, "bf16": args.bf16}}


def paraphrase_text_pairs(task) -> list[dict]:
    """The DPO run's paraphrase pairs (paraphrase_pair_set) as text, for TRL."""
    dec = task.tok.decode
    ps = label_pair_set(task)
    return [{"prompt": task.prompt(e), "chosen": dec(c), "rejected": dec(r)} for e, c, r in zip(task.train, ps.chosen, ps.rejected)]


# ================================================================================================
# Generation: batched KV-cache generation vs the CS224N loop
# ================================================================================================


@torch.no_grad()
def cs224n_generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_token_id: int,
                    device: torch.device, precision: str) -> list[int]:
    """The CS224N sonnet generation loop, greedy: one prompt at a time; each new token re-runs the whole
    sequence through the model (no KV cache, logits at every position) and keeps the argmax of the last
    position; stops at end of text. Returns the new token ids (end of text excluded)."""
    model.eval()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        with autocast(device, precision):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1, :]
        nxt = int(torch.argmax(logits.float(), dim=-1))
        if nxt == eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype, device=device)], dim=1)
    return new


def sftdpo_generate_ids(task, model, prompts: Sequence[str], *, device, precision, max_new_tokens: int,
                        batch_size: int) -> list[list[int]]:
    """Greedy continuations through SonnetTask.generate_ids (batched, left-padded, KV cache), as token ids."""
    return task.generate_ids(model, list(prompts), device, precision, temperature=0.0, top_p=1.0,
                             max_new_tokens=max_new_tokens, num_samples=1, seed=0, batch_size=batch_size)


# ================================================================================================
# FFT vs LoRA (a child process per configuration: a clean peak-memory reading)
# ================================================================================================


def _param_child(spec: dict) -> dict:
    """Runs in a fresh process: build the model and the paraphrase task, apply LoRA if asked, time SFT steps."""
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    device = torch.device(spec["device"])
    model, tok, _ = load_model_for_timing(spec["model"])
    choose_attention(model, device)
    cfg = bench_config("paraphrase", spec["model"], spec["batch"], spec["n_train"], device, spec["precision"])
    cfg = RunConfig.from_dict({**cfg.to_dict(), "param": spec["param"], "lora_rank": 8}).validate()
    task = build_task(cfg, tok, {})
    if spec["param"] == "lora":
        model = apply_lora(model, cfg)
    model.to(device)
    trainable, total = count_params(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = rss_mb("VmRSS")
        with contextlib.suppress(OSError):  # reset this process's peak RSS (VmHWM) to its current RSS
            Path("/proc/self/clear_refs").write_text("5")
    steps = sftdpo_steps(model, SFTObjective(task), device=device, precision=spec["precision"], lr=cfg.lr,
                         n_steps=spec["warmup"] + spec["steps"])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = rss_mb("VmHWM")
    return {"summary": summarise_steps(steps, spec["warmup"]), "trainable": trainable, "total": total,
            "peak_memory_mb": peak, "memory_before_training_mb": before, "training_memory_mb": peak - before}


def run_param_child(spec: dict) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_param_child, spec).result()


# ================================================================================================
# Matmul peak
# ================================================================================================


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 7) -> float:
    """Median GFLOP/s of an n x n x n matrix product (2 n^3 FLOPs) at `dtype`, after warm-up."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / median(ts) / 1e9


# ================================================================================================
# The bench
# ================================================================================================


class Bench:
    def __init__(self, model_name: str, *, steps: int, device: torch.device, only: Sequence[str] = (),
                 compile: bool = False, warmup: int | None = None) -> None:
        self.name, self.steps, self.device, self.only, self.compile = model_name, steps, device, list(only), compile
        self.warmup = WARMUP_STEPS["cuda" if device.type == "cuda" else "cpu"] if warmup is None else warmup
        self.precision = resolve_precision("auto", device)
        self.lines: list[Line] = []
        self.notes: dict[str, Any] = {}
        self.data_cache: dict = {}
        self.batch = BATCH["cuda" if device.type == "cuda" else "cpu"]
        self.gen = GEN["cuda" if device.type == "cuda" else "cpu"]
        self.trl_missing = trl_available()
        t0 = time.perf_counter()
        model, self.tok, self.weights = load_model_for_timing(model_name)
        choose_attention(model, device)  # as training.Run.build; the same model for both sides of a line
        model.eval()
        self.notes["attention"] = model.config._attn_implementation + (
            "" if device.type != "cuda" or torch.backends.cuda.cudnn_sdp_enabled() else " (cuDNN SDPA backend off)")
        self.pristine = model  # never trained: each measurement trains a deep copy
        self.n_params = count_params(model)[1]
        self.notes["model_load_s"] = time.perf_counter() - t0
        self._sonnet_sft_bf16: dict | None = None

    # -- selection --------------------------------------------------------------------------------
    def wanted(self, *names: str) -> bool:
        return not self.only or any(o in n for o in self.only for n in names)

    def add(self, line: Line) -> None:
        line.finish()
        self.lines.append(line)
        r = f"{line.ratio:.2f}x" if line.ratio is not None else "n/a"
        log.info("  %-32s sftdpo %-12s peer %-12s %s", line.name, _fmt(line.sftdpo), _fmt(line.peer), r)

    def fresh_model(self):
        m = copy.deepcopy(self.pristine).to(self.device)
        return m

    def task(self, task: str, batch: int | None = None, precision: str | None = None, extra_steps: int = 0):
        """(config, task) with a fixed subset of batch x (warm-up + extra + steps) training examples."""
        b = batch or self.batch[task]
        cfg = bench_config(task, self.name, b, b * (self.warmup + extra_steps + self.steps), self.device,
                           precision or self.precision)
        return cfg, build_task(cfg, self.tok, self.data_cache)

    # -- lines ------------------------------------------------------------------------------------
    def run(self) -> list[Line]:
        for task in ("paraphrase", "sonnet"):
            if self.wanted(f"sft/{task}") or (task == "sonnet" and self.wanted("mfu/bf16")):
                self.sft(task, with_trl=self.wanted(f"sft/{task}"))
        for task in ("paraphrase", "sonnet"):
            if self.wanted(f"dpo/{task}/ref-model", f"dpo/{task}/precomputed-ref", f"dpo/{task}/cached-ref"):
                self.dpo(task)
        if self.wanted("lora/step-time", "lora/peak-memory", "lora/trainable-params"):
            self.fft_vs_lora()
        if self.wanted("generate/sonnet"):
            self.generation()
        if self.wanted("mfu/bf16", "mfu/fp32"):
            self.mfu()
        for task in ("paraphrase", "sonnet"):
            if self.compile and self.wanted(f"compile/sft-{task}"):
                self.compiled(task)
        if self.wanted("study/jobs"):
            self.study_jobs()
        return self.lines

    def sft(self, task_name: str, with_trl: bool = True) -> None:
        cfg, task = self.task(task_name)
        n = self.warmup + self.steps
        torch.manual_seed(0)
        ours = summarise_steps(sftdpo_steps(self.fresh_model(), SFTObjective(task), device=self.device,
                                            precision=self.precision, lr=cfg.lr, n_steps=n), self.warmup)
        if task_name == "sonnet" and self.precision == "bf16":
            self._sonnet_sft_bf16 = ours
        if not with_trl:
            return
        peer, details = None, {"sftdpo": ours, "batch": cfg.batch_size, "examples": len(task.train_ids), "precision": self.precision}
        if self.trl_missing:
            details["trl"] = self.trl_missing
        else:
            torch.manual_seed(0)
            res = trl_sft(self.fresh_model(), self.tok, task, device=self.device, precision=self.precision,
                          batch=cfg.batch_size, n_steps=n, lr=cfg.lr, seed=cfg.seed)
            trl = summarise_steps(res["steps"], self.warmup)
            peer = trl["tokens_per_s"]
            details["trl"] = {**trl, **res["settings"]}
        what = ("SFT paraphrase (cloze, loss on the answer token)" if task_name == "paraphrase"
                else "SFT sonnets (causal LM loss on every token)")
        self.add(Line(f"sft/{task_name}", f"{what}: train tokens/s (non-padding), B={cfg.batch_size}, {self.precision}",
                      "tokens/s", ours["tokens_per_s"], peer, "TRL SFTTrainer", details=details))

    def compiled(self, task_name: str) -> None:
        """`--compile`'s step (ops.logprobs.compile_decoder: the decoder through torch.compile with
        dynamic shapes) against the eager step, side by side on fresh copies of one model, same
        batches; the compiled side gets an extra warm-up step (its first steps compile)."""
        cfg, task = self.task(task_name, extra_steps=1)
        n = self.warmup + 1 + self.steps
        sides = {}
        for side in ("eager", "compiled"):
            model = self.fresh_model()
            if side == "compiled":
                compile_decoder(model)
            torch.manual_seed(0)
            steps = sftdpo_steps(model, SFTObjective(task), device=self.device, precision=self.precision, lr=cfg.lr,
                                 n_steps=n)
            sides[side] = {**summarise_steps(steps, self.warmup + 1), "first_step_s": steps[0]["s"],
                           "losses": [s["loss"] for s in steps]}
            del model
        diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(sides["eager"]["losses"], sides["compiled"]["losses"]))
        self.add(Line(f"compile/sft-{task_name}", f"SFT {task_name} step, torch.compile vs eager: train tokens/s, "
                      f"B={cfg.batch_size}, {self.precision}", "tokens/s", sides["compiled"]["tokens_per_s"],
                      sides["eager"]["tokens_per_s"], "eager step",
                      details={**sides, "max_rel_loss_diff": diff, "compile": "decoder, dynamic=True"}))

    def study_jobs(self, jobs: int = 2) -> None:
        """A slice of the quick study (its paraphrase runs, cut small) with `--jobs 2`, each run on half
        the CPU threads, against one run at a time on all of them; each side with a fresh cache (no
        untrained-model evaluation or reference log-probs carried over), the converted backbone shared."""
        overrides = {"model": self.name, "device": self.device.type if self.device.type == "cpu" else str(self.device),
                     "precision": self.precision, "max_train_examples": 32, "max_dev_examples": 48}
        user_cache = cache_dir()
        walls, results = {}, {}
        for n in (1, jobs):
            with tempfile.TemporaryDirectory(prefix="sftdpo-bench-study-") as d:
                for sub in ("models", "tokenizers", "sources"):
                    if (user_cache / sub).exists():
                        (Path(d) / "cache").mkdir(exist_ok=True)
                        os.symlink(user_cache / sub, Path(d) / "cache" / sub)
                with cache_dir_at(Path(d) / "cache"):
                    t0 = time.perf_counter()
                    out = run_study(load_spec("quick"), Path(d) / "study", only=["task=paraphrase"], overrides=overrides,
                                    report=False, jobs=n)
                    walls[n] = time.perf_counter() - t0
                    results[n] = {p.name: result_line(p) for p in sorted((out / "runs").iterdir())}
        runs = len(results[1])
        self.add(Line("study/jobs", f"quick's {runs} paraphrase runs (32 train, 48 dev): runs/hour, --jobs {jobs} "
                      f"({threads_per_run(jobs)} CPU thread(s) each) vs --jobs 1", "runs/h", runs * 3600 / walls[jobs], runs * 3600 / walls[1],
                      "--jobs 1", details={"wall_s": {f"jobs{k}": v for k, v in walls.items()},
                                           "results_identical": results[1] == results[jobs], "results": results}))

    def dpo(self, task_name: str) -> None:
        cfg, task = self.task(task_name, batch=self.batch.get(f"dpo-{task_name}"))
        n = self.warmup + self.steps
        torch.manual_seed(0)
        model = self.fresh_model()
        obj, pre_s = sftdpo_dpo_objective(model, task, cfg, self.device, self.precision)
        ours = summarise_steps(sftdpo_steps(model, obj, device=self.device, precision=self.precision, lr=cfg.dpo_lr,
                                            n_steps=n), self.warmup)
        n_pairs = len(obj.ps)
        ours_pps = 1.0 / (ours["median_step_s"] / cfg.batch_size + pre_s / n_pairs)
        ours_d = {**ours, "precompute_s": pre_s, "pairs": n_pairs, "pairs_per_s_cached_reference": cfg.batch_size / ours["median_step_s"],
                  "reference": "precomputed once (compute_reference_logps), counted over one epoch"}
        pre_bs = cfg.eval_batch_size if task_name == "paraphrase" else cfg.batch_size
        pairs = paraphrase_text_pairs(task) if task_name == "paraphrase" else sonnet_bench_pairs(task)
        what = ("DPO paraphrase (yes/no label pairs)" if task_name == "paraphrase"
                else "DPO sonnets (true vs other continuation)")
        for variant, precompute in (("ref-model", False), ("precomputed-ref", True)):
            name = f"dpo/{task_name}/{variant}"
            if not self.wanted(name) and not (variant == "ref-model" and self.wanted(f"dpo/{task_name}/cached-ref")):
                continue
            peer, details = None, {"sftdpo": ours_d, "batch": cfg.batch_size, "pairs": n_pairs, "precision": self.precision}
            if self.trl_missing:
                details["trl"] = self.trl_missing
            else:
                torch.manual_seed(0)
                ref = None if precompute else self.fresh_model().eval()
                res = trl_dpo(self.fresh_model(), ref, self.tok, task, pairs, device=self.device, precision=self.precision,
                              batch=cfg.batch_size, n_steps=n, lr=cfg.dpo_lr, beta=cfg.beta, seed=cfg.seed,
                              precompute=precompute, precompute_batch=pre_bs)
                trl = summarise_steps(res["steps"], self.warmup)
                peer = 1.0 / (trl["median_step_s"] / cfg.batch_size + res["precompute_s"] / len(pairs))
                details["trl"] = {**trl, "precompute_s": res["precompute_s"], **res["settings"]}
                del ref
            label = "TRL DPOTrainer, reference model" if not precompute else "TRL DPOTrainer, precompute_ref_log_probs"
            self.add(Line(name, f"{what}: pairs/s over one epoch, reference pass counted, B={cfg.batch_size}, "
                                f"{self.precision}", "pairs/s", ours_pps, peer, label, details=details))
            if not precompute:
                # a study's later runs on the same backbone and pairs read the reference log-probs from sftdpo's cache
                self.add(Line(f"dpo/{task_name}/cached-ref", f"{what}: pairs/s with the reference log-probs from sftdpo's "
                              f"cache (no reference pass), B={cfg.batch_size}, {self.precision}", "pairs/s",
                              ours_d["pairs_per_s_cached_reference"], peer, label,
                              details={"sftdpo": "see the ref-model line", "trl": "see the ref-model line"}))

    def fft_vs_lora(self) -> None:
        b = self.batch["paraphrase"]
        steps = min(self.steps, 4)  # step time is a finding here, not a race: a few steps suffice
        spec = dict(model=self.name, device=str(self.device), precision=self.precision, batch=b,
                    n_train=b * (self.warmup + steps), warmup=self.warmup, steps=steps)
        fft = run_param_child({**spec, "param": "fft"})
        lora = run_param_child({**spec, "param": "lora"})
        details = {"fft": fft, "lora": lora, "task": "SFT paraphrase",
                   "lora_config": "r=8, alpha=16, attention projections", "memory": (
                       "CUDA: torch max_memory_allocated; CPU: peak resident set (VmHWM) during training of a fresh "
                       "process per configuration (training_memory_mb: its growth over the loaded model and data)")}
        self.add(Line("lora/step-time", f"SFT paraphrase step time, FFT vs LoRA r=8, B={b}, {self.precision}", "s/step",
                      fft["summary"]["median_step_s"], lora["summary"]["median_step_s"], "sftdpo LoRA r=8", details=details))
        self.add(Line("lora/peak-memory", "peak memory during training, FFT vs LoRA r=8", "MiB",
                      fft["peak_memory_mb"], lora["peak_memory_mb"], "sftdpo LoRA r=8",
                      details={"fft_training_memory_mb": fft["training_memory_mb"],
                               "lora_training_memory_mb": lora["training_memory_mb"]}))
        self.add(Line("lora/trainable-params", "trainable parameters, FFT vs LoRA r=8", "params",
                      float(fft["trainable"]), float(lora["trainable"]), "sftdpo LoRA r=8",
                      details={"total_params": fft["total"]}))

    def generation(self) -> None:
        cfg, task = self.task("sonnet")
        assert isinstance(task, SonnetTask)
        prompts = [task.prompt_text(s) for s in list(task.dev) + list(task.train)][: self.gen["prompts"]]
        m = self.gen["new_tokens"]
        model = self.fresh_model().eval()
        eos = self.tok.eos_token_id
        # warm-up, then repeated measurements of the whole batched call
        sftdpo_generate_ids(task, model, prompts[:2], device=self.device, precision=self.precision, max_new_tokens=4,
                            batch_size=len(prompts))
        runs = []
        for _ in range(3):
            synchronize(self.device)
            t0 = time.perf_counter()
            ids = sftdpo_generate_ids(task, model, prompts, device=self.device, precision=self.precision,
                                      max_new_tokens=m, batch_size=len(prompts))
            synchronize(self.device)
            dt = time.perf_counter() - t0
            runs.append((sum(map(len, ids)) / dt, dt, sum(map(len, ids))))
        ours = median([r[0] for r in runs])
        # the loop: one prompt at a time (per-prompt rates; median)
        loop_prompts = prompts[: self.gen["loop_prompts"]]
        cs224n_generate(model, self.tok(loop_prompts[0], add_special_tokens=False).input_ids, max_new_tokens=2,
                        eos_token_id=eos, device=self.device, precision=self.precision)
        loop = []
        for p in loop_prompts:
            pid = self.tok(p, add_special_tokens=False).input_ids
            synchronize(self.device)
            t0 = time.perf_counter()
            new = cs224n_generate(model, pid, max_new_tokens=m, eos_token_id=eos, device=self.device, precision=self.precision)
            synchronize(self.device)
            dt = time.perf_counter() - t0
            loop.append((len(new) / dt, dt, len(new)))
        peer = median([r[0] for r in loop])
        self.add(Line("generate/sonnet", f"sonnet generation, greedy, {m} new tokens, {self.precision}: generated tokens/s",
                      "tokens/s", ours, peer, "CS224N loop (no KV cache, one prompt at a time)",
                      details={"sftdpo": {"prompts": len(prompts), "batch": len(prompts), "runs": runs,
                                          "method": "SonnetTask.generate_ids: left-padded batch, KV cache, decode loop"},
                               "loop": {"prompts": len(loop_prompts), "runs": loop,
                                        "method": "re-runs the whole sequence for every new token (CS224N SonnetGPT.generate)"}}))

    def mfu(self) -> None:
        peaks = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if self.wanted(f"mfu/{name}"):
                peaks[name] = matmul_peak_gflops(self.device, dtype)
        convention = ("achieved = 6 x N x tokens/s, N = all parameters (tied embeddings once; attention-score FLOPs "
                      "not counted), tokens/s = sftdpo SFT sonnets FFT (LM head at every position)")
        if "bf16" in peaks and self.precision == "bf16":
            s = self._sonnet_sft_bf16
            if s is None:
                cfg, task = self.task("sonnet")
                s = summarise_steps(sftdpo_steps(self.fresh_model(), SFTObjective(task), device=self.device,
                                                 precision="bf16", lr=cfg.lr, n_steps=self.warmup + self.steps), self.warmup)
            achieved = 6 * self.n_params * s["tokens_per_s"] / 1e9
            self.add(Line("mfu/bf16", "training MFU, bf16 autocast: achieved GFLOP/s vs measured bf16 matmul peak",
                          "GFLOP/s", achieved, peaks["bf16"], "bf16 matmul peak",
                          details={"convention": convention, "params": self.n_params, "tokens_per_s": s["tokens_per_s"]}))
        if "fp32" in peaks:
            cfg, task = self.task("sonnet", precision="fp32")
            steps = max(2, min(3, self.steps // 2))
            s = summarise_steps(sftdpo_steps(self.fresh_model(), SFTObjective(task), device=self.device,
                                             precision="fp32", lr=cfg.lr, n_steps=1 + steps), 1)
            achieved = 6 * self.n_params * s["tokens_per_s"] / 1e9
            self.add(Line("mfu/fp32", "training MFU, fp32: achieved GFLOP/s vs measured fp32 matmul peak",
                          "GFLOP/s", achieved, peaks["fp32"], "fp32 matmul peak",
                          details={"convention": convention, "params": self.n_params, "tokens_per_s": s["tokens_per_s"],
                                   "timed_steps": steps, "tf32": torch.backends.cuda.matmul.allow_tf32}))


# ================================================================================================
# Output
# ================================================================================================


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def format_table(result: dict) -> str:
    out = []
    for model, block in result["models"].items():
        out.append(f"model {model} ({block['weights']}, {block['params'] / 1e6:.1f}M params) on {block['device_name']}, "
                   f"precision {block['precision']}, {block['steps']} timed steps after {block['warmup']} warm-up")
        out.append(f"{'line':32s} {'sftdpo':>10s} {'peer':>10s} {'ratio':>8s} {'target':>7s}  peer / unit")
        for ln in block["lines"]:
            ratio = f"{ln['ratio']:.2f}x" if ln["ratio"] is not None else "n/a"
            tgt = f">={ln['target']:g}" if ln["target"] is not None else ""
            mark = {True: " ok", False: " MISS", None: ""}[ln["met"]] if ln["target"] is not None else ""
            out.append(f"{ln['name']:32s} {_fmt(ln['sftdpo']):>10s} {_fmt(ln['peer']):>10s} {ratio:>8s} {tgt:>7s}{mark:5s} "
                       f"{ln['peer_name']} / {ln['unit']}")
        out.append("")
    return "\n".join(out)


def format_markdown(result: dict) -> str:
    out = []
    m = result["machine"]
    for model, block in result["models"].items():
        out.append(f"**{model}** ({block['weights']}, {block['params'] / 1e6:.1f}M params), {block['device_name']}, "
                   f"{block['precision']}, median of {block['steps']} timed steps after {block['warmup']} warm-up, "
                   f"bench wall time {block['wall_s']:.0f} s\n")
        out.append("| line | what | sftdpo | peer | ratio | target |")
        out.append("| --- | --- | ---: | ---: | ---: | --- |")
        for ln in block["lines"]:
            ratio = f"{ln['ratio']:.2f}x" if ln["ratio"] is not None else "n/a"
            tgt = ""
            if ln["target"] is not None:
                tgt = f"≥ {ln['target']:g} " + {True: "met", False: "**not met**", None: ""}[ln["met"]]
            out.append(f"| `{ln['name']}` | {ln['what']} ({ln['unit']}; peer: {ln['peer_name']}) | {_fmt(ln['sftdpo'])} | "
                       f"{_fmt(ln['peer'])} | {ratio} | {tgt} |")
        out.append("")
    out.append("Machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    return "\n".join(out)


def run_bench(models: Sequence[str], *, steps: int, device: str = "auto", only: Sequence[str] = (),
              compile: bool = False, warmup: int | None = None) -> dict:
    dev = resolve_device(device)
    if steps < 1:
        raise SftdpoError("--steps must be >= 1")
    result: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_description(dev),
                              "argv": sys.argv, "method": __doc__.split("Method")[1].strip(), "models": {}}
    for name in models:
        t0 = time.perf_counter()
        log.info("bench %s on %s", name, dev)
        b = Bench(name, steps=steps, device=dev, only=only, compile=compile, warmup=warmup)
        lines = b.run()
        result["models"][name] = {
            "weights": b.weights, "params": b.n_params, "precision": b.precision, "steps": steps, "warmup": b.warmup,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else result["machine"].get("cpu_model", "cpu"),
            "batch": b.batch, "generation": b.gen, "wall_s": time.perf_counter() - t0, "notes": b.notes,
            "lines": [asdict(ln) for ln in lines],
        }
        del b
    return result


def cli_bench(ns) -> int:
    models = ns.model or ["smollm2-135m"]
    result = run_bench(models, steps=ns.steps, device=ns.device, only=ns.only, compile=ns.compile)
    print(format_table(result))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    md = out.with_suffix(".md")
    md.write_text(format_markdown(result) + "\n")
    print(f"wrote {out} and {md}")
    return 0
