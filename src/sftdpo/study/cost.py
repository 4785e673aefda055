"""What a study will cost, before it runs (`sftdpo study run SPEC --dry-run`): time on this
machine from measured rates (rates.py), a FLOP count where no rate could be measured, and disk."""

from __future__ import annotations

import math

from ..config import RunConfig, SftdpoError
from ..data import data_key, load_task_data, training_size
from .rates import Rates, rate_key

# rough sizes used only by --dry-run; a real run measures everything
_PARAMS = {"smollm2-135m": 135e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "tiny-gpt2": 3.3e6, "tiny-llama": 3.2e6}
# the CS224N splits, assumed for the paper's tasks on their default data when no probe counted it
_TRAIN_SIZE = {"paraphrase": 283_003, "sonnet": 131}
_DEV_SIZE = {"paraphrase": 40_429, "sonnet": 12}
_TOKENS = {"paraphrase": 55, "sonnet": 170}
# effective training FLOP/s where nothing was measured: a 2-core CPU in bf16 (docs/bench-cpu.md), and
# the 12 TFLOP/s an H100 reached on a 124M model (docs/bench-gpu.md; launch-bound, ~2% of its peak)
FLOPS_PER_S = {"cpu": 0.12e12, "cuda": 12e12}


def data_sizes(runs: list[RunConfig], rates: dict[str, Rates | None]) -> list[tuple[int, int] | None]:
    """Per run, (training examples it takes its cuts from (data.training_size), dev examples): from the
    measured rates of its kind of run, else counted from the data (each source read once), else None:
    the paper's tasks on their default data assume the CS224N split sizes (GLUE QQP, read without a
    data directory, has 29% more training pairs); data that cannot be read is the run's error to report."""
    counted: dict[tuple[str, bool], tuple[int, int] | None] = {}
    out: list[tuple[int, int] | None] = []
    for c in runs:
        r = rates.get(rate_key(c))
        if r is not None:
            out.append((r.n_train, r.n_dev))
            continue
        if c.task in _TRAIN_SIZE and not (c.train or c.dev):  # the data directory, or the hub: not read for a guess
            out.append(None)
            continue
        key = data_key(c), c.balance_labels
        if key not in counted:
            try:
                data = load_task_data(c)
                counted[key] = (training_size(c, data), len(data.dev))
            except SftdpoError:
                counted[key] = None
        out.append(counted[key])
    return out


def trained_epochs(c: RunConfig, n_train: float) -> tuple[float, float, int]:
    """(SFT epochs, DPO epochs, evaluations after training) of a run on `n_train` training rows: its
    epochs, or with --budget-steps the passes its budget buys, the last one by the steps it takes."""
    if c.budget_steps is None:
        return c.sft_epochs, c.dpo_epochs, c.epochs
    per_step = c.batch_size * c.grad_accum
    per_pass = max(1, math.ceil(n_train / per_step))
    passes = c.passes(per_pass)
    epochs = passes - 1 + min(1.0, (c.budget_steps - (passes - 1) * per_pass) * per_step / max(n_train, 1))
    return (epochs, 0.0, passes) if c.regime == "sft" else (0.0, epochs, passes)


def estimate_flops(c: RunConfig, reused_sft_epochs: int = 0, sizes: tuple[int, int] | None = None) -> float:
    """Training and evaluation FLOPs of one run on `sizes` = (training, dev) examples (data_sizes;
    None: the CS224N split sizes); `reused_sft_epochs` of its SFT stage (trained and evaluated once for
    the study's shared prefix) cost nothing."""
    n = _PARAMS.get(c.model, 124e6)
    n_train, n_dev = sizes or (_TRAIN_SIZE.get(c.task, 10_000), _DEV_SIZE.get(c.task, 1_000))
    train = min(c.max_train_examples or 10**9, n_train) * c.data_fraction
    dev = min(c.max_dev_examples or 10**9, n_dev)
    tok = _TOKENS.get(c.task, 170 if c.task == "generate" else 55)
    dpo_factor = 2 if c.task in ("sonnet", "generate") else 1  # chosen + rejected rows
    sft_epochs, dpo_epochs, evals = trained_epochs(c, train)
    evals += 1 - reused_sft_epochs
    train_flops = 6 * n * tok * train * (sft_epochs - reused_sft_epochs + dpo_factor * dpo_epochs)
    if c.task in ("sonnet", "generate"):  # generation: one token at a time, ~2N FLOPs each, plus rejection sampling
        gen = 2 * n * c.max_new_tokens * (dev * c.num_samples * evals + (train * c.pairs_n if dpo_epochs else 0))
    else:
        gen = 2 * n * tok * dev * evals
    return train_flops + gen


