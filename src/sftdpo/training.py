"""The training loop: stages (SFT, DPO) over one model, evaluation after every epoch,
epoch checkpoints that resume exactly, and the run directory's files.

Run directory:
  config.json     resolved config, its hash, package versions, device
  metrics.jsonl   one record per log step and per epoch (`stage`, `epoch`, `step`, losses, dev metrics)
  summary.json    final and best dev metrics, wall-clock, throughput, memory, parameter counts
                  (written last: its presence means the run is complete)
  predictions.csv / generations.txt, dev_outputs.jsonl
  checkpoints/last, checkpoints/best   trainable weights (full model for FFT, the adapter for LoRA)

Schedules span a stage's epoch budget. The SFT stage of SFT@k->DPO follows the schedule of the
whole TOTAL-epoch budget, so its first k epochs are exactly the first k epochs of the SFT-only
run: the hand-off is a point on the SFT trajectory, and studies can share that prefix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import DPO_FIELDS, LORA_FIELDS, RunConfig, SftdpoError, cache_dir
from .distributed import all_reduce_grads, barrier, broadcast_from_main, is_distributed, reduce_batch_stats
from .models import apply_lora, autocast, count_params, load_model, resolve_device, resolve_precision
from .tasks import Batch, Task, make_task

log = logging.getLogger("sftdpo")

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "weights.safetensors"


class Objective(Protocol):
    """What a stage optimises. SFT wraps the task; DPO (dpo.py) brings its own pairs and reference."""

    stage: str
    train_mode: bool  # False: dropout off (DPO needs policy == reference at the start)

    def batches(self, epoch: int) -> Iterator[Any]: ...
    def n_batches(self) -> int: ...
    def loss(self, model, batch) -> tuple[torch.Tensor, dict]: ...
    def n_tokens(self, batch) -> int: ...
    def describe(self) -> dict: ...


class SFTObjective:
    stage = "sft"
    train_mode = True

    def __init__(self, task: Task) -> None:
        self.task = task

    def batches(self, epoch: int) -> Iterator[Batch]:
        return self.task.sft_batches(epoch)

    def n_batches(self) -> int:
        return self.task.n_sft_batches()

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        return self.task.sft_loss(model, batch)

    def n_tokens(self, batch: Batch) -> int:
        return batch.n_tokens

    def describe(self) -> dict:
        return {"objective": "sft", "train_examples": len(self.task.train_ids)}


# -- small utilities ---------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("sftdpo", "torch", "transformers", "peft", "sacrebleu", "scikit-learn", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: the process's peak resident set (includes the runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb("VmHWM")


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB. Not getrusage's ru_maxrss where /proc has them: that
    survives execve, so a spawned run process would report its parent's peak if that was higher."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused on every device: on CPU the fused kernel is several times faster than the
    multi-tensor (foreach) one and gives the same updates up to float rounding."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def choose_attention(model, device: torch.device) -> None:
    """Attention kernels for these tasks' short, variable-length batches. CPU: eager attention instead
    of SDPA (SDPA's CPU flash kernel is the slower of the two here: its backward took ~15% of an SFT
    step on 160-token sonnets; eager makes the step ~12% faster). CUDA: SDPA without its cuDNN
    backend, which builds a plan for every new sequence length (~0.1 s each on an H100; length-bucketed
    batches and generation meet a new length at nearly every step). Call before LoRA."""
    if device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation("eager")
    elif device.type == "cuda" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def link_file(src: str | Path, dst: str | Path) -> None:
    """A hard link where the file system allows, else a copy. Checkpoint files are written once (a new
    directory, then renamed) and never changed in place, so linking them is safe: a shared SFT prefix
    or a best checkpoint that is also the last costs no copy (an FFT checkpoint is 0.5-1.6 GB)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=link_file)


def load_weights(model, path: Path) -> None:
    sd = load_file(str(Path(path) / WEIGHTS_FILE))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = expected - set(sd)
    if missing:
        raise SftdpoError(f"checkpoint {path} does not match the model ({len(missing)} weights missing, e.g. {sorted(missing)[0]})")
    model.load_state_dict(sd, strict=False)


