"""How fast this machine runs a study's runs: a short probe of the real pipeline, cached.

For each kind of run in a study (task, data, backbone, parameterization, batch and decoding settings;
the learning rates, epochs and seeds aside) the probe builds a run on a slice of the real data the way
`sftdpo train` does (same Run, tasks, objectives and `train_step`) and times, on this device and at
this precision: an SFT epoch, an evaluation (generation included for sonnets), preparing the DPO
stage (pairs and reference log-probs) and a DPO epoch, plus the model and data load. The training
slice (and a classification dev slice) is PROBE_GROUPS batches of examples of near-equal length at
evenly spaced quantiles of the data's lengths, so its batches are padded as the real run's
length-bucketed ones are (a random 128-row slice padded to its longest row timed GPT-2's QQP
evaluation at 6.5x the length-matched rate); the padding that remains between them (a run on few
rows makes wide batches) scales the figures by padded tokens (padding_factor). Epochs and
evaluation run twice, the second timed. The
seconds per example it finds are cached in `<cache>/rates/` per model/device/precision/threads, so
only the first `--dry-run` pays for them (about 30-60 s per kind of run on a 2-core CPU; minutes
where DPO pairs are sampled). `gpt2` without the hub is probed with random weights of the same
architecture: speed does not depend on the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig, SftdpoError, cache_dir, cache_dir_at
from ..data import data_key, load_task_data, subsample, training_size
from ..data.preferences import load_preferences
from ..files import stable_hash, write_json_atomic
from ..models import device_description, load_model_for_timing, resolve_device, resolve_precision, synchronize
from ..ops.batching import bucketed_batches
from ..tasks import make_task
from ..train.loop import Run
from ..train.step import make_optimizer, make_scheduler, train_step

RATES_VERSION = 2  # 2: length-matched slices, warmed-up timings, tokenization and start-up in load_s, n_pairs
PROBE_GROUPS = 3  # batches timed per stage, one per length quantile
LENGTH_SAMPLE = 20_000  # examples tokenized to find the quantiles (and to time tokenization)
# what makes one example cost more or less, besides the data (data_key) and the machine (max_*_examples:
# few rows make wide, padded batches); everything else (learning rates, epochs, seeds, beta, ...) does not,
# data_fraction hardly (its smallest cuts pad a little more: not worth a probe each)
RATE_FIELDS = ("task", "task_name", "model", "param", "lora_targets", "use_dora", "batch_size", "grad_accum",
               "eval_batch_size", "max_new_tokens", "num_samples", "pairs", "pairs_n", "max_length", "conventions",
               "preprocess", "logp_reduction", "label_words", "predict", "completion_only_loss", "compile",
               "max_train_examples", "max_dev_examples", "balance_labels")


@dataclasses.dataclass
class Rates:
    """Seconds per example on this machine for one kind of run."""

    load_s: float  # model + data load and the first steps' one-off cost, per run
    sft_s: float  # per training example and SFT epoch
    eval_s: float  # per dev example and evaluation
    dpo_prep_s: float  # per training example, once per DPO stage (pairs, reference log-probs)
    dpo_s: float  # per training example and DPO epoch
    n_train: int  # examples in the task's training data (before --max-train-examples)
    n_dev: int
    source: str  # "measured ... on <device>": where the figures come from
    n_pairs: int | None = None  # pairs of a --pairs file (DPO figures per pair); None: per training example


def rate_key(c: RunConfig) -> str:
    device = resolve_device(c.device)
    return stable_hash({"v": RATES_VERSION, **{f: getattr(c, f) for f in RATE_FIELDS}, "data": data_key(c),
                        "device": device_description(device),
                        "precision": resolve_precision(c.precision, device), "threads": torch.get_num_threads()})


def _rates_file(key: str) -> Path:
    return cache_dir() / "rates" / f"{key}.json"


def cached_rates(key: str) -> Rates | None:
    """The cached rates of the kind of run `key` (rate_key), or None."""
    try:
        return Rates(**json.loads(_rates_file(key).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def length_groups(lengths: Sequence[int], size: int, k: int) -> list[int]:
    """Indices of `k` groups of `size` rows of near-equal length centred on evenly spaced quantiles of
    `lengths` (the midpoint rule): batches padded as a real run's length-bucketed batches are, whose
    mean time is then the mean batch time of an epoch or an evaluation."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    rows: set[int] = set()
    for q in range(k):
        start = round((q + 0.5) * len(order) / k) - size // 2
        rows.update(order[min(max(0, start), max(0, len(order) - size)):][:size])
    return sorted(rows)


