"""How fast this machine runs a study's runs: a short probe of the real pipeline, cached.

For each kind of run in a study (task, backbone, parameterization, batch and decoding settings; the
learning rates, epochs and seeds aside) the probe builds a run on a slice of the real data the way
`sftdpo train` does (same Run, tasks, objectives and `train_step`) and times, on this device and at
this precision: an SFT optimizer step, one evaluation batch (generation included for sonnets),
preparing the DPO stage (pairs and reference log-probs) and a DPO optimizer step, plus the model
and data load. The seconds per example it finds are cached in `<cache>/rates/` per
model/device/precision, so only the first `--dry-run` pays for them
(about 10-40 s per kind of run on a 2-core CPU). `gpt2` without the hub is probed with random
weights of the same architecture: speed does not depend on the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import RunConfig, SftdpoError, cache_dir, cache_dir_at
from ..data import load_task_data
from ..files import stable_hash, write_json_atomic
from ..models import device_description, load_model_for_timing, resolve_device, resolve_precision, synchronize
from ..train.loop import Run
from ..train.step import make_optimizer, make_scheduler, train_step

RATES_VERSION = 1
PROBE_STEPS = 3  # optimizer steps timed per stage; the first is a warm-up, the figure the median of the rest
# what makes one example cost more or less; everything else (learning rates, epochs, seeds, beta, ...) does not
RATE_FIELDS = ("task", "task_name", "model", "param", "lora_targets", "use_dora", "batch_size", "grad_accum",
               "eval_batch_size", "max_new_tokens", "num_samples", "pairs", "pairs_n", "max_length", "conventions",
               "logp_reduction", "train", "dev", "dataset", "template", "label_words", "labels", "predict",
               "completion_only_loss", "compile")


@dataclasses.dataclass
class Rates:
    """Seconds per example on this machine for one kind of run."""

    load_s: float  # model + data load, per run
    sft_s: float  # per training example and SFT epoch
    eval_s: float  # per dev example and evaluation
    dpo_prep_s: float  # per training example, once per DPO stage (pairs, reference log-probs)
    dpo_s: float  # per training example and DPO epoch
    n_train: int  # examples in the task's training data (before --max-train-examples)
    n_dev: int
    source: str  # "measured ... on <device>": where the figures come from


def rate_key(c: RunConfig) -> str:
    device = resolve_device(c.device)
    return stable_hash({"v": RATES_VERSION, **{f: getattr(c, f) for f in RATE_FIELDS}, "device": device_description(device),
                        "precision": resolve_precision(c.precision, device), "threads": torch.get_num_threads()})


def _rates_file(key: str) -> Path:
    return cache_dir() / "rates" / f"{key}.json"


def cached_rates(key: str) -> Rates | None:
    """The cached rates of the kind of run `key` (rate_key), or None."""
    try:
        return Rates(**json.loads(_rates_file(key).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _step_seconds(run: Run, obj) -> float:
    """Seconds per training example of one epoch of `obj`: the median optimizer step after a warm-up
    step, times the epoch's steps, over the examples."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = make_optimizer(params, run.cfg.lr, run.cfg.weight_decay)
    sched = make_scheduler(opt, obj.n_steps(), 0.0, "constant")
    run.model.train(obj.train_mode)
    times = []
    for window in obj.steps(1):
        t0 = time.perf_counter()
        train_step(run.model, obj, window, opt, sched, params, device=run.device, precision=run.precision,
                   max_grad_norm=run.cfg.max_grad_norm)
        synchronize(run.device)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:] or times)
    return step * obj.n_steps() / max(1, len(run.task.train_ids))


def probe(c: RunConfig) -> Rates:
    """Measure `c`'s kind of run on a slice of its data (see the module docstring)."""
    data = load_task_data(c)
    n_train, n_dev = len(data.train), len(data.dev)
    slice_ = dataclasses.replace(
        c, regime="sft-dpo", epochs=2, handoff_epoch=1, max_train_examples=PROBE_STEPS * c.batch_size * c.grad_accum,
        max_dev_examples=min(c.eval_batch_size, c.max_dev_examples or n_dev), data_fraction=1.0, eval_init=False,
        keep_checkpoints="none", report_to="none", data_fingerprint=None)
    note = ""

    def loader(name: str, seed: int = 0):
        nonlocal note
        model, tok, note = load_model_for_timing(name, seed)
        return model, tok

    load_model_for_timing(c.model, c.seed)  # a backbone's one-off conversion (smollm2: ~20 s) is no run's cost
    with tempfile.TemporaryDirectory(prefix="sftdpo-probe-") as d:
        run = Run(slice_, Path(d), loader=loader)
        t0 = time.perf_counter()
        run.build()
        load_s = time.perf_counter() - t0
        sft_s = _step_seconds(run, run.objective("sft"))
        run.model.eval()
        t0 = time.perf_counter()
        run.task.evaluate(run.model, run.device, run.precision)
        synchronize(run.device)
        eval_s = (time.perf_counter() - t0) / max(1, len(run.task.dev))
        # the DPO caches (pairs, reference log-probs) in a scratch directory: the timing must not come
        # from an earlier probe's cache (nor fill the user's)
        with tempfile.TemporaryDirectory(prefix="sftdpo-probe-") as scratch, cache_dir_at(scratch):
            t0 = time.perf_counter()
            dpo = run.objective("dpo")
            dpo_prep_s = (time.perf_counter() - t0) / max(1, len(run.task.train_ids))
        dpo_s = _step_seconds(run, dpo)
    weights = "" if note in ("pretrained", "random init (tiny)") else f", {note}"
    source = f"measured {time.strftime('%Y-%m-%d')} on {device_description(run.device)}, {run.precision}{weights}"
    return Rates(load_s, sft_s, eval_s, dpo_prep_s, dpo_s, n_train, n_dev, source)


def study_rates(configs: list[RunConfig], *, measure: bool = True, say=print) -> dict[str, Rates | None]:
    """{rate_key: Rates} for the kinds of run in `configs`: from the cache, else probed now (with
    `measure`), else None. A kind that cannot be probed (no data, no model) is None, with one line
    saying why."""
    out: dict[str, Rates | None] = {}
    for c in configs:
        key = rate_key(c)
        if key in out:
            continue
        out[key] = cached_rates(key)
        if out[key] is not None or not measure:
            continue
        what = f"{c.task_name or c.task} {c.model} {c.param}" + (f" pairs {c.pairs}" if c.task == "sonnet" else "")
        say(f"measuring {what} on this machine (a few optimizer steps and one eval batch; cached) ...")
        quiet = logging.getLogger("sftdpo")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # the probe's own data and DPO lines would repeat the run's
        try:
            out[key] = probe(c)
        except SftdpoError as e:
            say(f"  could not measure {what}: {e}")
            continue
        finally:
            quiet.setLevel(level)
        write_json_atomic(_rates_file(key), dataclasses.asdict(out[key]))
    return out
