"""Fault injection: every file a run or a study reads back, truncated, garbage or missing, through the
command that reads it: no traceback, at most one line, and the documented recovery; every command that
writes, made to fail by a file-size limit (a full disk, as the kernel reports it): one line, and the
previous output intact.

The files read back, and who reads them (each row is tested below):

  study.db                     study status / report / run (the index)      rebuilt from the run directories
  study.json                   study status / report / run                  the run directories stand in
  spec.yaml                    study report                                 shown as it is
  runs/R/run.json              study status / run, the run's process        study.json stands in; rewritten by study run
  runs/R/summary.json          study status, train, study run               the run is failed, redone by study run
  runs/R/dev_outputs.jsonl     study status / report                        "
  runs/R/metrics.jsonl         study status, train (resume)                 a torn last line dropped; else redone
  runs/R/config.json           study status, train                          redone / rewritten
  runs/R/failed.json           study status                                 "failed (unreadable failed.json)"
  runs/R/checkpoints/last/*    train / study run (resume), eval --checkpoint last    the run restarts; eval: one line
  runs/R/checkpoints/best/*    eval                                          one line
  runs/R/dpo/{state.json, pairs.jsonl, reference.safetensors}    resume inside DPO    the run restarts
  <cache>/init_eval, reflogps, pairs, rates, tokenizers    any run          recomputed

Each test builds on one finished study (`finished`, built once per module) copied per case.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftdpo.study.runner import run_study
from sftdpo.system import descendants, still_running

from conftest import qqp_files
from test_inputs import cli

HOWS = ("truncated", "garbage", "missing")


def damage(path: Path, how: str) -> None:
    """Truncated: the first half of the bytes (a line cut mid-way); garbage: bytes that are no format;
    missing: gone."""
    if how == "missing":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"\x00\xff garbage \xfe\n" * 7)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its content hash (what 'left as it was' means)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lines(text: str) -> list[str]:
    return [ln for ln in text.strip().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_cache):
    """A finished two-run study (SFT, and SFT@1->DPO sharing its first epoch; 3 epochs), tiny-llama, all
    checkpoints kept; its spec is spec.yaml beside it."""
    root = tmp_path_factory.mktemp("faults")
    spec = {"name": "faults",
            "defaults": {"task": "paraphrase", "model": "tiny-llama", "epochs": 3, "batch_size": 8, "lr": 3e-3,
                         "dpo_lr": 1e-3, "precision": "fp32", "device": "cpu", **qqp_files(root, 16, 8)},
            "grid": {"regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1}]}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTDPO_CACHE_DIR", str(shared_cache))
        run_study(str(root / "spec.yaml"), root / "study", report=True)
    return root / "study"


@pytest.fixture(scope="module")
def interrupted(finished, tmp_path_factory, shared_cache):
    """The finished study again, its staged run killed (SIGKILL) after epoch 2, inside the DPO stage:
    its checkpoint of epoch 2 and its dpo/ inputs on disk."""
    study = Path(shutil.copytree(finished, tmp_path_factory.mktemp("interrupted") / "study"))
    shutil.rmtree(study / "runs" / run_names(study)["staged"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTDPO_CACHE_DIR", str(shared_cache))
        mp.setenv("SFTDPO_TEST_DIE_AFTER_EPOCH", "2")
        mp.setenv("SFTDPO_TEST_DIE_RUN", "sft1-dpo")
        run_study(str(finished.parent / "spec.yaml"), study, report=False)
    staged = study / "runs" / run_names(study)["staged"]
    assert not (staged / "summary.json").exists() and (staged / "dpo" / "state.json").exists()
    return study


@pytest.fixture
def study(finished, tmp_path, cache):
    """A copy of the finished study, to damage."""
    return Path(shutil.copytree(finished, tmp_path / "study"))


def run_names(study: Path) -> dict[str, str]:
    return {("staged" if "sft1-dpo" in p.name else "sft"): p.name for p in (study / "runs").iterdir()}


def status(study: Path) -> tuple[int, str, dict[str, str]]:
    """(exit status, stderr, {run name: its status line}) of `sftdpo study status`."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc, err = cli("study", "status", str(study))
    rows = {ln.split()[1]: ln for ln in out.getvalue().splitlines()[1:] if ln.strip()}
    return rc, err, rows