def padded_per_row(lengths: Sequence[int], batches: list[list[int]], micro: int | None = None) -> float:
    """Tokens per row, padding included, of `batches` (rows of `lengths`, in length order within each),
    each split into micro-batches of `micro` rows (Task.train_steps: padding is per micro-batch)."""
    size = micro or max(map(len, batches), default=1)
    parts = [b[i : i + size] for b in batches for i in range(0, len(b), size)]
    return sum(len(m) * max(lengths[i] for i in m) for m in parts) / max(1, sum(map(len, batches)))


def padding_factor(lengths: Sequence[int], n: int, size: int, rows: list[int], *, shuffle: bool,
                   micro: int | None = None) -> float:
    """Padded tokens per row of a run's batches of `size` from `n` of these examples (ops.batching.
    bucketed_batches: training sorts windows of shuffled rows, evaluation all of them; few rows make
    wide batches) over those of the probe's `rows` batched in length order: the measured time per row
    is scaled by it."""
    sub = subsample(list(range(len(lengths))), n)
    run = [[sub[i] for i in b] for b in bucketed_batches([lengths[i] for i in sub], size, 0, shuffle=shuffle)]
    probe = [[rows[i] for i in b] for b in bucketed_batches([lengths[i] for i in rows], size, 0, shuffle=False)]
    return padded_per_row(lengths, run, micro) / padded_per_row(lengths, probe, micro)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, float]:
    """Seconds of two calls of `fn`: the second is the steady rate; what the first took more is a
    run's one-off start (new shapes for the kernels, the optimizer state allocated)."""
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds[1], max(0.0, seconds[0] - seconds[1])