def estimate_seconds(c: RunConfig, r: Rates, reused_sft_epochs: int = 0, init_eval: bool = True) -> float:
    """Seconds of one run at the measured rates `r`: load, SFT epochs, DPO preparation and epochs,
    and the evaluations (one per epoch, plus the untrained model's unless `init_eval` is False: a
    study measures that once per backbone and dev set). `reused_sft_epochs` come from a shared prefix."""
    n_train = min(c.max_train_examples or 10**9, r.n_train) * c.data_fraction
    n_dev = min(c.max_dev_examples or 10**9, r.n_dev)
    sft_epochs, dpo_epochs, evals = trained_epochs(c, n_train)
    evals += (1 if c.eval_init and init_eval else 0) - reused_sft_epochs
    seconds = r.load_s + n_train * (sft_epochs - reused_sft_epochs) * r.sft_s + evals * n_dev * r.eval_s
    if dpo_epochs:  # on the training examples, or on every pair of a --pairs file
        seconds += (n_train if r.n_pairs is None else r.n_pairs) * (r.dpo_prep_s + dpo_epochs * r.dpo_s)
    return seconds


def reused_epochs(runs: list[RunConfig]) -> list[int]:
    """Per run, the SFT epochs it takes from a shared prefix: the runs on one SFT trajectory
    (RunConfig.trajectory_key) pay its epochs once, to the run that goes furthest along it."""
    longest: dict[str, RunConfig] = {}
    for c in runs:
        key = c.trajectory_key()
        if key is not None and (key not in longest or c.sft_epochs > longest[key].sft_epochs):
            longest[key] = c
    return [0 if c.trajectory_key() is None or longest[c.trajectory_key()] is c else c.sft_epochs for c in runs]


def study_flops(runs: list[RunConfig], sizes: list[tuple[int, int] | None] | None = None) -> list[float]:
    """Per run, its FLOPs on its data's `sizes` (data_sizes) with shared SFT prefixes charged once."""
    sizes = sizes or [None] * len(runs)
    return [estimate_flops(c, k, n) for c, k, n in zip(runs, reused_epochs(runs), sizes)]


def study_seconds(runs: list[RunConfig], rates: dict[str, Rates | None]) -> list[float | None]:
    """Per run, its estimated seconds on this machine (None where its kind has no measured rates),
    shared SFT prefixes and the untrained model's evaluation charged once."""
    seen_init: set[str] = set()
    out: list[float | None] = []
    for c, k in zip(runs, reused_epochs(runs)):
        r = rates.get(rate_key(c))
        init = c.init_eval_key() not in seen_init
        seen_init.add(c.init_eval_key())
        out.append(None if r is None else estimate_seconds(c, r, k, init))
    return out


def flop_seconds(flops: float, device: str) -> float:
    """Seconds at the rough effective rate of FLOPS_PER_S (used where nothing was measured)."""
    return flops / FLOPS_PER_S["cuda" if device.startswith("cuda") else "cpu"]


def weight_bytes(c: RunConfig) -> float:
    """Bytes of a checkpoint's weights (fp32): the whole model for FFT, the adapter for LoRA (rough: r=8
    adapters on the attention projections are ~0.4% of a GPT-2-sized model, on all linear layers ~1.8%)."""
    n = _PARAMS.get(c.model, 124e6)
    if c.param == "lora":
        n *= (0.018 if c.lora_targets == "all-linear" else 0.004) * c.lora_rank / 8
    return 4 * n


def study_disk(runs: list[RunConfig]) -> tuple[float, float]:
    """(bytes left when the study is done, bytes at its peak): what --keep-checkpoints keeps of each
    run; the shared SFT prefixes (weights + AdamW state), kept to the end, and pruned then unless a run
    keeps all; and the largest run's own `last` checkpoint with its optimizer state beside `best`."""
    kept = {"all": 2, "best": 1, "last": 1, "none": 0}
    runs_kept = sum(kept[c.keep_checkpoints] * weight_bytes(c) for c in runs)
    prefixes = 3 * sum({(c.trajectory_key(), c.handoff_epoch): weight_bytes(c)
                        for c in runs if c.regime == "sft-dpo"}.values())
    after = runs_kept + (prefixes if any(c.keep_checkpoints == "all" for c in runs) else 0.0)
    peak = runs_kept + prefixes + max((4 * weight_bytes(c) for c in runs), default=0.0)
    return after, peak


def format_disk(after: float, peak: float) -> str:
    return f"disk: {after / 1e9:.1f} GB kept after the study, up to {peak / 1e9:.1f} GB while it runs (rough)"


def format_gpu_hours(flops: float) -> str:
    return (f"{flops / FLOPS_PER_S['cuda'] / 3600:,.1f} H100-hours at the 12 TFLOP/s a 124M model reached there "
            "(docs/bench-gpu.md; FLOP count, rough)")