# -- the readers --------------------------------------------------------------------------------------

def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    """A JSON Lines file sftdpo appends to loses at most its last line to a crash or a full disk: that
    line is dropped; a bad line before it is damage, named by its number; a file written whole
    (torn_ok=False) loses nothing silently. Catches a reader that drops any bad line, or none."""
    from sftdpo.files import DamagedFile, read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path, "fix") == [{"a": 1}, {"a": 2}]
    with pytest.raises(DamagedFile, match=r"m.jsonl is damaged \(line 3 is not JSON"):
        read_jsonl(path, "fix", torn_ok=False)
    path.write_bytes(b'{"a": 1}\n\x00\xff\n{"a": 3}\n')
    with pytest.raises(DamagedFile, match=r"line 2 is not JSON .*\): fix$"):
        read_jsonl(path, "fix")


# -- the index: study status and report -----------------------------------------------------------

# (file, how) -> (the run's status in `study status`, a phrase of its line or of the one warning; None: no line)
INDEX_CASES = {
    ("study.db", "truncated"): ("done", "study.db is damaged"),
    ("study.db", "garbage"): ("done", "study.db is damaged"),
    ("study.db", "missing"): ("done", None),
    ("study.json", "truncated"): ("done", "study.json is damaged"),
    ("study.json", "garbage"): ("done", "study.json is damaged"),
    ("study.json", "missing"): ("done", None),
    ("run.json", "truncated"): ("done", "stands in"),
    ("run.json", "garbage"): ("done", "stands in"),
    ("run.json", "missing"): ("done", None),
    ("summary.json", "truncated"): ("failed", "summary.json is damaged"),
    ("summary.json", "garbage"): ("failed", "summary.json is damaged"),
    ("summary.json", "missing"): ("pending", "epoch 3 done"),
    ("dev_outputs.jsonl", "truncated"): ("failed", "dev_outputs.jsonl is damaged"),
    ("dev_outputs.jsonl", "garbage"): ("failed", "dev_outputs.jsonl is damaged"),
    ("dev_outputs.jsonl", "missing"): ("failed", "dev_outputs.jsonl is damaged"),
    ("metrics.jsonl", "truncated"): ("failed", "metrics.jsonl is damaged"),
    ("metrics.jsonl", "garbage"): ("failed", "metrics.jsonl is damaged"),
    ("metrics.jsonl", "missing"): ("failed", "metrics.jsonl is damaged"),
    ("config.json", "truncated"): ("failed", "config.json is damaged"),
    ("config.json", "garbage"): ("failed", "config.json is damaged"),
    ("config.json", "missing"): ("done", None),
    ("run directory", "missing"): ("pending", "directory is missing"),
}


@pytest.mark.parametrize("name,how", list(INDEX_CASES))
def test_study_status_reads_every_damaged_file_in_one_line(study, name, how):
    """A damaged file of one run (or of the study) never stops `study status` for the study: the run
    shows what its files now vouch for, the other run stays done, and stderr has at most the one line
    that names the file. Catches an index that lets JSONDecodeError or sqlite3.DatabaseError out, that
    trusts a summary.json whose results cannot be read back, or that drops a deleted run."""
    runs = run_names(study)
    run = study / "runs" / runs["sft"]
    path = {"study.db": study / "study.db", "study.json": study / "study.json", "run directory": run}.get(name, run / name)
    damage(path, how)
    want, phrase = INDEX_CASES[(name, how)]
    rc, err, rows = status(study)
    assert rc == 0 and "Traceback" not in err, err
    assert len(lines(err)) <= 1, err
    assert rows[runs["sft"]].split()[0] == want, rows
    assert rows[runs["staged"]].split()[0] == "done", rows
    if phrase:
        assert phrase in rows[runs["sft"]] or phrase in err, (rows, err)
    else:
        assert not lines(err), err
    # the report reads the same index: it is written, and names the run's state
    rc, err = cli("study", "report", str(study))
    assert rc == 0 and "Traceback" not in err and len(lines(err)) <= 1, err
    md = (study / "report" / "report.md").read_text()
    assert ("finished runs" in md) and (want == "done" or runs["sft"] in md)