class MetricsLog:
    """Append-only metrics.jsonl; on resume it is cut back to what the checkpoint had seen."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.lines = sum(1 for _ in path.open()) if path.exists() else 0

    def truncate(self, n: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = self.path.read_text().splitlines(keepends=True)[:n]
        self.path.write_text("".join(keep))
        self.lines = len(keep)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1


@dataclass
class RunState:
    """What survives an interruption: saved with each epoch checkpoint."""

    epoch: int = 0  # global epochs completed (0 = none)
    metric_lines: int = 0
    best_value: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # per-epoch records
    train_time_s: float = 0.0
    train_tokens: int = 0
    eval_time_s: float = 0.0


# -- the run -----------------------------------------------------------------------------------

class Run:
    """One experiment in one directory."""

    def __init__(self, cfg: RunConfig, out: Path, *, prefix_dir: Path | None = None, prefix_epochs: set[int] | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg.validate()
        self.out = Path(out)
        # studies share SFT prefixes: epoch-k checkpoints of identical SFT trajectories (see prefix_key)
        self.prefix_dir = Path(prefix_dir) if prefix_dir else None
        self.prefix_epochs = set(prefix_epochs or ())
        self.prefix_reused = 0
        # data parallel (distributed.py): rank and world size from init_from_env, one process per device
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        if world_size > 1 and not is_distributed():
            raise SftdpoError(f"world_size={world_size} needs an initialised process group: launch with torchrun")
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and world_size > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())  # set from LOCAL_RANK
        self.precision = resolve_precision(cfg.precision, self.device)
        self.effective_batch_size = cfg.batch_size * cfg.grad_accum * world_size

    # setup
    def build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tok = load_model(cfg.model, seed=cfg.seed)
        choose_attention(self.model, self.device)
        self.task = make_task(cfg, self.tok)
        self.task.rank, self.task.world_size = self.rank, self.world_size  # each rank trains on its share of every batch
        if cfg.param == "lora":
            self.model = apply_lora(self.model, cfg)
        self.model.to(self.device)
        self.trainable, self.total = count_params(self.model)

    def write_config(self) -> None:
        cfg_file = self.out / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            if old.get("hash") != self.cfg.hash():
                raise SftdpoError(
                    f"{self.out} holds another run (config hash {old.get('hash')} != {self.cfg.hash()}): use a new --out"
                )
            if old.get("world_size", 1) != self.world_size:
                raise SftdpoError(
                    f"{self.out} was started on {old.get('world_size', 1)} process(es), this launch has {self.world_size}: "
                    "resume with the same number of processes (the effective batch depends on it), or use a new --out"
                )
            return
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cfg_file, {
                "config": self.cfg.to_dict(), "hash": self.cfg.hash(), "versions": package_versions(),
                "device": device_description(self.device), "precision": self.precision,
                "world_size": self.world_size, "effective_batch_size": self.effective_batch_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
            })

    def stages(self) -> list[tuple[str, int, int]]:
        """(stage, first global epoch, last global epoch)."""
        cfg, out = self.cfg, []
        if cfg.sft_epochs:
            out.append(("sft", 1, cfg.sft_epochs))
        if cfg.dpo_epochs:
            out.append(("dpo", cfg.sft_epochs + 1, cfg.epochs))
        return out

    def objective(self, stage: str) -> Objective:
        if stage == "sft":
            return SFTObjective(self.task)
        from .dpo import make_dpo_objective  # noqa: PLC0415 - DPO only when a run has a DPO stage

        # data parallel: rank 0 builds the pairs and reference log-probs into <run>/dpo/, the others read them there
        obj = make_dpo_objective(self) if self.is_main else None
        barrier()
        return obj if self.is_main else make_dpo_objective(self)

    # evaluation
    def evaluate(self) -> tuple[dict, list[tuple[str, str, str]], float]:
        """Dev metrics and outputs. Data parallel: rank 0 evaluates (every rank holds the same weights)
        and sends the metrics to the others, whose outputs are empty."""
        t0 = time.perf_counter()
        metrics, outputs = self.task.evaluate(self.model, self.device, self.precision) if self.is_main else (None, [])
        metrics = broadcast_from_main(metrics)
        return {f"dev/{k}": v for k, v in metrics.items()}, outputs, time.perf_counter() - t0

    def init_metrics(self) -> tuple[dict, float]:
        """Dev metrics of the untrained model. Every run of a study with the same backbone, data and
        decoding starts from the same function (a fresh LoRA adapter is the identity), so the
        measurement is cached instead of repeated per run."""
        drop = ("param", "regime", "handoff_epoch", "epochs", "lr", "batch_size", "grad_accum", "weight_decay",
                "warmup_ratio", "schedule", "max_train_examples", "data_fraction", "max_grad_norm", *DPO_FIELDS, *LORA_FIELDS)
        key = self.cfg.hash(drop, source=self.task.source, dev=len(self.task.dev), device=self.device.type,
                            eval_batch_size=self.cfg.eval_batch_size)
        path = cache_dir() / "init_eval" / f"{key}.json"
        if broadcast_from_main(path.exists()):  # rank 0 decides: evaluate() is collective
            return json.loads(path.read_text()), 0.0
        metrics, _, dt = self.evaluate()
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, metrics)
        return metrics, dt

    # shared SFT prefixes
    def prefix_key(self, epoch: int) -> str:
        """Identity of the SFT trajectory up to `epoch`: everything but the regime and DPO settings
        (the SFT schedule spans the whole budget, so `epochs` stays in)."""
        dist = {"world_size": self.world_size} if self.world_size > 1 else {}  # the batches depend on it
        return self.cfg.hash(("regime", "handoff_epoch", *DPO_FIELDS), prefix_epoch=epoch, **dist)

    def seed_from_prefix(self) -> bool:
        """Start from the longest stored SFT prefix this run's SFT stage contains."""
        if not self.prefix_dir:
            return False
        for k in range(self.cfg.sft_epochs, 0, -1):
            src = self.prefix_dir / self.prefix_key(k)
            if broadcast_from_main((src / "last" / STATE_FILE).exists()):  # rank 0 decides, copies; then all load
                if self.is_main:
                    self.out.mkdir(parents=True, exist_ok=True)
                    for name in ("last", "best"):
                        shutil.rmtree(self.ckpt(name), ignore_errors=True)
                        if (src / name).exists():
                            link_tree(src / name, self.ckpt(name))
                    shutil.copy(src / "metrics.jsonl", self.out / "metrics.jsonl")
                barrier()
                self.prefix_reused = k
                log.info("reusing the SFT prefix of %d epoch(s) from %s", k, src)
                return True
        return False

    def export_prefix(self, epoch: int) -> None:
        if not (self.prefix_dir and self.is_main):
            return
        final = self.prefix_dir / self.prefix_key(epoch)
        if final.exists():
            return
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        link_tree(self.ckpt("last"), tmp / "last")
        if self.ckpt("best").exists():
            link_tree(self.ckpt("best"), tmp / "best")
        shutil.copy(self.out / "metrics.jsonl", tmp / "metrics.jsonl")
        os.replace(tmp, final)

    # checkpoints
    def ckpt(self, name: str) -> Path:
        return self.out / "checkpoints" / name

    def save_checkpoint(self, state: RunState, opt, sched) -> None:
        if not self.is_main:
            return
        last = self.ckpt("last")
        best = self.ckpt("best") / WEIGHTS_FILE
        if state.best_epoch == state.epoch and best.exists():  # saved a moment ago: the same weights, linked
            shutil.rmtree(last.with_name("last.new"), ignore_errors=True)
            last.with_name("last.new").mkdir(parents=True)
            link_file(best, last.with_name("last.new") / WEIGHTS_FILE)
        else:
            save_weights(self.model, last.with_name("last.new"))
        final = state.epoch >= self.cfg.epochs  # nothing left to resume: no optimizer state (1 GB for FFT)
        torch.save({
            "state": state.__dict__, "optimizer": opt.state_dict() if opt and not final else None,
            "scheduler": sched.state_dict() if sched else None, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }, last.with_name("last.new") / STATE_FILE)
        shutil.rmtree(last, ignore_errors=True)
        os.replace(last.with_name("last.new"), last)

    def load_checkpoint(self) -> tuple[RunState, dict] | None:
        last = self.ckpt("last")
        if not (last / STATE_FILE).exists():
            return None
        blob = torch.load(last / STATE_FILE, weights_only=False)
        load_weights(self.model, last)
        torch.set_rng_state(blob["rng"])
        if blob.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        return RunState(**blob["state"]), blob

    # the loop
    def train(self) -> dict:
        """Run (or resume, or just return) the experiment; returns the summary."""
        self.write_config()
        done = self.out / "summary.json"
        if done.exists():
            return json.loads(done.read_text())
        self.build()
        resumed = self.load_checkpoint()
        if resumed is None and self.seed_from_prefix():
            resumed = self.load_checkpoint()
        mlog = MetricsLog(self.out / "metrics.jsonl", enabled=self.is_main)
        state, blob = resumed if resumed else (RunState(), None)
        self.resumed_epoch = state.epoch  # DPO needs it: resumed inside its stage, the model is no longer its reference
        mlog.truncate(state.metric_lines) if resumed else mlog.truncate(0)
        if resumed:
            log.info("resuming %s after epoch %d", self.out, state.epoch)
        start = time.perf_counter() - state.train_time_s - state.eval_time_s

        if not resumed and self.cfg.eval_init:
            metrics, dt = self.init_metrics()
            state.eval_time_s += dt
            rec = {"kind": "epoch", "stage": "init", "epoch": 0, **metrics, "eval_s": dt}
            state.history.append(rec)
            mlog.write(rec)
            log.info("epoch 0 (before training): %s", _fmt(metrics))

        outputs: list | None = None
        for stage, first, last in self.stages():
            if state.epoch >= last:
                continue
            obj = self.objective(stage)
            self.stage_info = getattr(self, "stage_info", {})
            self.stage_info[stage] = obj.describe()
            lr = self.cfg.lr if stage == "sft" else self.cfg.dpo_lr
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = make_optimizer(params, lr, self.cfg.weight_decay)
            steps_per_epoch = math.ceil(obj.n_batches() / self.cfg.grad_accum)
            # SFT's schedule spans the whole budget (see the module docstring); DPO's its own epochs
            budget = self.cfg.epochs if stage == "sft" else last - first + 1
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps_per_epoch * budget, self.cfg.warmup_ratio, self.cfg.schedule))
            if blob is not None and blob.get("optimizer") and state.epoch >= first:
                opt.load_state_dict(blob["optimizer"])
                sched.load_state_dict(blob["scheduler"])
            for epoch in range(max(first, state.epoch + 1), last + 1):
                self.train_epoch(obj, stage, epoch, opt, sched, state, mlog)
                metrics, outputs, dt = self.evaluate()
                state.eval_time_s += dt
                rec = {"kind": "epoch", "stage": stage, "epoch": epoch, **self._epoch_train, **metrics, "eval_s": dt}
                state.history.append(rec)
                mlog.write(rec)
                log.info("epoch %d (%s): %s", epoch, stage, _fmt(metrics))
                value = metrics[f"dev/{self.task.primary_metric}"]
                if value > state.best_value:
                    state.best_value, state.best_epoch = value, epoch
                    if self.is_main:
                        save_weights(self.model, self.ckpt("best"))
                state.epoch = epoch
                state.metric_lines = mlog.lines
                self.save_checkpoint(state, opt, sched)
                if stage == "sft" and epoch in self.prefix_epochs:
                    self.export_prefix(epoch)
            blob = None
        if outputs is None:  # nothing trained in this process (all epochs were done before a crash at the end)
            metrics, outputs, _ = self.evaluate()
        summary = self.summarise(state, time.perf_counter() - start)
        if self.is_main:
            self.write_outputs(outputs)
            write_json_atomic(done, summary)
        return summary

    def train_epoch(self, obj: Objective, stage: str, epoch: int, opt, sched, state: RunState, mlog: MetricsLog) -> None:
        cfg, model = self.cfg, self.model
        model.train(obj.train_mode)
        n = obj.n_batches()
        accum = cfg.grad_accum
        t0 = time.perf_counter()
        tokens = 0
        loss_sum = 0.0
        logs_sum: dict[str, float] = {}
        window_t, window_tok = time.perf_counter(), 0
        params = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(obj.batches(epoch), total=n, desc=f"{stage} epoch {epoch}", disable=not (sys.stderr.isatty() and self.is_main),
                   leave=False)
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            # data parallel: `batch` is this rank's part of global batch i, `batch.share` its share of that
            # batch's loss (1 in one process); the ranks' gradients are summed before each optimizer step
            batch = batch.to(self.device)
            with autocast(self.device, self.precision):
                loss, logs = obj.loss(model, batch)
            (loss * batch.share / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == n:
                all_reduce_grads(params)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            # the global batch's loss, metrics and tokens (this batch's own in one process)
            loss_value, logs, ntok = reduce_batch_stats(loss, logs, obj.n_tokens(batch), batch.share)
            tokens += ntok
            window_tok += ntok
            loss_sum += loss_value
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if (i + 1) % cfg.log_every == 0 or i + 1 == n:
                now = time.perf_counter()
                mlog.write({"kind": "train", "stage": stage, "epoch": epoch, "step": i + 1, "loss": loss_value,
                            "lr": sched.get_last_lr()[0], "tokens_per_s": window_tok / max(now - window_t, 1e-9), **logs})
                window_t, window_tok = now, 0
        dt = time.perf_counter() - t0
        state.train_time_s += dt
        state.train_tokens += tokens
        self._epoch_train = {"train/loss": loss_sum / max(n, 1), "train_s": dt, "train_tokens": tokens,
                             **{f"train/{k}": v / max(n, 1) for k, v in logs_sum.items()}}

    def summarise(self, state: RunState, wall: float) -> dict:
        epochs = [h for h in state.history if h["stage"] != "init"]
        final = epochs[-1] if epochs else state.history[-1]
        best = next((h for h in state.history if h["epoch"] == state.best_epoch), final)
        dev_keys = [k for k in final if k.startswith("dev/")]
        init = next((h for h in state.history if h["stage"] == "init"), None)
        summary = {
            "run_hash": self.cfg.hash(), "task": self.cfg.task, "model": self.cfg.model, "param": self.cfg.param,
            "regime": self.cfg.regime, "epochs": self.cfg.epochs,
            **{k: final[k] for k in dev_keys},
            **{f"best/{k}": best[k] for k in dev_keys}, "best_epoch": state.best_epoch,
            **({f"init/{k}": init[k] for k in dev_keys} if init else {}),
            "wall_clock_s": wall,
            "wall_clock_per_epoch_s": (sum(h["train_s"] for h in epochs) / len(epochs)) if epochs else 0.0,
            "train_time_s": state.train_time_s, "eval_time_s": state.eval_time_s,
            "train_tokens_per_s": state.train_tokens / max(state.train_time_s, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "trainable_params": self.trainable, "total_params": self.total,
            "train_examples": len(self.task.train_ids), "dev_examples": len(self.task.dev),
            "device": device_description(self.device), "precision": self.precision,
            "world_size": self.world_size, "effective_batch_size": self.effective_batch_size,
            "data_source": self.task.source,
            "stages": getattr(self, "stage_info", {}),
            "prefix_reused_epochs": self.prefix_reused,
        }
        if self.cfg.task == "sonnet":
            summary["sonnet_source"] = self.task.source
        else:
            summary["dev_dropped_overlap"] = self.task.dev_dropped_overlap
        return summary

    def write_outputs(self, outputs: list[tuple[str, str, str]]) -> None:
        from .data import write_cs224n_generations, write_paraphrase_predictions

        with (self.out / "dev_outputs.jsonl").open("w") as f:
            for ex_id, pred, ref in outputs:
                f.write(json.dumps({"id": ex_id, "prediction": pred, "reference": ref}) + "\n")
        if self.cfg.task == "paraphrase":
            write_paraphrase_predictions(self.out / "predictions.csv", [(i, int(p), int(r)) for i, p, r in outputs])
        else:
            gens = getattr(self.task, "last_generations", [])
            for k in range(self.cfg.num_samples):
                name = "generations.txt" if k == 0 else f"generations_sample{k}.txt"
                write_cs224n_generations(self.out / name, [(num, samples[k]) for num, samples in gens])


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('dev/')}={v:.4f}" for k, v in metrics.items())


def train(cfg: RunConfig, out: str | Path, **kw: Any) -> dict:
    """Train (or resume) one run; returns its summary."""
    return Run(cfg, Path(out), **kw).train()


def evaluate_run(run_dir: str | Path, checkpoint: str = "best") -> dict:
    """Rebuild a finished (or interrupted) run's model from its checkpoint and evaluate it on dev."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        raise SftdpoError(f"{run_dir} is not a run directory (no config.json)")
    cfg = RunConfig.from_dict(json.loads(cfg_file.read_text())["config"])
    run = Run(cfg, run_dir)
    ck = run.ckpt(checkpoint)
    if not (ck / WEIGHTS_FILE).exists():
        raise SftdpoError(f"no {checkpoint} checkpoint in {run_dir}/checkpoints: train the run first")
    run.build()
    load_weights(run.model, ck)
    metrics, outputs, dt = run.evaluate()
    result = {"checkpoint": checkpoint, **metrics, "eval_s": dt}
    write_json_atomic(run_dir / f"eval_{checkpoint}.json", result)
    return {**result, "outputs": outputs}
