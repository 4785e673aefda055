"""The training loop: stages (SFT, DPO) over one model, evaluation after every epoch, epoch
checkpoints that resume exactly. `Run._train` reads top to bottom; what it writes is in rundir.py,
one optimizer step in step.py, checkpoints in checkpoint.py, evaluation in evaluation.py.

Schedules span a stage's epoch budget. The SFT stage of SFT@k->DPO follows the schedule of the
whole TOTAL-epoch budget, so its first k epochs are exactly the first k epochs of the SFT-only
run: the hand-off is a point on the SFT trajectory, and studies can share that prefix (prefix.py).
With --budget-steps a (single-stage) run takes exactly that many optimizer steps instead, cycling
over its rows with a fresh order per pass; each pass is an epoch for logging and evaluation, the last
one cut short, and the schedule spans the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, SftdpoError
from ..data import TaskData, data_fingerprint, load_task_data, resolve_data
from ..distributed import barrier, is_distributed, sum_over_ranks
from ..files import RUN_RESTARTS, DamagedFile, writable, write_json_atomic
from ..models import (count_params, device_description, load_model, peak_memory_mb, resolve_device,
                      resolve_precision)
from ..peft_methods import MethodHooks, apply_param, trainable_share
from ..objectives import Objective, StageContext
from ..objectives.preference import build_preference_objective
from ..objectives.sft import SFTObjective
from ..ops.logprobs import compile_decoder
from ..system import format_duration, git_commit, package_versions, progress
from ..tasks import Evaluation, make_task
from ..trackers import Trackers, check_trackers
from .checkpoint import (WEIGHTS_FILE, MetricsLog, RunState, load_checkpoint, load_weights, missing_checkpoint,
                         prune_checkpoints, save_checkpoint, save_weights)
from .evaluation import evaluate, untrained_metrics
from .prefix import SFTPrefixes
from .rundir import RunDir
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
        self.dir = RunDir(out)
        self.out = self.dir.path
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
        self.epochs = cfg.epochs  # with --budget-steps: the passes the budget needs (known once a stage is built)
        self.stage_info: dict[str, dict] = {}
        self.prefix_reused = 0
        self.prefix_reused_s = 0.0  # the training and evaluation time of those epochs, spent by another run

    # -- set-up --------------------------------------------------------------------------------
    def build(self) -> None:
        """The model (with its --param adapter), the data and the task, on the run's device."""
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
        self.model = apply_param(self.model, cfg, longest=max(map(len, self.task.train_ids)))
        self.hooks = MethodHooks(self.model, cfg)  # LoRA+'s learning rates, AdaLoRA's rank allocation, virtual tokens
        self.model.to(self.device)
        if cfg.compile:
            compile_decoder(self.model)
        self.trainable, self.total = count_params(self.model)

    def write_config(self) -> None:
        """config.json of this run (rank 0), unless the directory already holds its trained epochs."""
        self.dir.check(self.cfg, self.world_size)
        if self.is_main:
            self.dir.write_config({
                "config": self.cfg.to_dict(), "hash": self.cfg.hash(), "versions": package_versions(),
                "git_commit": git_commit(), "device": device_description(self.device), "precision": self.precision,
                "world_size": self.world_size, "effective_batch_size": self.effective_batch_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
            })

    def ckpt(self, name: str) -> Path:
        return self.dir.ckpt(name)

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
        obj = build_preference_objective(ctx) if self.is_main else None
        barrier()
        return obj if self.is_main else build_preference_objective(ctx)

    def stage_span(self, stage: str, obj: Objective, first: int, last: int) -> tuple[int, int]:
        """(the stage's last epoch, the optimizer steps its schedule spans). SFT's schedule spans the
        whole epoch budget (see the module docstring), DPO's its own epochs; a --budget-steps run's
        (one stage) spans the budget, in as many passes as it needs."""
        n = obj.n_steps()
        if self.cfg.budget_steps is not None:
            self.epochs = self.cfg.passes(n)
            return self.epochs, self.cfg.budget_steps
        return last, n * (self.cfg.epochs if stage == "sft" else last - first + 1)

    def stage_done(self, state: RunState, last: int) -> bool:
        return state.steps >= self.cfg.budget_steps if self.cfg.budget_steps is not None else state.epoch >= last

    def resume(self) -> tuple[RunState, dict | None, bool]:
        """(state, the checkpoint's optimizer/scheduler blob, resumed): from checkpoints/last, else from the
        longest shared SFT prefix of the study, else a fresh start."""
        resumed = load_checkpoint(self.dir.checkpoints, self.model)
        if resumed is None and self.prefixes:
            self.prefix_reused = self.prefixes.seed(self.out, self.cfg, self.world_size, self.is_main)
            if self.prefix_reused:
                resumed = load_checkpoint(self.dir.checkpoints, self.model)
                self.prefix_reused_s = resumed[0].train_time_s + resumed[0].eval_time_s
        if resumed is None:
            return RunState(), None, False
        log.info("resuming %s after epoch %d", self.out, resumed[0].epoch)
        return *resumed, True

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run (or resume, or just return) the experiment; returns the summary. A file of the run that
        cannot be read back (a checkpoint, the metrics, the DPO stage's inputs: DamagedFile with
        RUN_RESTARTS) makes it start again, said in one line: from the beginning, that gives the result
        an uninterrupted run gives."""
        if not self.is_main:
            return self._train()
        with self.dir.lock(f"sftdpo train {self.out}"):
            try:
                return self._train()
            except DamagedFile as e:
                if e.fix != RUN_RESTARTS:
                    raise
                if self.world_size > 1:
                    raise SftdpoError(f"{e.path} is damaged ({e.why}): delete {self.dir.checkpoints} and "
                                      f"{self.out / 'dpo'}, then launch again to train the run from its beginning") from None
                log.warning("%s", e)
                if self.prefix_reused and self.prefixes:  # its checkpoints are hard links of the shared prefix's
                    self.prefixes.drop(self.cfg, self.world_size)
                self.dir.clear()
                self.prefix_reused, self.prefix_reused_s, self.stage_info = 0, 0.0, {}
                return self._train()

    def _train(self) -> dict:
        cfg = self.cfg
        self.dir.check(cfg, self.world_size)
        check_trackers(cfg)
        done = self.dir.summary()
        if done is not None:
            if self.is_main:  # a process stopped between the summary and the pruning
                prune_checkpoints(self.dir.checkpoints, cfg.keep_checkpoints)
            return done
        self.build()  # a failure here (data, model, label words) leaves no config.json behind
        self.write_config()
        state, blob, resumed = self.resume()
        trackers = Trackers(cfg, self.out) if self.is_main else None
        mlog = MetricsLog(self.dir.metrics_file, enabled=self.is_main, on_write=trackers.log if trackers else None)
        mlog.truncate(state.metric_lines)
        if trackers and resumed:
            trackers.replay(mlog.path)
        start = time.perf_counter() - state.train_time_s - state.eval_time_s

        if not resumed and cfg.eval_init:
            metrics, dt = untrained_metrics(cfg, self.task, self.model, self.device, self.precision, self.is_main)
            state.eval_time_s += dt
            self.log_epoch(state, mlog, {"stage": "init", "epoch": 0, "global_step": 0, **metrics, "eval_s": dt})
            log.info("epoch 0 (before training): %s", _fmt(metrics))

        evaluation: Evaluation | None = None  # rank 0's; the other ranks evaluate nothing
        evaluated = False
        for stage, first, last in self.stages():
            if self.stage_done(state, last):
                continue
            # the epochs done when the stage starts: resumed inside the stage, the model is no longer its start
            obj = self.objective(stage, resumed_epoch=state.epoch)
            self.stage_info[stage] = obj.describe()
            last, total_steps = self.stage_span(stage, obj, first, last)
            self.hooks.start_stage(total_steps)
            opt = make_optimizer(self.model, cfg.lr if stage == "sft" else cfg.dpo_lr, cfg.weight_decay,
                                 self.hooks.lr_factor)
            sched = make_scheduler(opt, total_steps, cfg.warmup_ratio, cfg.schedule)
            if blob is not None and blob.get("optimizer") and state.epoch >= first:  # resumed inside this stage
                opt.load_state_dict(blob["optimizer"])
                sched.load_state_dict(blob["scheduler"])
            for epoch in range(max(first, state.epoch + 1), last + 1):
                steps_left = cfg.budget_steps - state.steps if cfg.budget_steps is not None else None
                trained = self.train_epoch(obj, stage, epoch, opt, sched, mlog, state.steps, steps_left)
                state.steps += trained.steps
                state.train_time_s += trained.seconds
                state.train_tokens += trained.tokens
                metrics, evaluation, dt = self.evaluate()
                evaluated = True
                state.eval_time_s += dt
                self.log_epoch(state, mlog, {"stage": stage, "epoch": epoch, "global_step": state.steps,
                                             **trained.record(), **metrics, "eval_s": dt})
                log.info("epoch %d/%d (%s): %s [%s elapsed, ETA %s]", epoch, self.epochs, stage, _fmt(metrics),
                         format_duration(time.perf_counter() - start),
                         format_duration((state.train_time_s + state.eval_time_s) / epoch * (self.epochs - epoch)))
                if state.update_best(epoch, metrics[f"dev/{self.task.primary_metric}"]) and self.is_main:
                    save_weights(self.model, self.ckpt("best"))
                self.checkpoint(state, stage, epoch, opt, sched)
            blob = None

        if not evaluated:  # nothing trained in this process (all epochs were done before a crash at the end)
            _, evaluation, _ = self.evaluate()
        summary = self.summarise(state, time.perf_counter() - start)
        if self.is_main:
            self.dir.finish(summary, self.task, evaluation, cfg.keep_checkpoints)
            trackers.finish(summary)
        return summary

    def train_epoch(self, obj: Objective, stage: str, epoch: int, opt, sched, mlog: MetricsLog,
                    step0: int = 0, steps_left: int | None = None) -> EpochTraining:
        """One epoch of optimizer steps (at most `steps_left`: a --budget-steps run's last pass).
        Losses and metrics stay on the device and are read back (summed over ranks) only every
        --log-every steps and at the epoch's end, so the host never waits for the device in between."""
        cfg, model = self.cfg, self.model
        model.train(obj.train_mode)
        n = obj.n_steps() if steps_left is None else min(obj.n_steps(), steps_left)
        params = [p for p in model.parameters() if p.requires_grad]
        t0 = window_t = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}  # per metric, the share of the epoch's micro-batches that reported it
        tokens = window_tokens = 0
        bar = progress(n, f"{stage} epoch {epoch}", self.is_main)
        for i, window in zip(range(1, n + 1), obj.steps(epoch)):
            st = train_step(model, obj, window, opt, sched, params, device=self.device, precision=self.precision,
                            max_grad_norm=cfg.max_grad_norm, hooks=self.hooks)
            step = {"loss": st.loss, "grad_norm": self.own(st.grad_norm), **st.logs}
            for k, v in step.items():
                sums[k] = sums[k] + v if k in sums else v
            for k, w in st.log_shares.items():
                shares[k] = shares.get(k, 0.0) + w
            tokens += st.tokens
            window_tokens += st.tokens
            bar.update(1)
            if i % cfg.log_every == 0 or i == n:
                logs, window_total = _read(step, window_tokens, st.log_shares)
                now = time.perf_counter()
                mlog.write({"kind": "train", "stage": stage, "epoch": epoch, "step": i, "global_step": step0 + i,
                            "lr": st.lr, "tokens_per_s": window_total / max(now - window_t, 1e-9),
                            **logs})
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                window_t, window_tokens = now, 0
        bar.close()
        logs, total = _read(sums, tokens, shares)  # metrics: means over the micro-batches that reported them
        loss, grad_norm = logs.pop("loss", 0.0), logs.pop("grad_norm", 0.0)
        return EpochTraining(loss / max(n, 1), time.perf_counter() - t0, total,
                             {"grad_norm": grad_norm / max(n, 1), **logs}, n)

    def own(self, value: torch.Tensor) -> torch.Tensor:
        """A value every rank holds (the global gradient norm) as rank 0's share of a sum over ranks."""
        return value if self.is_main else torch.zeros_like(value)

    def log_epoch(self, state: RunState, mlog: MetricsLog, record: dict) -> None:
        rec = {"kind": "epoch", **record}
        state.history.append(rec)
        mlog.write(rec)
        state.metric_lines = mlog.lines

    def checkpoint(self, state: RunState, stage: str, epoch: int, opt, sched) -> None:
        """After an epoch: checkpoints/last (with the optimizer state unless nothing is left to train:
        1 GB for FFT), the shared SFT prefix where a study asks for it, then the callback."""
        state.epoch = epoch
        if self.is_main:
            save_checkpoint(self.dir.checkpoints, self.model, state, opt, sched, final=epoch >= self.epochs)
            if stage == "sft" and self.prefixes:
                self.prefixes.export(self.out, self.cfg, epoch, self.world_size)
        if self.on_checkpoint:
            self.on_checkpoint(epoch)

    def evaluate(self) -> tuple[dict, Evaluation | None, float]:
        return evaluate(self.task, self.model, self.device, self.precision, self.is_main)

    def adapter_mb(self) -> float:
        """The trained weights on disk (MB): the last checkpoint's weights file (the adapter, or the whole
        model for FFT, BitFit, LN), or their size in fp32 before one is written."""
        f = self.ckpt("last") / WEIGHTS_FILE
        if f.exists():
            return f.stat().st_size / 2**20
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad) / 2**20

    def summarise(self, state: RunState, wall: float) -> dict:
        epochs = [h for h in state.history if h["stage"] != "init"]
        final = epochs[-1] if epochs else state.history[-1]
        best = next((h for h in state.history if h["epoch"] == state.best_epoch), final)
        dev_keys = [k for k in final if k.startswith("dev/")]
        init = next((h for h in state.history if h["stage"] == "init"), None)
        summary = {
            "run_hash": self.cfg.hash(), "task": self.cfg.task, "model": self.cfg.model, "param": self.cfg.param,
            "regime": self.cfg.regime, "epochs": self.epochs, "optimizer_steps": state.steps,
            **{k: final[k] for k in dev_keys},
            **{f"best/{k}": best[k] for k in dev_keys}, "best_epoch": state.best_epoch,
            **({f"init/{k}": init[k] for k in dev_keys} if init else {}),
            "wall_clock_s": wall,
            "wall_clock_per_epoch_s": (sum(h["train_s"] for h in epochs) / len(epochs)) if epochs else 0.0,
            "train_time_s": state.train_time_s, "eval_time_s": state.eval_time_s,
            "train_tokens_per_s": state.train_tokens / max(state.train_time_s, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "trainable_params": self.trainable, "total_params": self.total,
            "trainable_pct": trainable_share(self.trainable, self.total), "adapter_mb": self.adapter_mb(),
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


def _read(values: dict[str, torch.Tensor], tokens: int,
          shares: dict[str, float] | None = None) -> tuple[dict[str, float], int]:
    """Logged values and the token count summed over ranks, read back to the host (one transfer); a
    value named in `shares` divided by its summed share: its mean over the micro-batches that reported
    it (a metric absent from some is not averaged with zeros)."""
    keys, weighted = sorted(values), sorted(shares or {})
    device = values[keys[0]].device if keys else torch.device("cpu")
    host = torch.tensor([shares[k] for k in weighted] + [float(tokens)], dtype=torch.float64)  # host numbers: one copy
    vec = torch.cat([torch.stack([values[k].to(device=device, dtype=torch.float64) for k in keys]) if keys
                     else torch.zeros(0, dtype=torch.float64, device=device), host.to(device)])
    vals = sum_over_ranks(vec).tolist()
    out = dict(zip(keys, vals[:len(keys)]))
    for k, w in zip(weighted, vals[len(keys):-1]):
        out[k] = out[k] / w if w else math.nan
    return out, int(round(vals[-1]))


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('dev/')}={v:.4f}" for k, v in metrics.items())


def train(cfg: RunConfig, out: str | Path, **kw: Any) -> dict:
    """Train (or resume) one run; returns its summary."""
    return Run(cfg, Path(out), **kw).train()


def load_run(run_dir: str | Path, checkpoint: str = "best") -> Run:
    """A finished (or interrupted) run's model rebuilt from its config and a checkpoint (best | last)."""
    rd = RunDir(Path(run_dir))
    if not rd.config_file.exists():
        raise SftdpoError(f"{run_dir} is not a run directory (no config.json)")
    if checkpoint not in ("best", "last"):
        raise SftdpoError(f"--checkpoint must be best or last (got {checkpoint!r})")
    cfg = RunConfig.from_dict(rd.config("restore it (a resumed `train` rewrites it), or train the run again")["config"])
    run = Run(cfg, rd.path)
    ck = run.ckpt(checkpoint)
    if not (ck / WEIGHTS_FILE).exists():
        raise missing_checkpoint(rd.path, checkpoint, cfg.keep_checkpoints)
    run.build()
    load_weights(run.model, ck)
    return run


def evaluate_run(run_dir: str | Path, checkpoint: str = "best") -> dict:
    """Rebuild a finished (or interrupted) run's model from its checkpoint and evaluate it on dev."""
    run = load_run(run_dir, checkpoint)
    metrics, ev, dt = run.evaluate()
    result = {"checkpoint": checkpoint, **metrics, "eval_s": dt}
    if writable(run_dir):
        write_json_atomic(Path(run_dir) / f"eval_{checkpoint}.json", result)
    else:  # a read-only run (a shared results folder) is evaluated, not changed
        log.info("%s is not writable: eval_%s.json not written", run_dir, checkpoint)
    return {**result, "outputs": ev.outputs}