def test_a_damaged_failed_json_is_a_failed_run(study):
    """failed.json is read only for a run without summary: unreadable, the run is still failed (and
    retried by the next study run), not a traceback."""
    run = study / "runs" / run_names(study)["sft"]
    (run / "summary.json").unlink()
    (run / "failed.json").write_bytes(b"\x00{not json")
    rc, err, rows = status(study)
    assert rc == 0 and not lines(err)
    assert rows[run.name].split()[0] == "failed" and "unreadable failed.json" in rows[run.name]


def test_a_damaged_spec_yaml_is_shown_as_it_is(study):
    """spec.yaml is shown in the report and declares its claims: garbage there is shown, the claims are
    said to be untested in one line (and in the report), not a UnicodeDecodeError."""
    damage(study / "spec.yaml", "garbage")
    rc, err = cli("study", "report", str(study))
    assert rc == 0 and len(lines(err)) == 1 and "spec.yaml is damaged" in err, err
    md = (study / "report" / "report.md").read_text()
    assert "garbage" in md and "Not tested: the study's `spec.yaml`" in md


# -- a read-only study directory ---------------------------------------------------------------------

def test_read_only_commands_leave_a_read_only_study_as_it_is(study, tmp_path, monkeypatch):
    """`study status` and `study report --out elsewhere` on a study directory this process cannot write
    (a shared results folder): the index is built in memory from a copy of study.db, said in one line,
    and not one byte of the study directory changes. Catches an index opened for writing in place
    (which fails on a read-only directory) and a report written into the study directory."""
    from sftdpo.study import index

    runs = run_names(study)
    shutil.rmtree(study / "runs" / runs["sft"])  # something the index must change
    before = snapshot(study)
    readonly = study.resolve()
    monkeypatch.setattr(index, "writable", lambda p: not Path(p).resolve().is_relative_to(readonly))
    os.chmod(study, 0o555)  # and for real where this process is not root
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc, err = cli("study", "status", str(study))
        assert rc == 0 and "Traceback" not in err
        rc, err = cli("study", "report", str(study), "--out", str(tmp_path / "elsewhere"))
        assert rc == 0 and "Traceback" not in err, err
        # a report into the read-only study itself: one line that says to use --out
        rc, err = cli("study", "report", str(study)) if os.geteuid() != 0 else (2, "sftdpo: error: ... --out DIR")
        assert rc == 2 and len(lines(err)) == 1 and "--out" in err
    finally:
        os.chmod(study, 0o755)
    assert f"pending  {runs['sft']}" in out.getvalue().replace("pending ", "pending  ", 1) or "pending" in out.getvalue()
    assert (tmp_path / "elsewhere" / "report.md").exists()
    assert snapshot(study) == before


def test_the_read_only_note_is_one_line(study, monkeypatch, capsys):
    """Without -q the in-memory index is said in one line on stderr."""
    from sftdpo.cli import main
    from sftdpo.study import index

    monkeypatch.setattr(index, "writable", lambda p: False)
    assert main(["study", "status", str(study)]) == 0
    err = capsys.readouterr().err
    assert lines(err) == [f"{study} is not writable: its index is built in memory (nothing there is changed)"]


# -- writes that fail: a file-size limit stands for a full disk ------------------------------------

def limited(limit: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`sftdpo ARGS` in a process whose files cannot grow past `limit` bytes (RLIMIT_FSIZE: the write
    that crosses it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "sftdpo.cli", "-q", *args], capture_output=True, text=True,
                          preexec_fn=cap, cwd=cwd, env=os.environ.copy())


def test_a_report_that_cannot_be_written_leaves_the_previous_one(study):
    """`study report` on a full disk: one line, and report.md, report.html, the tables and the figures
    of the previous report are byte for byte what they were (none deleted first, none half-written),
    with no temporary files left. Catches a report that clears the old files before writing."""
    assert cli("study", "status", str(study))[0] == 0  # the copy's index brought up to date first (its paths)
    before = snapshot(study / "report")
    assert before and "report.html" in before
    cp = limited(40_000, "study", "report", str(study))  # SQLite needs 32 KiB (its -shm file); report.html is more
    assert cp.returncode == 2, cp.stderr
    assert len(lines(cp.stderr)) == 1 and "could not write the report" in cp.stderr, cp.stderr
    assert "file-size limit" in cp.stderr and "previous report" in cp.stderr
    assert snapshot(study / "report") == before


