"""--report-to: what each tracker logged, read back with that tool's own reader; and a tracker that
fails, or is not installed, never costs the run."""

import glob
import json
import logging
import struct
from pathlib import Path

import pytest

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.train.loop import train

from conftest import qqp_files


@pytest.fixture
def qqp(tmp_path):
    return qqp_files(tmp_path, 16, 8)


def cfg(qqp, **kw):
    # SFT for one epoch, then DPO: TRL's DPO names reach the trackers too
    base = dict(task="paraphrase", model="tiny-llama", device="cpu", precision="fp32", batch_size=8, lr=3e-3,
                dpo_lr=1e-3, regime="sft-dpo", handoff_epoch=1, epochs=2, eval_batch_size=8, log_every=1, **qqp)
    return RunConfig(**{**base, **kw})


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_tensorboard_events_hold_every_record_and_the_config_as_hparams(qqp, cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    summary = train(cfg(qqp, report_to="tensorboard"), out)
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    # metrics.jsonl's names: step records' loss and TRL's DPO names, epoch records' train/ and dev/ means
    assert {"loss", "lr", "train/loss", "dev/accuracy", "rewards/chosen", "rewards/margins", "logps/rejected",
            "train/rewards/chosen"} <= tags
    trained = records(out, "train")
    loss = [(e.step, e.value) for e in ea.Scalars("loss")]
    assert loss == [(r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in trained]
    assert [s for s, _ in loss] == list(range(1, len(trained) + 1))  # one global step axis across SFT and DPO
    epochs = records(out, "epoch")
    acc = [(e.step, e.value) for e in ea.Scalars("dev/accuracy")]
    assert acc == [(r["global_step"], pytest.approx(r["dev/accuracy"])) for r in epochs]
    dpo = [r for r in trained if r["stage"] == "dpo"]
    assert [e.value for e in ea.Scalars("rewards/chosen")] == pytest.approx([r["rewards/chosen"] for r in dpo], rel=1e-6)
    # hparams: the resolved config, and the final dev metrics beside it
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["regime"].string_value == "sft-dpo"
    assert ea.Scalars("hparams/dev/accuracy")[0].value == pytest.approx(summary["dev/accuracy"])


def test_mlflow_local_store_one_run_resumed_in_place(qqp, cache, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sftdpo.train.loop import Run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    c = cfg(qqp, report_to="mlflow")

    def crash(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted after its first epoch's checkpoint
        Run(c, out, on_checkpoint=crash).train()
    summary = train(c, out)  # resumed
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "sftdpo"]
    (run,) = client.search_runs([exp.experiment_id])  # the resumed run continued the same MLflow run
    assert run.data.tags["sftdpo.run"] == "run" and run.data.tags["sftdpo.hash"] == summary["run_hash"]
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003" and run.data.params["beta"] == "0.1"
    acc = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "dev/accuracy")]
    assert sorted(acc) == [(r["global_step"], pytest.approx(r["dev/accuracy"])) for r in records(out, "epoch")]
    margins = client.get_metric_history(run.info.run_id, "rewards/margins")
    assert len(margins) == len([r for r in records(out, "train") if r["stage"] == "dpo"])
    assert run.data.metrics["summary/dev/macro_f1"] == pytest.approx(summary["dev/macro_f1"])


def _wandb_records(path: str):
    """Records of a W&B offline run file (W&B's LevelDB-style log of its own protobuf Records): a
    7-byte file header, then chunks of [crc32, length, type] + data in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    pos, data, out = 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        data += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(data)
            out.append(rec)
            data = b""
    return out


def test_wandb_logs_offline_without_network_and_groups_by_study(qqp, cache, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key, so offline
    monkeypatch.setenv("WANDB_PROJECT", "sftdpo-test")
    study = tmp_path / "mystudy"
    (study / "runs").mkdir(parents=True)
    (study / "spec.yaml").write_text("name: mystudy\n")
    out = study / "runs" / "r1"
    train(cfg(qqp, report_to="wandb"), out)
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    recs = _wandb_records(path)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.project == "sftdpo-test" and run.run_group == "mystudy" and run.display_name == "r1"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == pytest.approx([r["loss"] for r in records(out, "train")], rel=1e-6)
    assert any("rewards/chosen" in h for h in history)
    updates = [*run.config.update, *(i for r in recs if r.WhichOneof("record_type") == "config" for i in r.config.update)]
    config = {i.key: json.loads(i.value_json) for i in updates}
    config = {k: v.get("value") if isinstance(v, dict) else v for k, v in config.items()}  # W&B's {"value": ...}
    assert config["lr"] == pytest.approx(3e-3) and config["regime"] == "sft-dpo", sorted(config)[:10]


def test_a_failing_tracker_never_loses_the_run(qqp, cache, tmp_path, monkeypatch, caplog):
    from sftdpo import trackers

    def broken(self, record, step):
        raise OSError("disk full")

    monkeypatch.setattr(trackers._TensorBoard, "log", broken)
    with caplog.at_level(logging.WARNING, logger="sftdpo"):
        summary = train(cfg(qqp, report_to="tensorboard"), tmp_path / "run")
    assert summary["dev/accuracy"] is not None and (tmp_path / "run" / "summary.json").exists()
    warnings = [r.message for r in caplog.records if "--report-to tensorboard failed" in r.message]
    assert len(warnings) == 1 and "disk full" in warnings[0]


def test_missing_tracker_package_is_one_line_and_trackers_never_change_the_hash(qqp, cache, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SftdpoError, match=r"--report-to wandb needs the wandb package: pip install 'sftdpo\[wandb\]'"):
        train(cfg(qqp, report_to="tensorboard,wandb"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert cfg(qqp).hash() == cfg(qqp, report_to="mlflow,wandb", keep_checkpoints="none").hash()
    with pytest.raises(SftdpoError, match="--report-to takes none, or one or more of"):
        cfg(qqp, report_to="tensorbord").validate()


def test_a_study_run_reusing_a_shared_prefix_logs_the_reused_epochs_too(qqp, cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sftdpo.study import run_study

    spec = {"name": "tb", "defaults": {**cfg(qqp).to_dict(), "report_to": "tensorboard"},
            "grid": {"regime": [{"regime": "sft", "handoff_epoch": None}, {"regime": "sft-dpo", "handoff_epoch": 1}]}}
    out = tmp_path / "study"
    run_study(spec, out, report=False)
    (staged,) = [d for d in (out / "runs").iterdir() if "sft1-dpo" in d.name]
    assert json.loads((staged / "summary.json").read_text())["prefix_reused_epochs"] == 1
    ea = EventAccumulator(str(staged / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("dev/accuracy")] == [r["global_step"] for r in records(staged, "epoch")]
    assert len(ea.Scalars("dev/accuracy")) == 3  # epoch 0, the reused SFT epoch 1, the DPO epoch 2
