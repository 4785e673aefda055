"""The paper's numbers (arXiv 2603.20100, GPT-2 backbone) beside ours."""

from __future__ import annotations

from typing import Any

from .results import Condition


# Reference numbers from arXiv 2603.20100 (GPT-2 backbone), in display units (percent, chrF).
# "match" selects our conditions by config fields; a tuple lists accepted values.
PAPER: dict[str, Any] = {
    "backbone": "gpt2",
    "paraphrase": [
        {"match": {"regime": "sft", "param": "fft"}, "dev/accuracy": 89.87, "dev/macro_f1": 89.21},
        {"match": {"regime": "sft-dpo", "handoff_epoch": 9, "param": "fft"}, "dev/accuracy": 90.05, "dev/macro_f1": 89.43},
        {"match": {"regime": "sft", "param": "lora", "lora_rank": 8}, "dev/accuracy": 87.70, "dev/macro_f1": 87.00},
    ],
    # sonnet values are (lo, hi) ranges; the paper's sonnet runs are full fine-tuning
    "sonnet": [
        {"match": {"regime": "sft", "param": "fft"}, "dev/chrf": (41.29, 41.29)},
        {"match": {"regime": ("dpo", "sft-dpo"), "param": "fft", "pairs": "v1"}, "dev/chrf": (41.5, 41.9)},
    ],
}


# -- paper reference ---------------------------------------------------------------------------

def _paper_entry(task: str, cfg: dict) -> dict | None:
    for entry in PAPER.get(task, []):
        ok = all(cfg.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in entry["match"].items())
        if ok:
            return entry
    return None


def _paper_cells(task: str, cond: Condition, keys: list[tuple[str, str, float]]) -> tuple[str, str]:
    """(paper value(s), ours − paper) for one row; n/a off the paper's backbone."""
    model = cond.cfg.get("model")
    if model != PAPER["backbone"]:
        return f"n/a (backbone {model}, paper: {PAPER['backbone']})", "n/a"
    entry = _paper_entry(task, cond.cfg)
    if entry is None:
        return "—", "—"
    refs, deltas = [], []
    for key, _, scale in keys:
        ref = entry.get(key)
        if ref is None:
            continue
        ours = cond.stat(key, scale)
        if isinstance(ref, tuple):
            lo, hi = ref
            refs.append(f"{lo:.2f}" if lo == hi else f"{lo:g}–{hi:g}")
            if ours is None:
                deltas.append("—")
            else:
                m = ours.mean
                d = m - lo if m < lo else m - hi if m > hi else 0.0
                deltas.append(f"{d:+.2f}" + (" (within range)" if lo != hi and lo <= m <= hi else ""))
        else:
            refs.append(f"{ref:.2f}")
            deltas.append("—" if ours is None else f"{ours.mean - ref:+.2f}")
    return " / ".join(refs), " / ".join(deltas)