def test_status_on_a_full_disk_indexes_in_memory(study):
    """`study status` that cannot write study.db (a full disk): one line, the status is right, and
    study.db is as it was."""
    runs = run_names(study)
    shutil.rmtree(study / "runs" / runs["sft"])
    before = (study / "study.db").read_bytes()
    cp = limited(4096, "study", "status", str(study))
    assert cp.returncode == 0, cp.stderr
    assert len(lines(cp.stderr)) == 1 and "built in memory" in cp.stderr, cp.stderr
    assert any(ln.split()[:2] == ["pending", runs["sft"]] for ln in cp.stdout.splitlines()), cp.stdout
    assert (study / "study.db").read_bytes() == before


# -- a run resumed or redone: the documented recovery, and the result of an uninterrupted run ------

def same_results(run: Path, want: Path) -> None:
    """The run's dev metrics, per-epoch records (timings aside), dev outputs and final weights are the
    uninterrupted run's."""
    from safetensors.torch import load_file

    from sftdpo.train.rundir import RunDir

    got, ref = RunDir(run).results(), RunDir(want).results()
    keys = lambda s: {k: v for k, v in s.items() if k.startswith(("dev/", "best/", "init/")) or k == "best_epoch"}  # noqa: E731
    assert keys(got[0]) == keys(ref[0])
    untimed = lambda epochs: [(st, e, {k: v for k, v in m.items() if not k.endswith("_s")}) for st, e, m, _ in epochs]  # noqa: E731
    assert untimed(got[2]) == untimed(ref[2])
    assert got[3] == ref[3]
    a, b = (load_file(str(r / "checkpoints" / "last" / "weights.safetensors")) for r in (run, want))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def resume(study: Path, spec: Path) -> str:
    """`study run` again (in this process; its runs in their own processes); the staged run's train.log
    lines written by this invocation."""
    log = study / "runs" / run_names(study)["staged"] / "train.log"
    seen = log.stat().st_size if log.exists() else 0
    run_study(str(spec), study, report=False)
    return log.read_bytes()[seen:].decode(errors="replace")


def damaged_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "is damaged" in ln]


# (file of the staged run, killed inside DPO, how) -> whether the run starts again
RESUME_CASES = {
    ("checkpoints/last/training_state.pt", "truncated"): True,
    ("checkpoints/last/training_state.pt", "garbage"): True,
    ("checkpoints/last/weights.safetensors", "truncated"): True,
    ("checkpoints/last/weights.safetensors", "garbage"): True,
    ("checkpoints/last/weights.safetensors", "missing"): True,
    ("metrics.jsonl", "garbage"): True,
    ("metrics.jsonl", "torn"): False,
    ("dpo/state.json", "garbage"): True,
    ("dpo/state.json", "missing"): True,
    ("dpo/pairs.jsonl", "truncated"): True,
    ("dpo/reference.safetensors", "garbage"): True,
    ("config.json", "garbage"): False,
}


@pytest.mark.parametrize("name,how", list(RESUME_CASES))
def test_a_resumed_run_with_a_damaged_file_ends_as_an_uninterrupted_one(interrupted, finished, tmp_path, cache, name,
                                                                         how):
    """A run killed inside its DPO stage, one of its files then damaged, resumed by `study run`: a
    damaged checkpoint, metrics log or DPO input makes the run start again, said in one line (its
    reference, the model at the hand-off, cannot be rebuilt from weights that trained on); a torn last
    metrics line is dropped; a damaged config.json is rewritten. Either way it ends with the
    uninterrupted run's metrics, outputs and weights. Catches a resume that trusts a truncated
    checkpoint (SafetensorError, PytorchStreamReader), that keeps a torn line, or that stops at a damaged
    dpo/state.json with a JSONDecodeError."""
    study = Path(shutil.copytree(interrupted, tmp_path / "study"))
    run = study / "runs" / run_names(study)["staged"]
    path = run / name
    if how == "torn":  # a line cut short by a crash: the epoch-2 checkpoint counted every line before it
        with path.open("a") as f:
            f.write('{"kind": "train", "stage": "dp')
    elif name == "metrics.jsonl":  # garbage in a line the checkpoint counted
        data = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(data[:2] + [b"\x00 garbage\n"] + data[3:]))
    else:
        damage(path, how)
    log = resume(study, finished.parent / "spec.yaml")
    if RESUME_CASES[(name, how)]:
        assert len(damaged_lines(log)) == 1 and "the run starts again from its beginning" in log, log
    elif name == "config.json":
        assert len(damaged_lines(log)) == 1 and "rewritten" in log, log
    else:
        assert not damaged_lines(log), log
    assert "Traceback" not in log
    same_results(run, finished / "runs" / run.name)