def _epoch_seconds(run: Run, obj, rows: int) -> tuple[float, float]:
    """(seconds per row of an epoch of `obj` over the probe's `rows` rows, one-off seconds)."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = make_optimizer(run.model, run.cfg.lr, run.cfg.weight_decay)
    sched = make_scheduler(opt, 2 * obj.n_steps(), 0.0, "constant")
    run.model.train(obj.train_mode)
    epochs = iter((1, 2))

    def epoch() -> None:
        for window in obj.steps(next(epochs)):
            train_step(run.model, obj, window, opt, sched, params, device=run.device, precision=run.precision,
                       max_grad_norm=run.cfg.max_grad_norm)

    steady, once = _timed(run.device, epoch)
    return steady / max(1, rows), once


@dataclasses.dataclass
class _Slice:
    """The examples a probe runs on, and what relates them to the run they stand for."""

    data: Any  # TaskData: PROBE_GROUPS length-matched training batches and as many evaluation batches
    n_train: int  # the run's training examples before its cuts (Rates.n_train), and dev examples
    n_dev: int
    read_s: float  # reading all the files and tokenizing the examples a run keeps
    train_pad: float  # padding factors (padding_factor) of training steps, evaluation, DPO preparation
    dev_pad: float
    prep_pad: float


def _probe_slice(c: RunConfig, tok) -> _Slice:
    """The probe's slice of `c`'s data, its lengths found on a sample of LENGTH_SAMPLE examples per split."""
    load_task_data(c)  # a first read may download or fill the disk cache: no run's cost
    t0 = time.perf_counter()
    data = load_task_data(c)
    t1 = time.perf_counter()
    sample = dataclasses.replace(data, train=subsample(data.train, LENGTH_SAMPLE), dev=subsample(data.dev, LENGTH_SAMPLE))
    task = make_task(dataclasses.replace(c, max_train_examples=None, max_dev_examples=None, data_fraction=1.0,
                                         balance_labels=False), tok, sample)
    # a run reads all of its files and tokenizes the examples it keeps (data_fraction aside: not in the key)
    n_train, n_dev = training_size(c, data), len(data.dev)
    run_train, run_dev = min(c.max_train_examples or n_train, n_train), min(c.max_dev_examples or n_dev, n_dev)
    read_s = t1 - t0 + (time.perf_counter() - t1) * (run_train + run_dev) / (len(sample.train) + len(sample.dev))
    step, lengths = c.batch_size * c.grad_accum, task.train_lengths()
    train_rows = length_groups(lengths, step, PROBE_GROUPS)
    n = min(run_train, len(lengths))
    train_pad = padding_factor(lengths, n, step, train_rows, shuffle=True, micro=c.batch_size)
    # the DPO preparation's reference log-probs go through the training rows in length order
    prep_pad = padding_factor(lengths, n, c.eval_batch_size, train_rows, shuffle=False)
    # classification evaluates prompts in length order; generation's cost is its new tokens
    dev_lengths = [len(s) for s in getattr(task, "dev_ids", ())] or [1] * len(sample.dev)
    dev_rows = length_groups(dev_lengths, c.eval_batch_size, PROBE_GROUPS)
    dev_pad = padding_factor(dev_lengths, min(run_dev, len(dev_lengths)), c.eval_batch_size, dev_rows, shuffle=False)
    rows = dataclasses.replace(sample, train=[sample.train[i] for i in train_rows], dev=[sample.dev[i] for i in dev_rows])
    return _Slice(rows, n_train, n_dev, read_s, train_pad, dev_pad, prep_pad)


def _probe_pairs(c: RunConfig, folder: Path) -> tuple[str, int | None]:
    """(--pairs for the probe, the number of pairs of a --pairs file): DPO on a file trains on all of
    its pairs, whatever the training examples; the probe takes its first rows, copied."""
    if not c.pairs.startswith("file:"):
        return c.pairs, None
    prefs = load_preferences(c.pairs.removeprefix("file:"), c.train_split)
    rows = [{"chosen": p.chosen, "rejected": p.rejected, **({"prompt": p.prompt} if p.prompt else {})}
            for p in prefs[: PROBE_GROUPS * c.batch_size * c.grad_accum]]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return f"file:{path}", len(prefs)


def probe(c: RunConfig) -> Rates:
    """Measure `c`'s kind of run on a slice of its data (see the module docstring)."""
    # a backbone's one-off conversion (smollm2: ~20 s) is no run's cost; its tokenizer finds the slice
    _, tok, _ = load_model_for_timing(c.model, c.seed)
    sl = _probe_slice(c, tok)
    note = ""

    def loader(name: str, seed: int = 0):
        nonlocal note
        model, tok, note = load_model_for_timing(name, seed)
        return model, tok

    with tempfile.TemporaryDirectory(prefix="sftdpo-probe-") as d:
        pairs, n_pairs = _probe_pairs(c, Path(d))
        slice_ = dataclasses.replace(
            c, regime="sft-dpo", epochs=2, handoff_epoch=1, max_train_examples=None, max_dev_examples=None,
            data_fraction=1.0, balance_labels=False, eval_init=False, keep_checkpoints="none", report_to="none",
            data_fingerprint=None, pairs=pairs)
        run = Run(slice_, Path(d), loader=loader, data=sl.data)
        t0 = time.perf_counter()
        run.build()
        load_s = time.perf_counter() - t0 + sl.read_s
        n_rows = len(run.task.train_ids)
        sft_s, start_s = _epoch_seconds(run, run.objective("sft"), n_rows)
        run.model.eval()
        eval_s = _timed(run.device, lambda: run.task.evaluate(run.model, run.device, run.precision))[0]
        # the DPO caches (pairs, reference log-probs) in a scratch directory: the timing must not come
        # from an earlier probe's cache (nor fill the user's)
        with tempfile.TemporaryDirectory(prefix="sftdpo-probe-") as scratch, cache_dir_at(scratch):
            t0 = time.perf_counter()
            dpo = run.objective("dpo")
            prep_s = time.perf_counter() - t0
        # per training example (its pairs: one per wrong label, or sampled), or per pair of a --pairs file
        dpo_rows = n_rows if n_pairs is None else len(dpo.ps)
        dpo_s = _epoch_seconds(run, dpo, dpo_rows)[0]
    weights = "" if note in ("pretrained", "random init (tiny)") else f", {note}"
    source = f"measured {time.strftime('%Y-%m-%d')} on {device_description(run.device)}, {run.precision}{weights}"
    return Rates(load_s=load_s + start_s, sft_s=sft_s * sl.train_pad, eval_s=eval_s * sl.dev_pad / len(run.task.dev),
                 dpo_prep_s=prep_s * sl.prep_pad / dpo_rows, dpo_s=dpo_s * sl.train_pad, n_train=sl.n_train,
                 n_dev=sl.n_dev, n_pairs=n_pairs, source=source)


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
        say(f"measuring {what} on this machine (a few batches of each stage, twice; cached) ...")
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
