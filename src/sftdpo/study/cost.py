"""What a study will cost, before it runs (`sftdpo study run SPEC --dry-run`)."""

from __future__ import annotations

from ..config import RunConfig

# rough sizes used only by --dry-run; a real run measures everything
_PARAMS = {"smollm2-135m": 135e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "tiny-gpt2": 3.3e6, "tiny-llama": 3.2e6}
_TRAIN_SIZE = {"paraphrase": 283_003, "sonnet": 131}
_DEV_SIZE = {"paraphrase": 40_429, "sonnet": 12}
_TOKENS = {"paraphrase": 55, "sonnet": 170}


def estimate_flops(c: RunConfig) -> float:
    n = _PARAMS.get(c.model, 124e6)
    train = min(c.max_train_examples or 10**9, _TRAIN_SIZE[c.task]) * c.data_fraction
    dev = min(c.max_dev_examples or 10**9, _DEV_SIZE[c.task])
    tok = _TOKENS[c.task]
    dpo_factor = 2 if c.task == "sonnet" else 1  # chosen + rejected rows
    train_flops = 6 * n * tok * train * (c.sft_epochs + dpo_factor * c.dpo_epochs)
    if c.task == "sonnet":  # generation: one token at a time, ~2N FLOPs each, plus rejection sampling
        gen = 2 * n * c.max_new_tokens * (dev * c.num_samples * (c.epochs + 1) + (train * c.pairs_n if c.dpo_epochs else 0))
    else:
        gen = 2 * n * tok * dev * (c.epochs + 1)
    return train_flops + gen


def format_cost(flops: float) -> str:
    # effective rates seen for small models: ~0.12 TFLOP/s on a 2-core CPU (bf16), ~60 TFLOP/s on an H100
    return f"{flops / 0.12e12 / 3600:9.1f} CPU-h {flops / 60e12 / 3600:8.2f} GPU-h"