@pytest.mark.parametrize("damages", [
    {"sft": ("summary.json", "garbage"), "staged": ("config.json", "truncated")},
    {"sft": ("dev_outputs.jsonl", "truncated"), "staged": ("metrics.jsonl", "truncated")},
])
def test_a_finished_run_with_a_damaged_result_is_redone(study, finished, damages):
    """A finished run whose summary, dev outputs, config or metrics cannot be read back is not finished:
    `study status` says so (tested above) and the next `study run` redoes it, from its final checkpoint
    (or from the beginning when the metrics it would resume are damaged), to the same results; the
    index then shows it done again. Catches a study run that skips a run because summary.json exists."""
    runs = run_names(study)
    for which, (name, how) in damages.items():
        damage(study / "runs" / runs[which] / name, how)
    run_study(str(finished.parent / "spec.yaml"), study, report=False)
    rc, err, rows = status(study)
    assert rc == 0 and not lines(err) and all(rows[n].split()[0] == "done" for n in runs.values()), (rows, err)
    for name in runs.values():
        same_results(study / "runs" / name, finished / "runs" / name)


@pytest.mark.parametrize("name,how,needle", [
    ("checkpoints/best/weights.safetensors", "truncated", "is damaged"),
    ("checkpoints/best/weights.safetensors", "garbage", "is damaged"),
    ("checkpoints/best/weights.safetensors", "missing", "no best checkpoint"),
    ("config.json", "garbage", "config.json is damaged"),
])
def test_eval_of_a_damaged_checkpoint_is_one_line(study, name, how, needle):
    """`eval` reads a checkpoint and repairs nothing: one line that names the file and the way out
    (the other checkpoint, or training again)."""
    run = study / "runs" / run_names(study)["sft"]
    damage(run / name, how)
    rc, err = cli("eval", "--run", str(run))
    assert rc == 2 and len(lines(err)) == 1 and needle in err and "Traceback" not in err, err
    if "weights" in name and how != "missing":
        assert "--checkpoint best|last" in err


def test_eval_of_a_read_only_run_writes_nothing(study, monkeypatch):
    """`eval` on a run this process cannot write evaluates it and changes nothing there."""
    from sftdpo.train import loop

    run = study / "runs" / run_names(study)["sft"]
    before = snapshot(run)
    monkeypatch.setattr(loop, "writable", lambda p: False)
    rc, err = cli("eval", "--run", str(run), "--checkpoint", "last")
    assert rc == 0 and not lines(err), err
    assert snapshot(run) == before


# -- caches: a damaged entry is computed again ------------------------------------------------------

