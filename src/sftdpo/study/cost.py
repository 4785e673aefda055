"""What a study will cost, before it runs (`sftdpo study run SPEC --dry-run`)."""

from __future__ import annotations

from ..config import RunConfig

# rough sizes used only by --dry-run; a real run measures everything
_PARAMS = {"smollm2-135m": 135e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "tiny-gpt2": 3.3e6, "tiny-llama": 3.2e6}
_TRAIN_SIZE = {"paraphrase": 283_003, "sonnet": 131}
_DEV_SIZE = {"paraphrase": 40_429, "sonnet": 12}
_TOKENS = {"paraphrase": 55, "sonnet": 170}


def estimate_flops(c: RunConfig, reused_sft_epochs: int = 0) -> float:
    """Training and evaluation FLOPs of one run; `reused_sft_epochs` of its SFT stage (trained and
    evaluated once for the study's shared prefix) cost nothing."""
    n = _PARAMS.get(c.model, 124e6)
    train = min(c.max_train_examples or 10**9, _TRAIN_SIZE[c.task]) * c.data_fraction
    dev = min(c.max_dev_examples or 10**9, _DEV_SIZE[c.task])
    tok = _TOKENS[c.task]
    dpo_factor = 2 if c.task == "sonnet" else 1  # chosen + rejected rows
    evals = c.epochs + 1 - reused_sft_epochs
    train_flops = 6 * n * tok * train * (c.sft_epochs - reused_sft_epochs + dpo_factor * c.dpo_epochs)
    if c.task == "sonnet":  # generation: one token at a time, ~2N FLOPs each, plus rejection sampling
        gen = 2 * n * c.max_new_tokens * (dev * c.num_samples * evals + (train * c.pairs_n if c.dpo_epochs else 0))
    else:
        gen = 2 * n * tok * dev * evals
    return train_flops + gen


def study_flops(runs: list[RunConfig]) -> list[float]:
    """Per run, its FLOPs with shared SFT prefixes charged once: the runs on one SFT trajectory
    (RunConfig.trajectory_key) pay its epochs once, to the run that goes furthest along it."""
    longest: dict[str, RunConfig] = {}
    for c in runs:
        key = c.trajectory_key()
        if key is not None and (key not in longest or c.sft_epochs > longest[key].sft_epochs):
            longest[key] = c
    return [estimate_flops(c, 0 if c.trajectory_key() is None or longest[c.trajectory_key()] is c else c.sft_epochs)
            for c in runs]


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


def format_cost(flops: float) -> str:
    # effective rates seen for small models: ~0.12 TFLOP/s on a 2-core CPU (bf16), ~60 TFLOP/s on an H100
    return f"{flops / 0.12e12 / 3600:9.1f} CPU-h {flops / 60e12 / 3600:8.2f} GPU-h"
