"""The training loop: stages (SFT, DPO) over one model, evaluation after every epoch, epoch
checkpoints that resume exactly, and the run directory's files.

Run directory:
  config.json     resolved config, its hash, package versions, device, git commit
  metrics.jsonl   one record per log step and per epoch (`stage`, `epoch`, `step`, losses, dev metrics)
  summary.json    final and best dev metrics, wall-clock, throughput, memory, parameter counts
                  (written last: its presence means the run is complete)
  predictions.csv / generations.txt, dev_outputs.jsonl
  checkpoints/last, checkpoints/best   trainable weights (full model for FFT, the adapter for LoRA)
  .lock           held by the process training the run (one writer per run directory)

Schedules span a stage's epoch budget. The SFT stage of SFT@k->DPO follows the schedule of the
whole TOTAL-epoch budget, so its first k epochs are exactly the first k epochs of the SFT-only
run: the hand-off is a point on the SFT trajectory, and studies can share that prefix (prefix.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, SftdpoError, cache_dir
from ..data import TaskData, data_fingerprint, load_task_data, resolve_data
from ..distributed import barrier, broadcast_from_main, is_distributed, sum_over_ranks
from ..files import DirectoryBusy, DirLock, ensure_dir, stable_hash, write_json_atomic, write_text_atomic
from ..models import (apply_lora, count_params, device_description, load_model, peak_memory_mb, resolve_device,
                      resolve_precision)
from ..objectives import Objective, StageContext
from ..ops.logprobs import compile_decoder
from ..objectives.dpo import build_dpo_objective
from ..objectives.sft import SFTObjective
from ..system import format_duration, git_commit, package_versions, progress
from ..tasks import Evaluation, make_task
from ..trackers import Trackers, check_trackers
from .checkpoint import (STATE_FILE, WEIGHTS_FILE, MetricsLog, RunState, load_checkpoint, load_weights, missing_checkpoint,
                         prune_checkpoints, save_checkpoint, save_weights)
from .prefix import SFTPrefixes
from .step import make_optimizer, make_scheduler, train_step

log = logging.getLogger("sftdpo")


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


@dataclasses.dataclass
class EpochTraining:
    """What one epoch of training measured."""

    loss: float
    seconds: float
    tokens: int
    logs: dict[str, float]
    steps: int  # optimizer steps taken

    def record(self) -> dict[str, Any]:
        return {"train/loss": self.loss, "train_s": self.seconds, "train_tokens": self.tokens,
                **{f"train/{k}": v for k, v in self.logs.items()}}


class Run:
    """One experiment in one directory."""

    def __init__(self, cfg: RunConfig, out: Path, *, prefixes: SFTPrefixes | None = None, rank: int = 0,
                 world_size: int = 1, on_checkpoint: Callable[[int], None] | None = None,
                 loader: Callable[..., tuple[Any, Any]] | None = None, data: TaskData | None = None) -> None:
        cfg = cfg.validate()
        # examples given instead of read from cfg's sources: the study's speed probe times chosen rows
        self.data = data
        # the run's identity covers the data it reads (data.resolve_data)
        if not cfg.data_fingerprint:
            cfg = resolve_data(cfg) if data is None else dataclasses.replace(cfg, data_fingerprint=data_fingerprint(data))
        self.cfg = cfg
        self.out = Path(out)
        self.prefixes = prefixes  # a study's shared SFT prefixes (prefix.py)
        self.on_checkpoint = on_checkpoint  # called with the epoch after each checkpoint is on disk
        # (name, seed=) -> (model, tokenizer): load_model, looked up now (tests patch it); the study's
        # speed probe passes one that falls back to random weights
        self.loader = loader or load_model
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
        self.stage_info: dict[str, dict] = {}
        self.prefix_reused = 0
        self.prefix_reused_s = 0.0  # the training and evaluation time of those epochs, spent by another run

    # setup
    def build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tok = self.loader(cfg.model, seed=cfg.seed)
        choose_attention(self.model, self.device)
        data = self.data if self.data is not None else load_task_data(cfg)
        if data_fingerprint(data) != cfg.data_fingerprint:
            raise SftdpoError(f"the {cfg.task} data found now ({data.source}) is not the data this run was set up with "
                              f"(fingerprint {data_fingerprint(data)} != {cfg.data_fingerprint}): restore it, or start a "
                              "new run with a new --out")
        self.task = make_task(cfg, self.tok, data, rank=self.rank, world_size=self.world_size)
        if cfg.param == "lora":
            self.model = apply_lora(self.model, cfg)
        self.model.to(self.device)
        if cfg.compile:
            compile_decoder(self.model)
        self.trainable, self.total = count_params(self.model)

    def trained(self) -> bool:
        """Whether the run directory holds a trained epoch (or a finished run)."""
        return (self.out / "summary.json").exists() or (self.ckpt("last") / STATE_FILE).exists()

    def check_config(self) -> None:
        """Refuse a run directory that holds another trained run. A directory whose run failed before
        its first epoch (a bad path, a bad file) holds no result: it is taken over."""
        cfg_file = self.out / "config.json"
        if not cfg_file.exists():
            return
        old = json.loads(cfg_file.read_text())
        if old.get("hash") != self.cfg.hash() and self.trained():
            raise SftdpoError(
                f"{self.out} holds another run (config hash {old.get('hash')} != {self.cfg.hash()}): use a new --out")
        if old.get("world_size", 1) != self.world_size and self.trained():
            raise SftdpoError(
                f"{self.out} was started on {old.get('world_size', 1)} process(es), this launch has {self.world_size}: "
                "resume with the same number of processes (the effective batch depends on it), or use a new --out")

    def write_config(self) -> None:
        """config.json of this run, unless the directory already holds its trained epochs."""
        cfg_file = self.out / "config.json"
        self.check_config()
        if cfg_file.exists() and self.trained():
            return
        if self.is_main and cfg_file.exists():  # an attempt that never trained an epoch: start clean
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.out / "dpo", ignore_errors=True)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cfg_file, {
                "config": self.cfg.to_dict(), "hash": self.cfg.hash(), "versions": package_versions(),
                "git_commit": git_commit(), "device": device_description(self.device), "precision": self.precision,
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

    def objective(self, stage: str, resumed_epoch: int | None = None) -> Objective:
        """The stage's objective, built from the model as it is now (the DPO reference at the hand-off).
        Data parallel: rank 0 builds the DPO pairs and reference log-probs into <run>/dpo/, the others
        read them there."""
        if stage == "sft":
            return SFTObjective(self.task)
        ctx = StageContext(self.cfg, self.task, self.model, self.device, self.precision, self.out, resumed_epoch,
                           self.is_main)
        obj = build_dpo_objective(ctx) if self.is_main else None
        barrier()
        return obj if self.is_main else build_dpo_objective(ctx)

    # evaluation
    def evaluate(self) -> tuple[dict, Evaluation | None, float]:
        """Dev metrics (`dev/...`), the evaluation itself (rank 0) and the seconds it took. Data
        parallel: rank 0 evaluates (every rank holds the same weights) and sends the metrics."""
        t0 = time.perf_counter()
        ev = self.task.evaluate(self.model, self.device, self.precision) if self.is_main else None
        metrics = broadcast_from_main(ev.metrics if ev else None)
        dt = time.perf_counter() - t0
        if self.is_main:
            log.info("evaluated %d dev examples in %s", len(self.task.dev), format_duration(dt))
        return {f"dev/{k}": v for k, v in metrics.items()}, ev, dt

    def init_metrics(self) -> tuple[dict, float]:
        """Dev metrics of the untrained model. Every run of a study with the same backbone, data and
        decoding starts from the same function (a fresh LoRA adapter is the identity), so the
        measurement is cached instead of repeated per run."""
        key = stable_hash({"config": self.cfg.init_eval_key(), "source": self.task.source, "dev": len(self.task.dev),
                           "device": self.device.type, "eval_batch_size": self.cfg.eval_batch_size})
        path = cache_dir() / "init_eval" / f"{key}.json"
        if broadcast_from_main(path.exists()):  # rank 0 decides: evaluate() is collective
            return json.loads(path.read_text()), 0.0
        metrics, _, dt = self.evaluate()
        if self.is_main:
            write_json_atomic(path, metrics)
        return metrics, dt

    # checkpoints
    def ckpt(self, name: str) -> Path:
        return self.out / "checkpoints" / name

    def save_checkpoint(self, state: RunState, opt, sched) -> None:
        if self.is_main:
            # nothing left to resume: no optimizer state (1 GB for FFT)
            save_checkpoint(self.out / "checkpoints", self.model, state, opt, sched, final=state.epoch >= self.cfg.epochs)

    # the loop
    def train(self) -> dict:
        """Run (or resume, or just return) the experiment; returns the summary."""
        if not self.is_main:
            return self._train()
        ensure_dir(self.out)
        try:
            with DirLock(self.out, f"sftdpo train {self.out}"):
                return self._train()
        except DirectoryBusy as e:
            raise SftdpoError(f"{e.path} is being trained by {e.holder}: wait for it, or use another --out") from None

    def _train(self) -> dict:
        self.check_config()
        check_trackers(self.cfg)
        done = self.out / "summary.json"
        if done.exists():
            if self.is_main:  # a process stopped between the summary and the pruning
                prune_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)
            return json.loads(done.read_text())
        self.build()  # a failure here (data, model, label words) leaves no config.json behind
        self.write_config()
        resumed = load_checkpoint(self.out / "checkpoints", self.model)
        if resumed is None and self.prefixes:
            self.prefix_reused = self.prefixes.seed(self.out, self.cfg, self.world_size, self.is_main)
            if self.prefix_reused:
                resumed = load_checkpoint(self.out / "checkpoints", self.model)
                self.prefix_reused_s = resumed[0].train_time_s + resumed[0].eval_time_s
        trackers = Trackers(self.cfg, self.out) if self.is_main else None
        mlog = MetricsLog(self.out / "metrics.jsonl", enabled=self.is_main, on_write=trackers.log if trackers else None)
        state, blob = resumed if resumed else (RunState(), None)
        mlog.truncate(state.metric_lines if resumed else 0)
        if trackers and resumed:
            trackers.replay(mlog.path)
        if resumed:
            log.info("resuming %s after epoch %d", self.out, state.epoch)
        start = time.perf_counter() - state.train_time_s - state.eval_time_s

        if not resumed and self.cfg.eval_init:
            metrics, dt = self.init_metrics()
            state.eval_time_s += dt
            rec = {"kind": "epoch", "stage": "init", "epoch": 0, "global_step": 0, **metrics, "eval_s": dt}
            state.history.append(rec)
            mlog.write(rec)
            log.info("epoch 0 (before training): %s", _fmt(metrics))

        evaluation: Evaluation | None = None
        evaluated = False
        for stage, first, last in self.stages():
            if state.epoch >= last:
                continue
            # the epochs done when the stage starts: resumed inside the stage, the model is no longer its start
            obj = self.objective(stage, resumed_epoch=state.epoch)
            self.stage_info[stage] = obj.describe()
            lr = self.cfg.lr if stage == "sft" else self.cfg.dpo_lr
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = make_optimizer(params, lr, self.cfg.weight_decay)
            # SFT's schedule spans the whole budget (see the module docstring); DPO's its own epochs
            budget = self.cfg.epochs if stage == "sft" else last - first + 1
            sched = make_scheduler(opt, obj.n_steps() * budget, self.cfg.warmup_ratio, self.cfg.schedule)
            if blob is not None and blob.get("optimizer") and state.epoch >= first:
                opt.load_state_dict(blob["optimizer"])
                sched.load_state_dict(blob["scheduler"])
            for epoch in range(max(first, state.epoch + 1), last + 1):
                trained = self.train_epoch(obj, stage, epoch, opt, sched, mlog, state.steps)
                state.steps += trained.steps
                state.train_time_s += trained.seconds
                state.train_tokens += trained.tokens
                metrics, evaluation, dt = self.evaluate()
                evaluated = True
                state.eval_time_s += dt
                rec = {"kind": "epoch", "stage": stage, "epoch": epoch, "global_step": state.steps, **trained.record(),
                       **metrics, "eval_s": dt}
                state.history.append(rec)
                mlog.write(rec)
                elapsed = time.perf_counter() - start
                log.info("epoch %d/%d (%s): %s [%s elapsed, ETA %s]", epoch, self.cfg.epochs, stage, _fmt(metrics),
                         format_duration(elapsed), format_duration((state.train_time_s + state.eval_time_s) / epoch
                                                                    * (self.cfg.epochs - epoch)))
                if state.update_best(epoch, metrics[f"dev/{self.task.primary_metric}"]) and self.is_main:
                    save_weights(self.model, self.ckpt("best"))
                state.epoch = epoch
                state.metric_lines = mlog.lines
                self.save_checkpoint(state, opt, sched)
                if stage == "sft" and self.prefixes and self.is_main:
                    self.prefixes.export(self.out, self.cfg, epoch, self.world_size)
                if self.on_checkpoint:
                    self.on_checkpoint(epoch)
            blob = None
        if not evaluated:  # nothing trained in this process (all epochs were done before a crash at the end)
            _, evaluation, _ = self.evaluate()
        summary = self.summarise(state, time.perf_counter() - start)
        if self.is_main:
            self.write_outputs(evaluation)
            write_json_atomic(done, summary)
            prune_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)
            trackers.finish(summary)
        return summary

    def train_epoch(self, obj: Objective, stage: str, epoch: int, opt, sched, mlog: MetricsLog,
                    step0: int = 0) -> EpochTraining:
        """One epoch of optimizer steps. Losses and metrics stay on the device and are read back (summed
        over ranks) only every --log-every steps and at the epoch's end, so the host never waits for
        the device in between."""
        cfg, model = self.cfg, self.model
        model.train(obj.train_mode)
        n = obj.n_steps()
        params = [p for p in model.parameters() if p.requires_grad]
        t0 = window_t = time.perf_counter()
        loss_sum: torch.Tensor | None = None
        logs_sum: dict[str, torch.Tensor] = {}
        tokens = window_tokens = 0
        bar = progress(n, f"{stage} epoch {epoch}", self.is_main)
        for i, window in enumerate(obj.steps(epoch), 1):
            st = train_step(model, obj, window, opt, sched, params, device=self.device, precision=self.precision,
                            max_grad_norm=cfg.max_grad_norm)
            loss_sum = st.loss if loss_sum is None else loss_sum + st.loss
            for k, v in st.logs.items():
                logs_sum[k] = logs_sum[k] + v if k in logs_sum else v
            tokens += st.tokens
            window_tokens += st.tokens
            bar.update(1)
            if i % cfg.log_every == 0 or i == n:
                loss, logs, window_total = _read(st.loss, st.logs, window_tokens)
                now = time.perf_counter()
                mlog.write({"kind": "train", "stage": stage, "epoch": epoch, "step": i, "global_step": step0 + i, "loss": loss,
                            "lr": sched.get_last_lr()[0], "tokens_per_s": window_total / max(now - window_t, 1e-9),
                            **logs})
                bar.set_postfix(loss=f"{loss:.4f}")
                window_t, window_tokens = now, 0
        bar.close()
        loss, logs, total = _read(loss_sum, logs_sum, tokens)
        return EpochTraining(loss / max(n, 1), time.perf_counter() - t0, total, {k: v / max(n, 1) for k, v in logs.items()}, n)

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
            "stages": self.stage_info,
            "prefix_reused_epochs": self.prefix_reused, "prefix_reused_s": self.prefix_reused_s,
        }
        if self.cfg.task == "sonnet":
            summary["sonnet_source"] = self.task.source
        if hasattr(self.task, "dev_dropped_overlap"):
            summary["dev_dropped_overlap"] = self.task.dev_dropped_overlap
        summary["task_name"] = self.cfg.task_name or self.cfg.task
        return summary

    def write_outputs(self, ev: Evaluation) -> None:
        write_text_atomic(self.out / "dev_outputs.jsonl", "".join(
            json.dumps({"id": ex_id, "prediction": pred, "reference": ref}) + "\n" for ex_id, pred, ref in ev.outputs))
        self.task.write_outputs(self.out, ev)


def _read(loss: torch.Tensor | None, logs: dict[str, torch.Tensor], tokens: int) -> tuple[float, dict[str, float], int]:
    """Loss, metrics and token count summed over ranks, read back to the host (one transfer)."""
    keys = sorted(logs)
    values = [loss if loss is not None else torch.zeros(()), *(logs[k] for k in keys)]
    device = values[0].device
    vec = torch.stack([v.to(device=device, dtype=torch.float64) for v in values] + [torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    vals = sum_over_ranks(vec).tolist()
    return vals[0], dict(zip(keys, vals[1:-1])), int(round(vals[-1]))


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('dev/')}={v:.4f}" for k, v in metrics.items())


def train(cfg: RunConfig, out: str | Path, **kw: Any) -> dict:
    """Train (or resume) one run; returns its summary."""
    return Run(cfg, Path(out), **kw).train()


def load_run(run_dir: str | Path, checkpoint: str = "best") -> Run:
    """A finished (or interrupted) run's model rebuilt from its config and a checkpoint (best | last)."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        raise SftdpoError(f"{run_dir} is not a run directory (no config.json)")
    if checkpoint not in ("best", "last"):
        raise SftdpoError(f"--checkpoint must be best or last (got {checkpoint!r})")
    cfg = RunConfig.from_dict(json.loads(cfg_file.read_text())["config"])
    run = Run(cfg, run_dir)
    ck = run.ckpt(checkpoint)
    if not (ck / WEIGHTS_FILE).exists():
        raise missing_checkpoint(run_dir, checkpoint, cfg.keep_checkpoints)
    run.build()
    load_weights(run.model, ck)
    return run


def evaluate_run(run_dir: str | Path, checkpoint: str = "best") -> dict:
    """Rebuild a finished (or interrupted) run's model from its checkpoint and evaluate it on dev."""
    run = load_run(run_dir, checkpoint)
    metrics, ev, dt = run.evaluate()
    result = {"checkpoint": checkpoint, **metrics, "eval_s": dt}
    write_json_atomic(Path(run_dir) / f"eval_{checkpoint}.json", result)
    return {**result, "outputs": ev.outputs}