@pytest.fixture(scope="module")
def sonnet_dpo(tmp_path_factory):
    """A DPO-only sonnet run with its own cache: the untrained evaluation, the sampled pairs and the
    reference log-probs are cache entries (and the tiny-llama tokenizer, converted once)."""
    from conftest import SONNET_FILES

    root = tmp_path_factory.mktemp("caches")
    args = ["train", "--task", "sonnet", "--model", "tiny-llama", "--regime", "dpo", "--epochs", "1",
            "--max-train-examples", "4", "--max-dev-examples", "2", "--max-new-tokens", "8", "--batch-size", "4",
            "--eval-batch-size", "4", "--device", "cpu", "--precision", "fp32", *sum((["--" + k, v] for k, v in SONNET_FILES.items()), [])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTDPO_CACHE_DIR", str(root / "cache"))
        rc, err = cli(*args, "--out", str(root / "first"))
    assert rc == 0, err
    return root, args


@pytest.mark.parametrize("entry,how", [(e, h) for e in ("init_eval", "pairs", "reflogps") for h in ("truncated", "garbage")]
                         + [("tokenizers", "garbage")])  # converted again from the GGUF: the slow one, once
def test_a_damaged_cache_entry_is_computed_again(sonnet_dpo, tmp_path, monkeypatch, entry, how):
    """Each cache entry, damaged, is said in one line and computed again, and the run that meets it
    ends as the run that filled the cache did. Catches a cache read that trusts a half-written file (a
    pairs file cut at a line's end reads as fewer pairs) or lets its parse error out."""
    root, args = sonnet_dpo
    cache = Path(shutil.copytree(root / "cache", tmp_path / "cache"))
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(cache))
    files = sorted(p for p in (cache / entry).rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".safetensors"))
    assert files, list((cache / entry).rglob("*"))
    for f in files:
        damage(f, how)
    rc, err = cli(*args, "--out", str(tmp_path / "again"))
    assert rc == 0 and "Traceback" not in err, err
    assert 1 <= len(lines(err)) <= len(files) and all("damaged" in ln for ln in lines(err)), err
    from sftdpo.train.rundir import RunDir

    got, ref = RunDir(tmp_path / "again").results(), RunDir(root / "first").results()
    assert {k: v for k, v in got[0].items() if k.startswith("dev/")} == {k: v for k, v in ref[0].items() if k.startswith("dev/")}
    assert got[3] == ref[3]


def test_damaged_cached_rates_are_measured_again(tmp_path, monkeypatch):
    """A damaged rates entry reads as none (the study's estimate measures or counts again)."""
    from sftdpo.study import rates

    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path))
    path = rates._rates_file("k")
    path.parent.mkdir(parents=True)
    for data in (b"\x00\xff", b'{"sft_s": 1.0', b"[]", b"{}"):
        path.write_bytes(data)
        assert rates.cached_rates("k") is None


def test_a_pending_runs_torn_metrics_line_is_dropped(interrupted, tmp_path):
    """A run stopped mid-write (a crash, a full disk) leaves its last metrics line cut short: `study
    status` drops it, as `train` does on resume, and shows the epochs before it. Catches an index that
    stops the whole study at that line."""
    study = Path(shutil.copytree(interrupted, tmp_path / "study"))
    run = study / "runs" / run_names(study)["staged"]
    (run / "failed.json").unlink()  # as a driver killed with its run leaves it: pending
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "epoch", "stage": "dpo", "ep')
    rc, err, rows = status(study)
    assert rc == 0 and not lines(err), err
    assert rows[run.name].split()[0] == "pending" and "epoch 2 done" in rows[run.name], rows


# -- signals: SIGTERM is Ctrl-C, and no run outlives its study ---------------------------------------


def wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not list(path_glob.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {pattern} under {path_glob}"
        time.sleep(0.1)


def sftdpo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftdpo.cli", "-q", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_sigterm_stops_train_as_ctrl_c_does(tmp_path, cache):
    """SIGTERM (kill, timeout, Slurm, Kubernetes) to `train`: one line that says how to resume, exit
    status 143, and the run resumes to its end. Catches the default action (killed with no line)."""
    import signal

    files = qqp_files(tmp_path, 64, 8)
    args = ["train", "--task", "paraphrase", *sum((["--" + k, v] for k, v in files.items()), []), "--model", "tiny-llama",
            "--device", "cpu", "--precision", "fp32", "--epochs", "3", "--batch-size", "4", "--out", str(tmp_path / "run")]
    proc = sftdpo(*args)
    wait_for(tmp_path / "run", "checkpoints/last/training_state.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert lines(err) == ["sftdpo: terminated (SIGTERM) (completed epochs are checkpointed; run the same command "
                          "again to resume)"]
    again = sftdpo(*args)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    epochs = [r["epoch"] for r in map(yaml.safe_load, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    assert epochs == [0, 1, 2, 3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, PR_SET_PDEATHSIG, pidfd")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_no_run_outlives_its_study(finished, tmp_path, cache, sig):
    """`study run` stopped while a run trains: with SIGTERM it stops its runs, says so in one line and
    exits 143, the run marked interrupted; killed with SIGKILL it takes its runs along (each asks the
    kernel to follow its parent, and the fork server's children watch the driver). Either way no
    process of the study is left, and the next `study run` ends with the results of an uninterrupted
    study. Catches a run process left training with no parent (the next study run would then find its
    directory busy)."""
    import signal
    import time

    out = tmp_path / "study"
    proc = sftdpo("study", "run", str(finished.parent / "spec.yaml"), "--out", str(out), "--no-report")
    wait_for(out, "runs/*/checkpoints/last/training_state.pt", proc)
    (training,) = [p.parents[2] for p in out.glob("runs/*/checkpoints/last/training_state.pt")]
    tree = descendants(proc.pid)
    assert tree, "the run's process"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    deadline = time.monotonic() + 20
    while still_running(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = still_running(tree)
    for pid in left:  # not left running past the test
        os.kill(pid, signal.SIGKILL)
    assert not left, "processes of the study left behind"
    # stopped, not finished: a run process left training would have ended its run by now
    assert not (training / "summary.json").exists()
    if sig == "SIGTERM":
        assert proc.returncode == 143 and len(lines(err)) == 1 and "terminated (SIGTERM)" in err, err
        failed = [yaml.safe_load(p.read_text())["error"] for p in out.glob("runs/*/failed.json")]
        assert failed and all(e.startswith("interrupted") for e in failed), failed
    else:
        assert proc.returncode == -signal.SIGKILL
    run_study(str(finished.parent / "spec.yaml"), out, report=False)
    for run in (finished / "runs").iterdir():
        same_results(out / "runs" / run.name, run)


def test_a_checkpoint_that_cannot_be_written_leaves_the_one_before(interrupted, finished, tmp_path, cache):
    """`train`, and a study's run process, that cannot write the next checkpoint (a full disk): one line
    that says so (for the study: the run fails with that line), and checkpoints/ as they were; with room
    again the run ends as the uninterrupted one. Catches a traceback from safetensors/torch.save and a
    checkpoint directory removed before its replacement is complete."""
    study = Path(shutil.copytree(interrupted, tmp_path / "study"))
    run = study / "runs" / run_names(study)["staged"]
    (run / "failed.json").unlink()
    before = snapshot(run / "checkpoints")
    cp = limited(5_000_000, "train", "--config", str(run / "config.json"), "--out", str(run))  # weights: ~13 MB
    assert cp.returncode == 2 and len(lines(cp.stderr)) == 1, cp.stderr
    assert "could not write the checkpoint" in cp.stderr and "file-size limit" in cp.stderr
    assert snapshot(run / "checkpoints") == before
    cp = limited(5_000_000, "study", "run", str(finished.parent / "spec.yaml"), "--out", str(study), "--no-report")
    assert cp.returncode == 3 and not lines(cp.stderr), cp.stderr  # one run done, one failed
    error = yaml.safe_load((run / "failed.json").read_text())["error"]
    assert "could not write the checkpoint" in error and "file-size limit" in error
    assert snapshot(run / "checkpoints") == before
    resume(study, finished.parent / "spec.yaml")
    same_results(run, finished / "runs" / run.name)


@pytest.mark.parametrize("command,written", [(["eval", "--run", "{run}"], "{run}/eval_best.json"),
                                             (["study", "best", "{study}"], "{study}/best")])
def test_small_writes_that_fail_leave_the_previous_output(study, command, written):
    """`eval` (eval_best.json) and `study best` (config files) on a full disk: one line naming the file,
    and the previous output as it was."""
    run = study / "runs" / run_names(study)["sft"]
    args = [a.format(run=run, study=study) for a in command]
    assert cli(*args)[0] == 0
    target = Path(written.format(run=run, study=study))
    before = snapshot(target) if target.is_dir() else target.read_bytes()
    if target.is_dir():  # each file rewritten: make the new ones differ in size
        for f in target.iterdir():
            f.write_bytes(f.read_bytes() + b"\n# an older version\n")
        before = snapshot(target)
    cp = limited(64, *args)
    *notes, error = lines(cp.stderr)
    assert cp.returncode == 2 and "file-size limit" in error and str(target) in error, cp.stderr
    # study best reads the index: SQLite's 32 KiB -shm file does not fit either, said in its own line
    assert all("built in memory" in n for n in notes) and len(notes) <= 1, cp.stderr
    assert (snapshot(target) if target.is_dir() else target.read_bytes()) == before
