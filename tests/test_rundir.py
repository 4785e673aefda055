"""A run directory's rules (train/rundir.py), the metrics log's cut-back on resume (train/checkpoint.py)
and the study's shared SFT prefixes (train/prefix.py), on directories laid out by hand: which run a
directory holds, what a new attempt may overwrite, what a finished run vouches for, and which stored
prefix a run starts from. The training tests reach these through whole runs (and the study tests in
worker processes, where mutmut cannot see them); here each rule is checked on its own, in milliseconds."""

import errno
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.files import DamagedFile, stable_hash
from sftdpo.train import checkpoint as ckpt
from sftdpo.train.checkpoint import (STATE_FILE, WEIGHTS_FILE, MetricsLog, RunState, load_checkpoint, prune_checkpoints,
                                     save_checkpoint, save_weights)
from sftdpo.train.prefix import SFTPrefixes
from sftdpo.train.rundir import RunDir

from conftest import write_jsonl


def lay_out(path: Path, *, config: dict | str | None = None, last: bool = False, summary: dict | None = None,
            metrics: list[dict] | None = None, outputs: list[dict] | None = None, dpo: bool = False) -> RunDir:
    """A run directory with the files named; `config` a record (or raw text: a damaged file)."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if last:
        (path / "checkpoints" / "last").mkdir(parents=True)
        (path / "checkpoints" / "last" / STATE_FILE).write_bytes(b"state")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        write_jsonl(path / "metrics.jsonl", metrics)
    if outputs is not None:
        write_jsonl(path / "dev_outputs.jsonl", outputs)
    if dpo:
        (path / "dpo").mkdir()
        (path / "dpo" / "pairs.jsonl").write_text("{}\n")
    return RunDir(path)


CFG = RunConfig()
EPOCHS = [{"kind": "epoch", "stage": "sft", "epoch": 1, "dev/accuracy": 0.5, "train_s": 2.0},
          {"kind": "step", "stage": "sft", "step": 3, "loss": 0.7},
          {"kind": "epoch", "stage": "sft", "epoch": 2, "dev/accuracy": 0.75, "train_s": 3.0}]
OUTPUTS = [{"id": "a", "prediction": "yes", "reference": "no"}, {"id": "b", "prediction": "no", "reference": "no"}]
SUMMARY = {"epochs": 2, "dev_examples": 2, "dev/accuracy": 0.5, "device": "cpu", "precision": "fp32"}


def finished(path: Path) -> RunDir:
    return lay_out(path, config={"config": {}, "hash": CFG.hash(), "versions": {"torch": "x"}, "git_commit": "c0ffee"},
                   last=True, summary=SUMMARY, metrics=EPOCHS, outputs=OUTPUTS)


def test_a_directory_is_trained_by_a_checkpoint_or_a_summary(tmp_path):
    """`trained` is what protects a run's results from another config's `train`: catches a directory
    that counts as trained only with both a summary and a checkpoint (a run killed after epoch 1 would
    be taken over by another config, its checkpoint trained on with another run's settings), and the
    checkpoint looked for under another name."""
    assert not lay_out(tmp_path / "empty").trained()
    assert lay_out(tmp_path / "killed", last=True).trained()
    assert lay_out(tmp_path / "pruned", summary=SUMMARY).trained()  # --keep-checkpoints none
    weights_only = lay_out(tmp_path / "no-state")
    (weights_only.ckpt("last")).mkdir(parents=True)
    (weights_only.ckpt("last") / WEIGHTS_FILE).write_bytes(b"w")
    assert not weights_only.trained()


def test_a_damaged_config_names_its_file_and_that_it_is_rewritten(tmp_path):
    """config.json that is not JSON, or JSON that is not a run's config (no "config" object): DamagedFile
    naming config.json and, unless the caller says otherwise, that it is rewritten. Catches a record
    without its config taken for a run's, and the file or the fix lost from the message."""
    for text in ("{not json", '{"hash": "abc"}', '{"config": [1]}', "[1, 2]"):
        rd = lay_out(tmp_path / str(len(text)), config=text)
        with pytest.raises(DamagedFile) as e:
            rd.config()
        assert (e.value.path, e.value.fix) == (rd.config_file, "rewritten from this run's config"), text
        with pytest.raises(DamagedFile, match="redo it"):
            rd.config("redo it")


def test_check_refuses_another_run_or_another_world_size_only_once_trained(tmp_path):
    """Catches: the world size of a config.json written before it was recorded (one process) read as
    anything but 1 (every resume of such a run refused, or a 2-process launch let resume a 1-process run:
    another effective batch), the recorded world size looked up under another key (a 2-process run resumed
    by 1 process), and either refusal made without a trained epoch."""
    same = {"config": {}, "hash": CFG.hash()}
    old = lay_out(tmp_path / "old", config=same, last=True)
    old.check(CFG, 1)
    with pytest.raises(SftdpoError, match="started on 1 process"):
        old.check(CFG, 2)
    two = lay_out(tmp_path / "two", config={**same, "world_size": 2}, last=True)
    two.check(CFG, 2)
    with pytest.raises(SftdpoError, match=r"started on 2 process\(es\), this launch has 1"):
        two.check(CFG, 1)
    lay_out(tmp_path / "two-untrained", config={**same, "world_size": 2}).check(CFG, 1)
    other = {"config": {}, "hash": "0" * 12}
    with pytest.raises(SftdpoError, match="holds another run"):
        lay_out(tmp_path / "other", config=other, last=True).check(CFG, 1)
    lay_out(tmp_path / "failed", config=other).check(CFG, 1)  # failed before its first epoch: taken over
    lay_out(tmp_path / "damaged", config="{", last=True).check(CFG, 1)  # no run can be told from it


def test_write_config_keeps_a_trained_run_and_starts_an_untrained_attempt_clean(tmp_path):
    """Catches: a trained run's intact config.json overwritten by the new attempt's (a config-hash check
    of the next launch then compares with itself), a damaged one left damaged, a trained run's metrics
    and DPO inputs deleted because its config was damaged, and an attempt that never trained an epoch
    keeping the metrics lines and DPO inputs of the attempt before it."""
    record = {"config": {"lr": 1}, "hash": CFG.hash()}
    kept = {"config": {"lr": 2}, "hash": CFG.hash()}
    trained = lay_out(tmp_path / "trained", config=kept, last=True, metrics=EPOCHS, dpo=True)
    trained.write_config(record)
    assert json.loads(trained.config_file.read_text()) == kept

    damaged = lay_out(tmp_path / "damaged", config="{", last=True, metrics=EPOCHS, dpo=True)
    damaged.write_config(record)
    assert json.loads(damaged.config_file.read_text()) == record
    assert damaged.metrics_file.exists() and (damaged.path / "dpo" / "pairs.jsonl").exists()

    retry = lay_out(tmp_path / "retry", config=kept, metrics=EPOCHS[:1], dpo=True)
    retry.write_config(record)
    assert json.loads(retry.config_file.read_text()) == record
    assert not retry.metrics_file.exists() and not (retry.path / "dpo").exists()

    fresh = RunDir(tmp_path / "new" / "run")
    fresh.write_config(record)
    assert json.loads(fresh.config_file.read_text()) == record


def test_summary_and_results_of_a_finished_run(tmp_path):
    """Catches `summary()` handing back another part of the results (the environment) in place of the
    summary, epochs read from step records or from the wrong fields, and outputs paired with the wrong
    ids; a finished run whose dev outputs are gone is not finished: its summary.json goes."""
    run = finished(tmp_path / "run")
    assert run.summary() == SUMMARY
    summary, env, epochs, outputs = run.results()
    assert env == {"versions": {"torch": "x"}, "device": "cpu", "precision": "fp32", "git_commit": "c0ffee"}
    assert epochs == [("sft", 1, {"dev/accuracy": 0.5, "train_s": 2.0}, 2.0),
                      ("sft", 2, {"dev/accuracy": 0.75, "train_s": 3.0}, 3.0)]
    assert outputs == [("a", "yes", "no"), ("b", "no", "no")]
    (run.path / "dev_outputs.jsonl").unlink()
    assert run.summary() is None and not run.summary_file.exists()


def test_two_ranks_reading_a_damaged_run_both_find_it_unfinished(tmp_path, monkeypatch):
    """In a data-parallel launch every rank reads the run's summary at its start (only rank 0 holds the
    lock): with a damaged run, the ranks all find it damaged and race to remove summary.json. Catches a
    rank that comes second dying with FileNotFoundError instead of finding the run unfinished."""
    run = finished(tmp_path / "run")

    def other_rank_first(self):
        self.summary_file.unlink()  # another rank removed it after this one saw it
        raise DamagedFile(self.path / "dev_outputs.jsonl", "missing", "redo")

    monkeypatch.setattr(RunDir, "results", other_rank_first)
    assert run.summary() is None


def test_clear_removes_what_the_run_trained_and_keeps_its_config(tmp_path):
    """Catches a DPO stage's pairs and reference log-probs surviving `clear` (the restarted run would
    read the old attempt's DPO inputs), and any of the run's result files surviving."""
    run = finished(tmp_path / "run")
    (run.path / "dpo").mkdir()
    run.clear()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json"]


def test_a_checkpoint_reads_back_as_it_was_written(tmp_path):
    """save_checkpoint then load_checkpoint into a model built afresh: the run state, the trainable weights, the
    optimizer and scheduler states and the RNG come back as they were. Catches a resume that finds no
    checkpoint (or cannot read it) and so trains again from the start (a restart gives the numbers a resume
    gives: comparing them cannot tell), weights or RNG not restored, the optimizer state kept in a final
    checkpoint or dropped from another, a state key renamed, and `last` not linked to `best` when they are
    one epoch."""
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    model(torch.ones(1, 3)).sum().backward()
    opt.step(), sched.step()
    ckpts = tmp_path / "checkpoints"
    assert load_checkpoint(ckpts, model) is None
    state = RunState(epoch=2, steps=6, metric_lines=9, best_value=0.75, best_epoch=2, history=[{"epoch": 1}],
                     train_time_s=1.5, train_tokens=40, eval_time_s=0.5)
    save_weights(model, ckpts / "best")
    rng = torch.get_rng_state()
    save_checkpoint(ckpts, model, state, opt, sched, final=False)
    assert (ckpts / "last" / WEIGHTS_FILE).samefile(ckpts / "best" / WEIGHTS_FILE)

    torch.manual_seed(2)
    fresh = torch.nn.Linear(3, 2)
    got, blob = load_checkpoint(ckpts, fresh)
    assert got == state and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert blob["scheduler"] == sched.state_dict()
    # the keys load_checkpoint reads: a renamed "cuda_rng" would go unnoticed on CPU and leave a resumed
    # GPU run on another random stream than the uninterrupted run
    assert set(blob) == {"state", "optimizer", "scheduler", "rng", "cuda_rng", "method"}
    again = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    again.load_state_dict(blob["optimizer"])
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    with torch.no_grad():
        model.weight.add_(1.0)  # epoch 3, not the best: its own weights, not a link to best's
    save_checkpoint(ckpts, model, RunState(epoch=3, best_epoch=2), opt, sched, final=True)
    assert not (ckpts / "last" / WEIGHTS_FILE).samefile(ckpts / "best" / WEIGHTS_FILE)
    got, blob = load_checkpoint(ckpts, fresh)
    assert got.epoch == 3 and blob["optimizer"] is None and torch.equal(fresh.weight, model.weight)


def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_that_the_run_restarts(tmp_path):
    """A resume from a cut-short training_state.pt or weights file: catches a DamagedFile that names another
    file (or none), loses the error it came from, or tells the user to pick another checkpoint (eval's
    advice) instead of what the training loop does with it, start the run again."""
    model = torch.nn.Linear(2, 1)
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, model, RunState(epoch=1), torch.optim.SGD(model.parameters(), lr=0.1), None, final=False)
    state, weights = ckpts / "last" / STATE_FILE, ckpts / "last" / WEIGHTS_FILE
    whole = state.read_bytes()
    state.write_bytes(whole[:60])
    with pytest.raises(DamagedFile) as e:
        load_checkpoint(ckpts, model)
    assert (e.value.path, e.value.fix) == (state, ckpt.RUN_RESTARTS)
    assert str(e.value).startswith(f"{state} is damaged (") and not e.value.why.startswith("NoneType")
    state.write_bytes(whole)
    weights.write_bytes(weights.read_bytes()[:30])
    with pytest.raises(DamagedFile) as e:
        load_checkpoint(ckpts, model)
    assert (e.value.path, e.value.fix) == (weights, ckpt.RUN_RESTARTS)


