"""Experiment trackers (`--report-to none|tensorboard|mlflow|wandb`, Hugging Face's `report_to` names).

Each run logs its resolved config as hyper-parameters, every record it writes to `metrics.jsonl`
under the names it has there (training records: `loss`, `lr`, `tokens_per_s`, TRL's `rewards/chosen`
...; epoch records: `train/loss`, `dev/accuracy`, ...) at its global optimizer step, and its summary
at the end, under the run's name and its study's:

  tensorboard  event files in <run>/tensorboard/, the config as hparams: `tensorboard --logdir STUDY`
               shows a study's runs side by side
  mlflow       MLFLOW_TRACKING_URI when set, else sqlite in the study (or run) directory; one
               experiment per study, one MLflow run per sftdpo run, a resumed run continues its own
  wandb        WANDB_MODE / WANDB_PROJECT respected; without an API key or network it logs offline
               (`wandb sync` later); a study's runs share a group

Trackers are optional extras (`pip install 'sftdpo[tensorboard]'`, `[mlflow]`, `[wandb]`). A tracker
that fails mid-run is switched off with one warning: the run itself never depends on it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from .config import RunConfig, SftdpoError

log = logging.getLogger("sftdpo")

_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
IDS_FILE = "trackers.json"  # <run>/trackers.json: the MLflow and W&B run ids, so a resumed run continues its own


def check_trackers(cfg: RunConfig) -> None:
    """One line for a tracker whose package is missing (before anything is trained)."""
    for t in cfg.trackers:
        if importlib.util.find_spec(_PACKAGES[t]) is None:
            raise SftdpoError(f"--report-to {t} needs the {_PACKAGES[t]} package: pip install 'sftdpo[{t}]' "
                              "(or drop it from --report-to)")


def run_identity(run_dir: Path) -> tuple[str, str | None, Path]:
    """(run name, study name or None, where local tracker stores go): a run of a study lives in
    <study>/runs/<name>/."""
    run_dir = Path(run_dir).resolve()
    study = run_dir.parent.parent if run_dir.parent.name == "runs" else None
    if study is not None and (study / "spec.yaml").exists():
        return run_dir.name, study.name, study
    return run_dir.name, None, run_dir


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as tracker hyper-parameters: scalars only (None and tuples as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.to_dict().items()}


def _scalars(record: dict) -> dict[str, float]:
    skip = {"kind", "stage", "epoch", "step", "global_step"}
    return {k: float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, cfg: RunConfig, run_dir: Path, name: str, study: str | None, ids: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("run", f"{name} (study {study})" if study else name, 0)

    def log(self, record: dict, step: int) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, step)

    def finish(self, summary: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: v for k, v in summary.items() if k.startswith(("dev/", "best/")) and isinstance(v, (int, float))}
        for part in hparams(flat_config(self.cfg), {f"hparams/{k}": v for k, v in metrics.items()}):
            self.writer.file_writer.add_summary(part)
        for k, v in metrics.items():  # the values the hparams table shows
            self.writer.add_scalar(f"hparams/{k}", v, 0)
        self.writer.close()


class _MLflow:
    """Through MlflowClient (no fluent API: no process-wide active run to leak between runs)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, name: str, study: str | None, ids: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        _, _, home = run_identity(run_dir)
        self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(home / 'mlflow.db').resolve()}")
        experiment = self.client.get_experiment_by_name(study or "sftdpo")
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(study or "sftdpo")
        if ids.get("mlflow"):  # resumed: the same MLflow run continues
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=name, tags={
                "sftdpo.study": study or "", "sftdpo.run": name, "sftdpo.hash": cfg.hash()})
            self.run_id = ids["mlflow"] = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flat_config(cfg).items()])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log(self, record: dict, step: int) -> None:
        self._metrics(_scalars(record), step)

    def finish(self, summary: dict) -> None:
        self._metrics({f"summary/{k}": float(v) for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}, 0)
        self.client.set_terminated(self.run_id, "FINISHED")


class _WandB:
    def __init__(self, cfg: RunConfig, run_dir: Path, name: str, study: str | None, ids: dict) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE")
        if not mode:
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
            mode = "online" if has_key and _reachable("api.wandb.ai") else "offline"
            if mode == "offline":
                log.info("wandb: no API key or no network: logging offline to %s/wandb (upload later: wandb sync)", run_dir)
        self.wandb = wandb
        ids.setdefault("wandb", secrets.token_hex(4))  # a W&B run id: 8 characters [0-9a-f]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sftdpo"), group=study, name=name,
                              id=ids["wandb"], resume="allow", dir=str(run_dir), config=flat_config(cfg), mode=mode,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict, step: int) -> None:
        self.run.log(_scalars(record), step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


_TRACKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Trackers:
    """The run's trackers, fed by its metrics log; each is switched off at its first failure."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.active: dict[str, Any] = {}
        self.fresh = False
        if not cfg.trackers:
            return
        name, study, _ = run_identity(self.run_dir)
        ids_path = self.run_dir / IDS_FILE
        self.fresh = not ids_path.exists()  # no tracker has seen this run yet (see replay)
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        for t in cfg.trackers:
            self._guard(t, lambda t=t: self.active.__setitem__(t, _TRACKERS[t](cfg, self.run_dir, name, study, ids)))
        ids_path.write_text(json.dumps(ids))

    def replay(self, metrics_file: Path) -> None:
        """Records a run holds before its trackers first saw it (epochs reused from a study's shared SFT
        prefix, or a run resumed with --report-to newly given)."""
        if self.active and self.fresh and metrics_file.exists():
            for line in metrics_file.read_text().splitlines():
                self.log(json.loads(line))

    def _guard(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a tracker never takes the run down
            self.active.pop(name, None)
            log.warning("--report-to %s failed (%s: %s); the run goes on without it", name, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")

    def log(self, record: dict) -> None:
        step = int(record.get("global_step", 0))
        for name, t in list(self.active.items()):
            self._guard(name, lambda t=t: t.log(record, step))

    def finish(self, summary: dict) -> None:
        for name, t in list(self.active.items()):
            self._guard(name, lambda t=t: t.finish(summary))
        self.active.clear()