def test_a_checkpoint_keeps_and_restores_the_cuda_rng_where_there_is_one(tmp_path, monkeypatch):
    """The CUDA generators' state (faked here: no test machine has CUDA) is saved and set back, and none is
    saved without CUDA. Catches the state never saved (or saved under another key: a resumed GPU run would
    draw other dropout masks and batches than the uninterrupted run), a CPU checkpoint holding an
    empty CUDA state, and a GPU checkpoint's CUDA state set on a machine without CUDA."""
    model = torch.nn.Linear(2, 1)
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, model, RunState(epoch=1), None, None, final=True)
    assert load_checkpoint(ckpts, model)[1]["cuda_rng"] is None
    saved, restored = [torch.tensor([7, 8], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    save_checkpoint(ckpts, model, RunState(epoch=2), None, None, final=True)
    _, blob = load_checkpoint(ckpts, model)
    assert torch.equal(blob["cuda_rng"][0], saved[0])
    assert len(restored) == 1 and torch.equal(restored[0][0], saved[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU run resumed on a CPU machine
    load_checkpoint(ckpts, model)
    assert len(restored) == 1


class WithAllocator(torch.nn.Linear):
    """What method_state reads of an AdaLoRA PeftModel: base_model.rankallocator's importance averages
    and the adapter config's rank pattern."""

    def __init__(self, value: float):
        super().__init__(2, 1)
        self.base_model = SimpleNamespace(rankallocator=SimpleNamespace(
            ipt={"a": torch.full((2,), value)}, exp_avg_ipt={"a": torch.full((2,), value + 1)},
            exp_avg_unc={"a": torch.full((2,), value + 2)}))
        self.peft_config = {"default": SimpleNamespace(rank_pattern={"a": [value > 0, True]})}


def test_a_checkpoint_carries_adaloras_importance_scores_and_rank_pattern(tmp_path):
    """An AdaLoRA run resumed from a checkpoint goes on with the importance averages and rank pattern it
    had (AdaLoRA prunes ranks by them). Catches the method state not saved, saved under another key or
    from no model, and not set back on load."""
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, WithAllocator(1.0), RunState(epoch=1), None, None, final=False)
    fresh = WithAllocator(-5.0)
    load_checkpoint(ckpts, fresh)
    ra = fresh.base_model.rankallocator
    assert [float(d["a"][0]) for d in (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc)] == [1.0, 2.0, 3.0]
    assert fresh.peft_config["default"].rank_pattern == {"a": [True, True]}


def test_best_epoch_is_the_first_of_the_highest():
    """Which epoch is best (its weights go to checkpoints/best, its metrics to the summary's best/*).
    Catches a tie handed to the later epoch (the rule: a tie keeps the earlier epoch, the fewer-epochs
    model), and a worse epoch reported as a new best (checkpoints/best overwritten with it)."""
    state = RunState()
    assert [state.update_best(e, v) for e, v in [(1, 0.5), (2, 0.5), (3, 0.25), (4, 0.75), (5, 0.75)]] == [
        True, False, False, True, False]
    assert (state.best_epoch, state.best_value) == (4, 0.75)


def test_pruning_keeps_what_was_asked_and_can_run_again(tmp_path):
    """--keep-checkpoints on a finished run, and again when a process stopped between the summary and
    the pruning (the next `train` prunes once more). Catches the wrong checkpoint removed and a second
    pruning (or a run that never wrote `best`) failing on what is already gone."""
    for keep, left in [("all", ["best", "last"]), ("best", ["best"]), ("last", ["last"]), ("none", None)]:
        ckpts = trained_to(tmp_path / keep, 2) / "checkpoints"
        for _ in range(2):
            prune_checkpoints(ckpts, keep)
            assert (sorted(p.name for p in ckpts.iterdir()) if ckpts.exists() else None) == left
    only_last = trained_to(tmp_path / "only-last", 1, best=False) / "checkpoints"
    prune_checkpoints(only_last, "last")
    assert [p.name for p in only_last.iterdir()] == ["last"]


def test_metrics_log_cut_back_to_the_checkpoints_lines(tmp_path):
    """On resume the metrics log is cut to the lines the checkpoint counted. Catches a whole line that
    is not a JSON record counted as whole (the resumed run would keep a garbled line in its metrics),
    and a cut that keeps the lines after `n`."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3}\n{"d"')
    log = MetricsLog(path)
    assert log.lines == 4
    log.truncate(2)
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n' and log.lines == 2
    for bad in (b'{"a": 1}\nnot json\n', b'{"a": 1}\n[1, 2]\n', b'{"a": 1}\n{"b": 2}'):
        path.write_bytes(bad)
        with pytest.raises(DamagedFile, match="1 whole lines where the checkpoint counted 2.*: the run starts again"):
            MetricsLog(path).truncate(2)


def test_metrics_log_counts_the_lines_it_writes_and_writes_tensors_as_numbers(tmp_path):
    """The line count is what a checkpoint stores and a resume cuts back to: catches a count that is
    reset or decremented by a write instead of incremented (the resume would cut the log to its first
    lines, or find it short and restart the run), and a record holding a tensor or numpy scalar (a
    gradient norm, a loss) that cannot be written (json.dumps without `default=float`)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n')
    log = MetricsLog(path)
    log.write({"loss": torch.tensor(0.5), "grad_norm": np.float32(0.25), "step": 1})
    log.write({"loss": 0.125})
    assert log.lines == 3
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == [
        {"a": 1}, {"loss": 0.5, "grad_norm": 0.25, "step": 1}, {"loss": 0.125}]
    off = MetricsLog(tmp_path / "off.jsonl", enabled=False)
    off.write({"loss": 1.0})
    assert off.lines == 0 and not off.path.exists()


# -- shared SFT prefixes ------------------------------------------------------------------------

SFT = RunConfig(regime="sft", epochs=3)
STAGED = RunConfig(regime="sft-dpo", epochs=3, handoff_epoch=2)


def trained_to(path: Path, epoch: int, best: bool = True) -> Path:
    """A run directory after SFT epoch `epoch`: its checkpoints and metrics say which epoch they are."""
    for name in ("last", "best") if best else ("last",):
        d = path / "checkpoints" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / STATE_FILE).write_text(f"{name} state after epoch {epoch}")
        (d / WEIGHTS_FILE).write_text(f"{name} weights after epoch {epoch}")
    write_jsonl(path / "metrics.jsonl", [{"epoch": e} for e in range(1, epoch + 1)])
    return path


def files_of(path: Path, read=Path.read_text) -> dict:
    """{relative path: contents} of every file under `path`."""
    return {p.relative_to(path).as_posix(): read(p) for p in sorted(path.rglob("*")) if p.is_file()}


def test_prefix_keys_are_stable_and_name_the_trajectory_epoch_and_world_size():
    """A study's stored prefixes are found again by a later version (the key of a one-process run is the
    one earlier versions stored under). Catches the key's fields renamed or dropped, the world size put in
    the key of a one-process run (or left out of a data-parallel one's), and the SFT-only run and a staged
    run of the same trajectory keyed apart."""
    store = SFTPrefixes(Path("/nowhere"), {1, 2})
    assert store.key(SFT, 1, 1) == stable_hash({"trajectory": SFT.trajectory_key(), "prefix_epoch": 1}) == "68b900040a78"
    assert store.key(SFT, 2, 2) == "81c6d363011d"
    assert store.key(STAGED, 1, 1) == store.key(SFT, 1, 1) != store.key(SFT, 2, 1) != store.key(SFT, 2, 2)


def test_export_stores_a_shared_epoch_once(tmp_path):
    """Catches: an epoch that is not shared stored anyway, the stored copy missing a checkpoint or the
    metrics, `best` stored from `last`, and a second export (a later run on the same trajectory)
    overwriting the first run's prefix."""
    store = SFTPrefixes(tmp_path / "prefixes", {1, 2})
    run = trained_to(tmp_path / "sft", 1)
    store.export(run, SFT, 1, 1)
    stored = store.root / store.key(SFT, 1, 1)
    assert files_of(stored) == {
        "best/training_state.pt": "best state after epoch 1", "best/weights.safetensors": "best weights after epoch 1",
        "last/training_state.pt": "last state after epoch 1", "last/weights.safetensors": "last weights after epoch 1",
        "metrics.jsonl": '{"epoch": 1}\n'}
    trained_to(run, 3)
    store.export(run, SFT, 3, 1)  # epoch 3 is no hand-off of the study
    store.export(run, SFT, 1, 1)
    assert sorted(p.name for p in store.root.iterdir()) == [stored.name]
    assert files_of(stored)["metrics.jsonl"] == '{"epoch": 1}\n'
    no_best = trained_to(tmp_path / "no-best", 2, best=False)
    store.export(no_best, SFT, 2, 1)
    assert sorted(files_of(store.root / store.key(SFT, 2, 1))) == [
        "last/training_state.pt", "last/weights.safetensors", "metrics.jsonl"]


def test_seed_starts_a_run_from_the_longest_prefix_its_sft_stage_contains(tmp_path):
    """Catches: a prefix longer than the run's SFT stage used (the hand-off moved), a shorter one used
    while a longer is stored, epoch 1 never tried, a stored prefix without its metrics taken, the files
    not copied (or `best` kept from before when the prefix has none, or its absence an error), and the
    reused epochs miscounted."""
    store = SFTPrefixes(tmp_path / "prefixes", {1, 2, 3})
    assert store.seed(tmp_path / "none", STAGED, 1, True) == 0 and not (tmp_path / "none").exists()
    store.export(trained_to(tmp_path / "sft1", 1), SFT, 1, 1)
    run = tmp_path / "staged"
    assert store.seed(run, STAGED, 1, True) == 1
    got = files_of(run)
    assert got["metrics.jsonl"] == '{"epoch": 1}\n' and got["checkpoints/last/weights.safetensors"] == "last weights after epoch 1"
    assert got["checkpoints/best/weights.safetensors"] == "best weights after epoch 1"

    store.export(trained_to(tmp_path / "sft2", 2, best=False), SFT, 2, 1)
    store.export(trained_to(tmp_path / "sft3", 3), SFT, 3, 1)
    assert store.seed(run, STAGED, 1, True) == 2  # not 3: the hand-off is after epoch 2
    got = files_of(run)
    assert got["metrics.jsonl"] == '{"epoch": 1}\n{"epoch": 2}\n'
    assert sorted(got) == ["checkpoints/last/training_state.pt", "checkpoints/last/weights.safetensors", "metrics.jsonl"]
    assert got["checkpoints/last/training_state.pt"] == "last state after epoch 2"
    assert store.seed(tmp_path / "fresh", STAGED, 1, True) == 2  # no `best` there to remove: no error

    (store.root / store.key(SFT, 2, 1) / "metrics.jsonl").unlink()  # a damaged prefix: the next shorter one
    assert store.seed(tmp_path / "again", STAGED, 1, True) == 1
    assert store.seed(tmp_path / "sft-only", SFT, 1, True) == 3
    assert store.seed(tmp_path / "two-procs", STAGED, 2, True) == 0  # another world size: other batches


def test_drop_removes_only_this_trajectorys_prefixes(tmp_path):
    """Catches a drop that misses one of the shared epochs (the damaged prefix would be seeded again),
    removes another trajectory's, or fails on an epoch that is not stored."""
    store = SFTPrefixes(tmp_path / "prefixes", {1, 2})
    other = RunConfig(regime="sft", epochs=3, lr=1e-4)
    for cfg in (SFT, other):
        for k in (1, 2):
            store.export(trained_to(tmp_path / f"{cfg.hash()}-{k}", k), cfg, k, 1)
    store.drop(STAGED, 1)
    store.drop(STAGED, 1)  # nothing left to remove: no error
    assert sorted(p.name for p in store.root.iterdir()) == sorted(store.key(other, k, 1) for k in (1, 2))


# -- a full disk while a checkpoint or a metrics line is written ------------------------------------

class _FullAfterOneWrite:
    """A file on a disk that fills up after the first write (torch.save's first record fits)."""

    def __init__(self) -> None:
        self.writes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def flush(self) -> None:
        pass


def test_a_full_disk_under_torch_save_is_the_os_error_it_is(tmp_path, monkeypatch):
    """torch.save reports a write that fails after its first record as a RuntimeError ("unexpected pos")
    without the errno. Catches save_state letting that RuntimeError through, or raising an OSError
    without the errno and path that the full-disk message is made from (the run would die with a
    traceback instead of one line)."""
    monkeypatch.setattr(ckpt, "open", lambda *a, **k: _FullAfterOneWrite(), raising=False)
    path = tmp_path / STATE_FILE
    with pytest.raises(OSError) as e:
        ckpt.save_state({"w": torch.zeros(16)}, path)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_metrics_line_that_cannot_be_written_is_one_line_and_not_counted(tmp_path):
    """Catches the metrics log counting a line it could not write (the checkpoint would count a line
    the file lacks, and the resumed run find its metrics damaged), and a full disk raised as a bare
    OSError (a traceback) instead of one line."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path = Path("/dev/full")  # every write fails with ENOSPC (not opened by MetricsLog: it reads as endless zeros)
    with pytest.raises(SftdpoError, match=r"^could not write /dev/full: the disk is full; free disk space.*"
                                          r"a line cut short is dropped on resume"):
        log.write({"loss": 1.0})
    assert log.lines == 0


def test_a_checkpoint_that_cannot_be_written_leaves_the_one_before(tmp_path, monkeypatch):
    """Catches a full disk while an epoch's checkpoint is written raised as a bare OSError (a traceback),
    or another error taken for a full disk, and the earlier checkpoint lost with the failed one."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = RunState(epoch=1, best_epoch=1)
    save_checkpoint(tmp_path, model, state, opt, None, final=False)
    before = files_of(tmp_path / "last", Path.read_bytes)

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_tensors", full)
    with pytest.raises(SftdpoError, match=rf"^could not write the checkpoint of epoch 2 \({re.escape(str(tmp_path / 'last'))}\)"
                                          r".*the disk is full.*\(the checkpoint before it is intact; the same command"):
        save_checkpoint(tmp_path, model, RunState(epoch=2, best_epoch=1), opt, None, final=False)
    assert files_of(tmp_path / "last", Path.read_bytes) == before
    with pytest.raises(SftdpoError, match=r"^could not write the checkpoint .*best.*the disk is full.*"
                                          r"\(the checkpoints written before are intact; the same command resumes"):
        save_weights(model, tmp_path / "best")

    def broken(tensors, path, metadata=None):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(ckpt, "save_tensors", broken)
    for save in (lambda: save_checkpoint(tmp_path, model, RunState(epoch=2), opt, None, final=False),
                 lambda: save_weights(model, tmp_path / "best")):
        with pytest.raises(OSError) as e:
            save()
        assert e.value.errno == errno.EIO and not isinstance(e.value, SftdpoError)

